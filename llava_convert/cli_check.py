"""`llava-convert check` command (implemented in the llava_convert/check/ package).

Kept light: torch and transformers are imported inside the command, so `llava-convert --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path

import click

_PATH = click.Path(path_type=Path)


@click.command()
@click.argument("original", type=_PATH)
@click.argument("converted", type=_PATH)
@click.option(
    "--vision-tower", type=_PATH, help="CLIP directory or Hub repo id for ORIGINAL (default: its mm_vision_tower)."
)
@click.option("--base", default=None, help="Base LLM for a LoRA / projector-only / delta ORIGINAL (path or Hub id).")
@click.option("--delta/--no-delta", default=None, help="ORIGINAL is delta weights (default: by its name).")
@click.option(
    "--image",
    "images",
    type=_PATH,
    multiple=True,
    help="Image file to test (repeatable; default: a built-in non-square test image).",
)
@click.option("--prompt", default=None, help="Question asked about each image.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype on both sides (a quantized CONVERTED runs in its stored dtype).",
)
@click.option(
    "--json", "json_path", type=_PATH, default=None, help="Write a machine-readable report to this file."
)
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Absolute tolerance on logits [default: 1e-4 float32, 5e-2 bfloat16; not used when quantized].",
)
@click.option(
    "--min-top1",
    type=float,
    default=None,
    help="Lowest acceptable top-1 agreement, 0-1 [default: per dtype / quantization type].",
)
@click.option(
    "--max-new-tokens", type=int, default=8, show_default=True, help="Greedy tokens generated and compared."
)
@click.option("--low-memory", is_flag=True, help="Stream one decoder layer at a time (7B/13B in 24 GB).")
@click.option(
    "--save-report", is_flag=True,
    help="Also write the report into CONVERTED as check-report.json; the model card shows its figures.",
)
@click.option("--quiet", is_flag=True, help="No progress messages on stderr.")
def check(
    original,
    converted,
    vision_tower,
    base,
    delta,
    images,
    prompt,
    dtype,
    json_path,
    atol,
    min_top1,
    max_new_tokens,
    low_memory,
    save_report,
    quiet,
):
    """Compare ORIGINAL (authors' format, run as the authors' code runs it) with CONVERTED (Hugging Face).

    Exit status: 0 when they agree, 1 when they disagree (the first diverging stage is named), 2 on bad input.
    """
    from .errors import LlavaConvertError

    if json_path is not None:  # refuse an unwritable report target before minutes of checking, not after
        import os

        parent = json_path.parent
        if not parent.is_dir():
            raise LlavaConvertError(f"Cannot write the report to {json_path}: {parent} does not exist")
        if json_path.is_dir():
            raise LlavaConvertError(f"Cannot write the report to {json_path}: it is a directory")
        if not os.access(json_path if json_path.exists() else parent, os.W_OK):
            raise LlavaConvertError(f"Cannot write the report to {json_path}: permission denied")
    from .check import CheckOptions
    from .check import check as run
    from .check.options import DEFAULT_PROMPT

    options = CheckOptions(
        vision_tower=vision_tower,
        base=base,
        delta=delta,
        images=list(images) or None,
        prompt=prompt if prompt is not None else DEFAULT_PROMPT,
        dtype=dtype,
        atol=atol,
        min_top1=min_top1,
        max_new_tokens=max_new_tokens,
        low_memory=low_memory,
        progress=not quiet,
    )
    report = run(original, converted, options)
    if json_path is not None:
        try:
            report.write_json(json_path)
        except OSError as e:
            raise LlavaConvertError(f"Cannot write the report to {json_path}: {e.strerror}") from None
    if save_report:
        save(report, converted)
    click.echo(report.summary())
    report.raise_for_verdict()


def save(report, converted: Path) -> None:
    """The report into CONVERTED (check-report.json), and the tool's model card there rendered again with it."""
    from .card import REPORT_NAME, refresh_card
    from .errors import LlavaConvertError

    try:
        report.write_json(Path(converted) / REPORT_NAME)
    except OSError as e:
        raise LlavaConvertError(f"Cannot write the report to {Path(converted) / REPORT_NAME}: {e.strerror}") from None
    refresh_card(converted)


def check_and_save(original, converted: Path, *, vision_tower, base, delta, quiet: bool) -> None:
    """`convert --check`: the default check, its report saved into CONVERTED; raises CheckFailed (exit 1)."""
    from .check import CheckOptions
    from .check import check as run

    options = CheckOptions(vision_tower=vision_tower, base=base, delta=delta, progress=not quiet)
    report = run(original, converted, options)
    save(report, converted)
    click.echo(report.summary())
    report.raise_for_verdict()

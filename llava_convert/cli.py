"""Command line: a thin layer over the library; each option maps to one keyword argument.

Exit codes: 0 ok, 1 check failed, 2 bad input. Heavy imports (torch, transformers) happen inside commands,
so `llava-convert --help` answers at once.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from pathlib import Path

import click

from . import __version__
from .cli_push import command_line, hub_options, run_push

_PATH = click.Path(path_type=Path)


class _Group(click.Group):
    """Maps every failure to one line on stderr and an exit code: 2 bad input or environment (a missing,
    corrupt or hostile file, disk full, permissions), 1 check failed, 128 + N killed by signal N (130 for
    Ctrl-C). `--debug` adds the traceback."""

    def invoke(self, ctx):
        import signal

        from .errors import CheckFailed, Interrupted, LlavaConvertError

        debug = bool(ctx.params.get("debug"))
        # Signal handlers can only be set from the main thread (a library caller may run us elsewhere).
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.getsignal(s) for s in _SIGNALS} if main_thread else {}
        for s in previous:
            signal.signal(s, _raise_interrupted)
        _INTERRUPTED.clear()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except LlavaConvertError as e:
            _fail(ctx, debug, f"Error: {e}", e.exit_code)
        except CheckFailed as e:
            _fail(ctx, debug, f"Check failed: {e}", e.exit_code)
        except Interrupted as e:
            _fail(ctx, debug, f"Interrupted ({signal.Signals(e.signum).name})", e.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, debug, "Interrupted (SIGINT)", 128 + signal.SIGINT)
        except OSError as e:
            _fail(ctx, debug, f"Error: {_os_error(e)}", 2)
        except MemoryError:
            _fail(ctx, debug, "Error: out of memory", 2)
        except RecursionError:
            _fail(ctx, debug, "Error: input nested too deeply", 2)
        except Exception as e:  # noqa: BLE001 - the last line of defence: still one line, never a traceback
            msg = " ".join(str(e).split())[:300]
            _fail(ctx, debug, f"Error: internal error ({type(e).__name__}: {msg}); rerun with --debug for details", 2)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _signals():
    import signal

    return (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


_SIGNALS = _signals()
_INTERRUPTED: list[int] = []


def _raise_interrupted(signum, frame):
    from .errors import Interrupted

    if _INTERRUPTED:  # already on the way out (cleaning up): a second signal must not cut the cleanup short
        return
    _INTERRUPTED.append(signum)
    raise Interrupted(signum)


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    what = e.strerror or str(e)
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{where}: {what}" if where else what


def _fail(ctx, debug: bool, message: str, code: int) -> None:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    from .errors import one_line

    click.echo(one_line(message), err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llava-convert")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (for bug reports).")
def main(debug: bool) -> None:
    """Convert original LLaVA checkpoints to Hugging Face format (and quantize, check, inspect them)."""


def _echo_warnings(plan) -> None:
    for w in plan.warnings:
        click.echo(f"Warning: {w}", err=True)


def quant_options(f):
    """Options shared by `convert` and `quantize`; each maps to a QuantSpec field."""
    opts = [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where to quantize (cuda uses bitsandbytes' GPU kernels)."),
        click.option("--skip-modules", default=",".join(DEFAULT_SKIP), show_default=True,
                     help="Comma-separated modules kept unquantized (either key layout; '' quantizes all Linear layers)."),
        click.option("--compute-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16",
                     show_default=True, help="bnb_4bit_compute_dtype."),
        click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit block size."),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                     help="4-bit: also quantize the absmax statistics."),
    ]
    for o in opts:
        f = o(f)
    return f


# quantize.DEFAULT_SKIP, repeated so that `--help` does not import torch (a test keeps them equal).
DEFAULT_SKIP = ("lm_head", "vision_tower", "multi_modal_projector")


def _spec(quantize, double_quant, blocksize, compute_dtype, skip_modules, device):
    if quantize is None:
        return None
    from .quantize import QuantSpec

    skips = tuple(s.strip() for s in skip_modules.split(",") if s.strip())
    return QuantSpec(quantize, blocksize, double_quant, compute_dtype, skips, device)


def source_options(f):
    """How SOURCE is found and what it is applied to; shared by `convert` and `inspect`."""
    opts = [
        click.option("--base", type=_PATH, default=None,
                     help="Base LLM (directory or Hub repo id) for a LoRA adapter, projector-only or delta SOURCE."),
        click.option("--revision", default=None, help="Hub revision (branch, tag, commit) when SOURCE is a repo id."),
        click.option("--delta/--no-delta", "delta", default=None,
                     help="SOURCE holds delta weights (target - base); default: when its name has a 'delta' word."),
        click.option("--vision-tower", type=_PATH,
                     help="CLIP directory or Hub repo id (default: the config's mm_vision_tower)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.argument("source", type=_PATH)
@click.argument("output", type=_PATH)
@source_options
@click.option("--quantize", type=click.Choice(["int8", "nf4", "fp4"]), default=None,
              help="Write Linear weights bitsandbytes-quantized.")
@quant_options
@click.option(
    "--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto", show_default=True,
    help="Output dtype; auto keeps the checkpoint's own.",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--chat-template", default=None, help="Authors' conversation mode (default: from the Hub repo id, the config, else the name).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--check", "run_check", is_flag=True,
              help="Then run `check` against SOURCE, save its report in OUTPUT (the card shows it); "
                   "with --push-to-hub, push only when it passes.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
              help="Then publish OUTPUT to this Hub repo (as `llava-convert push`).")
@hub_options("--push-revision")
def convert(source, output, base, revision, delta, vision_tower, quantize, double_quant, blocksize, compute_dtype,
            skip_modules, device, dtype, max_shard_size, chat_template, dry_run, force, as_json, quiet,
            run_check, push_to_hub, private, push_revision, create_pr, commit_message, token):
    """Convert the original checkpoint SOURCE (a directory or Hub repo id: full checkpoint, LoRA adapter,
    projector-only or delta weights, the last three with --base) into a Hugging Face directory OUTPUT."""
    if push_to_hub and dry_run:
        from .errors import LlavaConvertError

        raise LlavaConvertError("--push-to-hub cannot be combined with --dry-run (nothing is written to push)")
    if push_to_hub:  # a missing or rejected token is found before minutes of conversion, not after
        from .publish import preflight

        preflight(push_to_hub, token)
    # Importing torch and transformers makes ~10^6 long-lived objects that the cyclic GC would rescan
    # again and again (~1 s of a small conversion); collect once they exist, then freeze them.
    gc.disable()
    from .convert import execute, plan_conversion

    plan = plan_conversion(
        source, base=base, revision=revision, delta=delta, vision_tower=vision_tower, dtype=dtype,
        max_shard_size=max_shard_size, chat_template=chat_template,
        quantize=_spec(quantize, double_quant, blocksize, compute_dtype, skip_modules, device),
    )
    gc.freeze()
    gc.enable()
    if not dry_run:
        execute(plan, output, force=force, progress=not quiet, command=command_line())
    _echo_warnings(plan)
    if dry_run:  # the plan says which chat template and why (--json: chat_template_reason)
        _print_plan(plan, as_json)
        return
    click.echo(f"Chat template {plan.chat_template}: {plan.chat_template_reason}", err=True)
    s = plan.summary()
    quant = f", {quantize} quantized" if quantize else ""
    click.echo(
        f"Wrote {output}: {s['target']}, {len(s['tensors'])} tensors, {s['total_bytes'] / 1e9:.2f} GB "
        f"in {len(s['shards'])} shard(s), {s['dtype']}{quant}, chat template {s['chat_template']}"
    )
    if run_check:
        from .cli_check import check_and_save

        src = f"{source}@{revision}" if revision and "@" not in str(source) else source
        check_and_save(src, output, vision_tower=vision_tower, base=base, delta=delta, quiet=quiet)
    if push_to_hub:
        run_push(output, push_to_hub, private=private, push_revision=push_revision, create_pr=create_pr,
                 commit_message=commit_message, token=token, quiet=quiet)


@main.command()
@click.argument("source", type=_PATH)
@click.argument("output", type=_PATH)
@click.option("--quantize", "quant_type", type=click.Choice(["int8", "nf4", "fp4"]), required=True,
              help="Quantization type.")
@quant_options
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quantize(source, output, quant_type, double_quant, blocksize, compute_dtype, skip_modules, device,
             max_shard_size, force, quiet):
    """Quantize SOURCE, a checkpoint already in Hugging Face llava / llava_next format, into OUTPUT."""
    from .hf_quantize import quantize_checkpoint

    spec = _spec(quant_type, double_quant, blocksize, compute_dtype, skip_modules, device)
    quantize_checkpoint(source, output, spec, max_shard_size=max_shard_size, force=force, progress=not quiet,
                        command=command_line())
    click.echo(f"Wrote {output}: {quant_type} quantized (skipping {', '.join(spec.skip_modules) or 'nothing'})")


def _print_plan(plan, as_json: bool) -> None:
    s = plan.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{s['source']} -> {s['target']} ({s['form']}, {s['backbone']} backbone, {s['facts']})")
    click.echo(f"vision tower: {s['vision_tower']}; dtype {s['dtype']}")
    click.echo(f"chat template {s['chat_template']}: {s['chat_template_reason']}")
    v = s["vocab"]
    click.echo(f"vocab: {v['original']} -> {v['padded']} (<image> = {v['image_token_id']}, <pad> = {v['pad_token_id']})")
    for t in s["tensors"]:
        src = ", ".join(t["source"]) or "(synthesized)"
        tr = f" [{t['transform']}]" if t["transform"] else ""
        click.echo(f"  {src} -> {t['target']}{tr} {t['dtype']} {tuple(t['shape'])} {t['shard']}")
    by_rule: dict[str, list[str]] = {}
    for d in s["dropped"]:
        by_rule.setdefault(d["rule"], []).append(d["source"])
    for rule, keys in by_rule.items():  # --json lists every dropped key
        shown = keys[0] if len(keys) == 1 else f"{len(keys)} keys, e.g. {keys[0]}"
        click.echo(f"  {shown} -> (dropped, {rule})")
    click.echo(f"{len(s['tensors'])} tensors, {s['total_bytes'] / 1e9:.3f} GB, {len(s['shards'])} shard(s)")


@main.command()
@click.argument("source", type=_PATH)
@source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(source, base, revision, delta, vision_tower, as_json):
    """Describe SOURCE: detected form and family, files, what else it needs, folded config and the plan."""
    from .convert import plan_conversion
    from .original import FORM_TITLES, NEEDS_BASE, base_hint, open_original

    if base is None:
        ckpt = open_original(source, revision=revision, delta=delta, require_base=False)
        if ckpt.form in NEEDS_BASE:
            info = {
                "source": str(ckpt.path),
                "form": ckpt.form,
                "backbone": ckpt.backbone,
                "needs": "--base",
                "message": base_hint(ckpt),
                "files": [str(p) for p in ckpt.own_files],
            }
            if as_json:
                click.echo(json.dumps(info, indent=2))
                return
            click.echo(f"{info['source']}: original LLaVA checkpoint ({FORM_TITLES[ckpt.form]}), {ckpt.backbone} backbone")
            click.echo(f"  {info['message']}")
            click.echo(f"  files: {', '.join(Path(f).name for f in info['files'])}")
            return
    plan = plan_conversion(source, base=base, revision=revision, delta=delta, vision_tower=vision_tower)
    _echo_warnings(plan)
    s = plan.summary()
    s["files"] = [str(f.path) for f in plan.source.input_files() if f.role == "weights"]
    s["config"] = plan.config
    s["base"] = str(plan.source.base) if plan.source.base else None
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{s['source']}: original LLaVA checkpoint ({s['form']}), {s['backbone']} backbone")
    if s["base"]:
        click.echo(f"  base LLM: {s['base']} ({FORM_TITLES[s['form']]} applied to it)")
    click.echo(f"  facts: {s['facts']}")
    click.echo(f"  weight files: {', '.join(Path(f).name for f in s['files'])}")
    click.echo(f"  vision tower: {s['vision_tower']}")
    click.echo(f"  converts to: {s['target']} (chat template {s['chat_template']}: {s['chat_template_reason']})")
    _print_plan(plan, False)


from .cli_check import check  # noqa: E402  (light module: heavy imports happen inside the command)
from .cli_push import push  # noqa: E402

main.add_command(check)
main.add_command(push)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

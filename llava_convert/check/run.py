"""`check()`: validate both sides, run the original, free it, run the converted model, compare, and build the
report with its provenance (the versions that produced the figures, the hashes of the files compared)."""

from __future__ import annotations

import gc
import hashlib
import platform
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import __version__
from ..errors import LlavaConvertError
from ..hub import locate
from ..logs import quiet
from ..reference_next import open_reference
from .compare import compare
from .converted import ConvertedModel, load_processor, read_converted_config
from .options import CheckOptions
from .original import run_original, shared_parts, storage_downcast
from .report import CheckReport, quantization_type, thresholds_for, verdict

# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def builtin_image(width: int = 300, height: int = 180, seed: int = 0) -> Image.Image:
    """A deterministic non-square test image: colour gradients, a ripple, seeded noise and hard-edged shapes,
    so that padding, cropping, resizing and tiling all change the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = xx / (width - 1), yy / (height - 1)
    arr = np.stack([255 * u, 255 * (1 - v), 127.5 + 127.5 * np.sin(2 * np.pi * (2 * u + v))], axis=-1)
    arr += rng.normal(0, 12, size=arr.shape)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(15, width // 3)), y0 + int(rng.integers(15, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    draw.line([(0, 0), (width - 1, height - 1)], fill=(255, 255, 255), width=3)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(0, 0, 0), width=2)
    return img


MAX_IMAGE_PIXELS = 50_000_000  # ~8660 x 5770: decoding costs ~3 bytes a pixel, padding to a square more


def _load_images(images: Sequence[Path | str | Image.Image] | None) -> list[tuple[str, Image.Image]]:
    """The images to check, decoded to RGB; files larger than MAX_IMAGE_PIXELS are refused from their header,
    before any pixel is decoded (a small compressed file can declare gigapixels)."""
    if not images:
        return [("builtin", builtin_image())]
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            out.append((f"image{len(out)}", item.convert("RGB")))
            continue
        path = Path(item)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is lower
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise LlavaConvertError(
                            f"{path}: {w}x{h} pixels ({w * h / 1e6:.0f} M); images are limited to "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} M pixels"
                        )
                    out.append((path.name, im.convert("RGB")))
        except LlavaConvertError:
            raise
        except FileNotFoundError:
            raise LlavaConvertError(f"{path}: image file not found") from None
        except Image.DecompressionBombError:
            raise LlavaConvertError(
                f"{path}: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} M pixels; images are limited to "
                f"{MAX_IMAGE_PIXELS / 1e6:.0f} M pixels"
            ) from None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError for corrupt files
            raise LlavaConvertError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return out



# ----------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HASHED = (
    "config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def source_hashes(directory: Path) -> dict[str, str]:
    """sha256 of the config and weight-index files (and processor files) present in DIRECTORY."""
    return {name: _sha256(directory / name) for name in _HASHED if (directory / name).is_file()}


def versions() -> dict[str, str | None]:
    """Versions of what produced the numbers (bitsandbytes only when installed)."""
    out: dict[str, str | None] = {"llava_convert": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "tokenizers", "pillow", "bitsandbytes"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist != "bitsandbytes":
                out[dist] = None
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def check(original: Path | str, converted: Path | str, options: CheckOptions | None = None) -> CheckReport:
    """Compare an original LLaVA checkpoint with its Hugging Face conversion on the same inputs.

    The original runs through the authors' forward pass (`reference.ReferenceModel`; for the LLaVA-NeXT
    repository's families `reference_next.NextReferenceModel`), the converted checkpoint
    through transformers 5 (`AutoModelForImageTextToText` + `AutoProcessor.apply_chat_template`). The models are
    never resident together.

    Args:
        original: the original checkpoint: a directory or a Hub repo id (fetched, or read from the HF cache).
        converted: the converted (optionally bitsandbytes-quantized) directory.
        options: images, prompt, dtype, thresholds, base LLM... (`CheckOptions`; default: its defaults).

    Returns:
        A `CheckReport`; `report.passed` is the verdict, `report.raise_for_verdict()` raises `CheckFailed`;
        `report.shared` names what of the original side is the converter's own code (not tested by the check).

    Raises:
        LlavaConvertError: unreadable inputs (directories, configs, weights, tokenizer, processor, images).

    Example:
        >>> options = CheckOptions(vision_tower="clip-vit-large-patch14-336", low_memory=True)
        >>> report = check("llava-v1.5-7b", "llava-1.5-7b-hf", options)
        >>> print(report.summary())
    """
    with quiet():
        return _check(Path(original), Path(converted), options if options is not None else CheckOptions())


def _check(original: Path, converted: Path, opts: CheckOptions) -> CheckReport:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if opts.progress else (lambda msg: None)
    # Validate both sides before running anything.
    original = locate(original, role="SOURCE").path  # a directory, or a Hub repo id (its cached snapshot)
    conv_config = read_converted_config(converted)
    processor = load_processor(converted)
    quant = quantization_type(conv_config)
    thresholds = thresholds_for(opts.dtype, quant, atol=opts.atol, min_top1=opts.min_top1, max_kl=opts.max_kl)
    pictures = _load_images(opts.images)
    notes: list[str] = []
    if quant is not None and opts.atol is not None:
        notes.append(f"--atol ignored: {quant}-quantized checkpoints are judged by KL and top-1")

    # The original side first; it is freed before the converted model is loaded.
    streamed = ", streamed" if opts.low_memory else ""
    log(f"original: {original} (authors' forward pass{streamed})")
    # The CLIP tower attends with the converted side's kernel: the LLaVA-NeXT authors' transformers rounds CLIP
    # attention differently (queries scaled before the product; up to ~1.5e-4 in float32 logits), a property of
    # the transformers version, not of the conversion. The oracle tier proves the authors' kernel itself.
    ref = open_reference(
        original,
        clip_attention=ConvertedModel.ATTENTION["vision_config"],
        vision_tower=opts.vision_tower,
        dtype=opts.dtype,
        low_memory=opts.low_memory,
        base=opts.base,
        delta=opts.delta,
    )
    vocab = ref.vocab_size
    anyres = str(ref.config.get("image_aspect_ratio")).startswith("anyres")  # anyres, anyres_max_N
    shared = shared_parts(ref)
    downcast = storage_downcast(ref, converted)
    if downcast and quant is None and opts.atol is None:
        thresholds = replace(thresholds, atol=None, max_kl=min(thresholds.max_kl * 10, 1e-3), stage_nmse=1e-4)
        notes.append(
            f"the converted checkpoint stores {downcast} with less precision than the original "
            "(e.g. a float32 CLIP tower saved as float16): judged by KL, top-1 and greedy tokens, not atol; "
            "convert with --dtype float32 for an exact comparison"
        )
    orig_runs = run_original(ref, pictures, opts.prompt, opts.max_new_tokens)
    ref.close()
    del ref
    gc.collect()

    log(f"converted: {converted} (transformers{streamed})")
    model = ConvertedModel(converted, dtype=opts.dtype, low_memory=opts.low_memory, processor=processor)
    conv_runs = [
        model.run(img, opts.prompt, o.input_ids, opts.max_new_tokens, vocab)
        for (_, img), o in zip(pictures, orig_runs, strict=False)
    ]
    notes += model.notes
    missing = model.missing
    model.close()
    del model

    reports = [
        compare(name, img.size, o, c, thresholds, vocab, opts.prompt, anyres)
        for (name, img), o, c in zip(pictures, orig_runs, conv_runs, strict=False)
    ]
    reasons = verdict(reports, thresholds)
    if missing:
        reasons.insert(
            0,
            f"the converted checkpoint lacks {len(missing)} weight(s) transformers initialised "
            f"randomly: {', '.join(missing[:3])}",
        )
    return CheckReport(
        original=str(original),
        converted=str(converted),
        dtype=opts.dtype,
        quantization=quant,
        low_memory=opts.low_memory,
        prompt=opts.prompt,
        max_new_tokens=opts.max_new_tokens,
        thresholds=thresholds,
        images=reports,
        reasons=reasons,
        notes=notes,
        versions=versions(),
        sources={"original": source_hashes(original), "converted": source_hashes(converted)},
        shared=shared,
    )

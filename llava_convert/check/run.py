"""`check`: run an original checkpoint (the authors' forward pass, `reference.py`) and its conversion
(transformers 5) on the same images and prompt, and compare them stage by stage.

The two models are never resident together: the original runs first, its stage outputs are kept, it is freed,
then the converted model runs. Figures: logits max/mean abs diff and NMSE over the original vocabulary,
KL(original || converted), top-1 agreement, greedy generation, pixel_values and prompt-id agreement. Stage
localisation names the first stage (prompt ids, pixel values, vision features, projector, merge, embeddings,
each decoder layer, final norm, logits) beyond tolerance, with a hint where a known mistake fits.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import CheckFailed, LlavaConvertError
from .readers import TensorRef, read_checkpoint
from .reference import (
    CONV_TEMPLATES,
    DTYPES,
    IMAGE_TOKEN_INDEX,
    TEXT_ATTENTION,
    VISION_ATTENTION,
    ImageStages,
    LayerStreamer,
    Recorder,
    ReferenceModel,
    load_outside,
    materialize_buffers,
    quiet,
)
from .source import read_json

DEFAULT_PROMPT = "What is shown in this image?"
DEFAULT_MAX_NEW_TOKENS = 8
HF_MODEL_TYPES = ("llava", "llava_next")


# ----------------------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """What counts as agreement.

    Unquantized: logits within `atol`; every stage within `atol + rtol * max|reference stage|`; identical greedy
    generation. Quantized: distribution-level only (`max_kl`, `min_top1`), stages by `stage_nmse`, no atol.
    Always: identical prompt ids, pixel_values within `pixel_atol`.
    """

    atol: float | None
    rtol: float
    max_kl: float
    min_top1: float
    stage_nmse: float | None = None
    pixel_atol: float = 1e-5
    require_generation: bool = True
    quantized: bool = False  # judged as a quantized checkpoint (its stage hints blame quantization error)


FLOAT_THRESHOLDS: dict[str, Thresholds] = {
    "float32": Thresholds(atol=1e-4, rtol=1e-5, max_kl=1e-4, min_top1=0.99),
    "bfloat16": Thresholds(atol=5e-2, rtol=1e-2, max_kl=1e-2, min_top1=0.95),
}
# bitsandbytes: int8 (LLM.int8) keeps far more of the distribution than 4-bit; fp4 is the loosest.
QUANT_THRESHOLDS: dict[str, Thresholds] = {
    "int8": Thresholds(
        atol=None, rtol=0.0, max_kl=0.05, min_top1=0.90, stage_nmse=0.01, require_generation=False, quantized=True
    ),
    "nf4": Thresholds(
        atol=None, rtol=0.0, max_kl=0.25, min_top1=0.75, stage_nmse=0.05, require_generation=False, quantized=True
    ),
    "fp4": Thresholds(
        atol=None, rtol=0.0, max_kl=0.35, min_top1=0.70, stage_nmse=0.08, require_generation=False, quantized=True
    ),
}


def quantization_type(config: dict[str, Any]) -> str | None:
    """`int8` / `nf4` / `fp4` from a converted config's `quantization_config`, or None when not quantized."""
    q = config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return str(q.get("quant_method"))
    if q.get("load_in_8bit"):
        return "int8"
    if q.get("load_in_4bit"):
        return str(q.get("bnb_4bit_quant_type", "fp4"))
    return "bitsandbytes"


def thresholds_for(
    dtype: str,
    quant: str | None,
    *,
    atol: float | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
) -> Thresholds:
    """Defaults for DTYPE / QUANT, with the caller's overrides (atol is ignored for quantized checkpoints)."""
    if quant is None:
        base = FLOAT_THRESHOLDS[dtype]
    else:
        base = QUANT_THRESHOLDS.get(quant, QUANT_THRESHOLDS["fp4"])
    changes: dict[str, Any] = {}
    if atol is not None and quant is None:
        changes["atol"] = atol
    if min_top1 is not None:
        changes["min_top1"] = min_top1
    if max_kl is not None:
        changes["max_kl"] = max_kl
    return Thresholds(**{**asdict(base), **changes})


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StageDiff:
    """One row of the stage table."""

    stage: str
    ok: bool
    max_abs: float | None = None
    mean_abs: float | None = None
    nmse: float | None = None
    tol: float | None = None
    note: str = ""


@dataclass
class ImageReport:
    """Figures for one image."""

    name: str
    size: tuple[int, int]
    prompt_ids_match: bool
    prompt_tokens: tuple[int, int]  # (original, converted) with the image counted once
    image_tokens: tuple[int, int]  # (original, converted)
    pixel_max_diff: float | None
    logits_max_abs: float | None = None
    logits_mean_abs: float | None = None
    logits_nmse: float | None = None
    kl: float | None = None
    top1: float | None = None
    positions: int = 0
    generated_original: list[int] = field(default_factory=list)
    generated_converted: list[int] = field(default_factory=list)
    stages: list[StageDiff] = field(default_factory=list)
    first_divergence: str | None = None
    hint: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def generation_match(self) -> bool:
        return self.generated_original == self.generated_converted

    @property
    def generation_agreeing(self) -> int:
        n = 0
        for a, b in zip(self.generated_original, self.generated_converted, strict=False):
            if a != b:
                break
            n += 1
        return n


@dataclass
class CheckReport:
    """The outcome of `check`: figures, thresholds, verdict, stage tables, provenance."""

    original: str
    converted: str
    dtype: str
    quantization: str | None
    low_memory: bool
    prompt: str
    max_new_tokens: int
    thresholds: Thresholds
    images: list[ImageReport]
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def first_divergence(self) -> tuple[str, str | None] | None:
        for im in self.images:
            if im.first_divergence:
                return im.first_divergence, im.hint
        return None

    def figures(self) -> dict[str, Any]:
        """Aggregates over images: worst diffs, worst KL, lowest top-1."""

        def worst(attr, fn=max):
            vals = [getattr(i, attr) for i in self.images if getattr(i, attr) is not None]
            return fn(vals) if vals else None

        means = [i.logits_mean_abs for i in self.images if i.logits_mean_abs is not None]
        return {
            "logits_max_abs_diff": worst("logits_max_abs"),
            "logits_mean_abs_diff": sum(means) / len(means) if means else None,
            "logits_nmse": worst("logits_nmse"),
            "kl": worst("kl"),
            "top1_agreement": worst("top1", min),
            "generation_match": all(i.generation_match for i in self.images),
            "generation_tokens": [i.generation_agreeing for i in self.images],
            "max_new_tokens": self.max_new_tokens,
            "pixel_values_max_diff": worst("pixel_max_diff"),
            "prompt_ids_match": all(i.prompt_ids_match for i in self.images),
        }

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "verdict": "pass" if self.passed else "fail",
            "reasons": self.reasons,
            "first_divergence": {"stage": first[0], "hint": first[1]} if first else None,
            "figures": self.figures(),
            "thresholds": asdict(self.thresholds),
            "settings": {
                "original": self.original,
                "converted": self.converted,
                "dtype": self.dtype,
                "quantization": self.quantization,
                "low_memory": self.low_memory,
                "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens,
            },
            "images": [
                {
                    **{k: v for k, v in asdict(im).items() if k != "stages"},
                    "generation_match": im.generation_match,
                    "stages": [asdict(s) for s in im.stages],
                }
                for im in self.images
            ],
            "notes": self.notes,
            "versions": self.versions,
            "sources": self.sources,
        }

    def write_json(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A short human-readable summary (what the CLI prints)."""
        f = self.figures()
        t = self.thresholds
        mode = f"{self.dtype}" + (f", {self.quantization} quantized" if self.quantization else "")
        lines = [f"check {self.original} -> {self.converted} ({mode}, {len(self.images)} image(s))"]
        for im in self.images:
            gen = f"{im.generation_agreeing}/{max(len(im.generated_original), len(im.generated_converted))}"
            if im.prompt_ids_match:
                img = f"{im.image_tokens[0]} image tokens" + (
                    f", converted {im.image_tokens[1]}" if im.image_tokens[1] != im.image_tokens[0] else ""
                )
                ids = f"prompt ids match ({im.prompt_tokens[0]} tokens, {img})"
            else:
                ids = f"prompt ids DIFFER ({im.prompt_tokens[1]} tokens, authors' {im.prompt_tokens[0]})"
            lines.append(
                f"  {im.name} {im.size[0]}x{im.size[1]}: {ids}, pixel_values max diff {_fmt(im.pixel_max_diff)}"
            )
            for n in im.notes:
                lines.append(f"    ({n})")
            if im.error:
                lines.append(f"    converted model failed: {im.error}")
            else:
                lines.append(
                    f"    logits max {_fmt(im.logits_max_abs)} mean {_fmt(im.logits_mean_abs)} "
                    f"NMSE {_fmt(im.logits_nmse)} | KL {_fmt(im.kl)} | top-1 {_pct(im.top1)} | greedy {gen} "
                    + ("match" if im.generation_match else "DIFFER")
                )
            if im.first_divergence:
                row = next((s for s in im.stages if s.stage == im.first_divergence), None)
                detail = ""
                if row is not None and row.max_abs is not None and row.tol is not None:
                    detail = f" (max diff {_fmt(row.max_abs)}, tol {_fmt(row.tol)})"
                elif row is not None and row.nmse is not None:
                    detail = f" (NMSE {_fmt(row.nmse)} > {_fmt(t.stage_nmse)})"
                elif row is not None and row.note:
                    detail = f" ({row.note})"
                lines.append(
                    f"    diverges at {im.first_divergence}{detail}" + (f": {im.hint}" if im.hint else "")
                )
        lim = f"atol {_fmt(t.atol)}, " if t.atol is not None else ""
        lines.append(
            f"  thresholds: {lim}KL <= {_fmt(t.max_kl)}, top-1 >= {_pct(t.min_top1)}"
            + (", identical greedy tokens" if t.require_generation else "")
        )
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.passed:
            lines.append(
                f"PASS: logits max diff {_fmt(f['logits_max_abs_diff'])}, KL {_fmt(f['kl'])}, "
                f"top-1 {_pct(f['top1_agreement'])}"
            )
        else:
            lines.append("FAIL: " + "; ".join(self.reasons))
        return "\n".join(lines)

    def raise_for_verdict(self) -> None:
        """Raise `CheckFailed` (CLI exit 1) with the first reason and divergence when the check failed."""
        if self.passed:
            return
        first = self.first_divergence
        where = (
            f"diverges at {first[0]}" + (f": {first[1]}" if first[1] else "") if first else self.reasons[0]
        )
        raise CheckFailed(f"{self.converted} disagrees with {self.original}: {where}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def builtin_image(width: int = 300, height: int = 180, seed: int = 0) -> Image.Image:
    """A deterministic non-square test image: colour gradients, a ripple, seeded noise and hard-edged shapes,
    so that padding, cropping, resizing and tiling all change the pixels."""
    import numpy as np
    from PIL import ImageDraw

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
# The original side
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OriginalRun:
    """What the original side recorded for one image."""

    prompt: str
    input_ids: list[int]
    stages: ImageStages
    inputs_embeds: torch.Tensor
    layers: list[torch.Tensor]
    norm: torch.Tensor
    logits: torch.Tensor
    generated: list[int]
    image_pos: int
    image_tokens: int


def run_original(
    ref: ReferenceModel, images: list[tuple[str, Image.Image]], question: str, max_new_tokens: int
) -> list[OriginalRun]:
    """Run the reference on every image; returns CPU tensors only (the model can be freed afterwards)."""
    prompt = ref.prompt(question)
    ids = ref.input_ids(prompt)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise LlavaConvertError(
            f"--prompt must not contain <image> itself (the prompt has {ids.count(IMAGE_TOKEN_INDEX)})"
        )
    runs = []
    for _, image in images:
        stages = ref.encode(image)
        embeds = ref.embed(ids, stages.merged)
        fw = ref.forward(embeds)
        gen = ref.generate(embeds, max_new_tokens)
        runs.append(
            OriginalRun(
                prompt,
                ids,
                stages,
                fw.inputs_embeds,
                fw.layers,
                fw.norm,
                fw.logits,
                gen,
                ids.index(IMAGE_TOKEN_INDEX),
                stages.merged.shape[0],
            )
        )
    return runs


# ----------------------------------------------------------------------------------------------------------
# The converted side
# ----------------------------------------------------------------------------------------------------------

_LAYERS = "model.language_model.layers."


def hf_weight_name(name: str) -> str:
    """A converted checkpoint's tensor name -> the transformers 5 module path (legacy and v5 layouts)."""
    rules = (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return "model.image_newline" if name == "image_newline" else name


@dataclass
class ConvertedRun:
    """What the converted side recorded for one image."""

    prompt: str
    input_ids: list[int]  # as the processor produced them
    used_ids: list[int]  # what the numbers below were computed on
    pixel_values: torch.Tensor
    vision_features: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    norm: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    image_tokens: int = 0
    image_pos: int = 0
    image_token_id: int = -1
    error: str | None = None


def read_converted_config(path: Path) -> dict[str, Any]:
    """The converted config.json as a dict, refusing anything that is not a HF llava / llava_next checkpoint."""
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: no such directory")
    cfg_path = path / "config.json"
    config = read_json(cfg_path)
    model_type = config.get("model_type")
    if "text_config" not in config or model_type not in HF_MODEL_TYPES:
        what = (
            "an original LLaVA checkpoint (pass it as ORIGINAL)"
            if "mm_vision_tower" in config
            else (f"model_type {model_type!r}")
        )
        raise LlavaConvertError(
            f"{cfg_path}: not a converted checkpoint: {what}; expected a Hugging Face "
            f"{' or '.join(HF_MODEL_TYPES)} config with text_config"
        )
    return config


def load_processor(path: Path):
    """`AutoProcessor` of the converted checkpoint (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    with quiet():
        try:
            return AutoProcessor.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable processors
            first = str(e).split(". ")[0].split("\n")[0]
            raise LlavaConvertError(
                f"{path}: cannot load the processor ({type(e).__name__}: {first})"
            ) from None


class ConvertedModel:
    """A converted checkpoint loaded with transformers 5 (`AutoModelForImageTextToText`, `AutoProcessor`)."""

    def __init__(self, path: Path, *, dtype: str, low_memory: bool, processor=None):
        self.path = path
        self.config = read_converted_config(path)
        self.quant = quantization_type(self.config)
        self.dtype = DTYPES[dtype]
        self.notes: list[str] = []
        self.missing: list[str] = []
        self.processor = processor if processor is not None else load_processor(path)
        self._streamer = None
        if low_memory and self.quant is None:
            self.model = self._load_streaming()
        else:
            if low_memory:
                self.notes.append(
                    "quantized converted model loaded whole (--low-memory streams the original only)"
                )
            self.model = self._load()
            if self.model.dtype != self.dtype:
                self.notes.append(
                    f"converted model runs in {str(self.model.dtype).removeprefix('torch.')}, "
                    f"its stored dtype ({self.quant}-quantized checkpoints load as stored)"
                )
        self.model.eval()
        cfg = self.model.config
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        inner = self.model.model
        self.recorder = Recorder(inner.language_model.layers, inner.language_model.norm)
        self._captured: dict[str, torch.Tensor] = {}
        self._hook = inner.multi_modal_projector.register_forward_hook(self._capture_projector)

    _ATTN = {"text_config": TEXT_ATTENTION, "vision_config": VISION_ATTENTION, "": TEXT_ATTENTION}

    def _load(self):
        from transformers import AutoModelForImageTextToText

        if self.quant is not None:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise LlavaConvertError(
                    f"{self.path / 'config.json'}: {self.quant}-quantized checkpoint; install bitsandbytes to check it"
                ) from None
        # A bitsandbytes checkpoint is loaded as a user loads it, in its stored dtype: transformers casts only
        # the tensors outside its quantized-weight mapping to a different `dtype` (biases but not the weights
        # of the modules left unquantized), and that mixed model cannot run.
        dtype = "auto" if self.quant is not None else self.dtype
        try:
            with quiet():
                model, info = AutoModelForImageTextToText.from_pretrained(
                    str(self.path), dtype=dtype, attn_implementation=self._ATTN, output_loading_info=True
                )
        except LlavaConvertError:
            raise
        except Exception as e:  # noqa: BLE001
            raise LlavaConvertError(
                f"{self.path}: transformers cannot load it ({type(e).__name__}: {e})"
            ) from None
        self.missing = sorted(info.get("missing_keys", []))
        return model

    def _load_streaming(self):
        from transformers import AutoConfig, AutoModelForImageTextToText

        with quiet():
            cfg = AutoConfig.from_pretrained(str(self.path))
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=self._ATTN)
        refs = {hf_weight_name(k): r for k, r in read_checkpoint(self.path).items()}
        embed = "model.language_model.embed_tokens.weight"
        if "lm_head.weight" not in refs and cfg.get_text_config().tie_word_embeddings and embed in refs:
            refs["lm_head.weight"] = refs[embed]
        n = cfg.get_text_config().num_hidden_layers
        per_layer: list[dict[str, TensorRef]] = [{} for _ in range(n)]
        rest: dict[str, TensorRef] = {}
        for k, r in refs.items():
            if k.startswith(_LAYERS):
                i, _, sub = k[len(_LAYERS) :].partition(".")
                if i.isdigit() and int(i) < n:
                    per_layer[int(i)][sub] = r
                    continue
            rest[k] = r
        load_outside(model, rest, self.dtype, skip=_LAYERS, where=str(self.path))
        layers = model.model.language_model.layers
        self._streamer = LayerStreamer(layers, lambda i: per_layer[i], self.dtype, str(self.path))
        materialize_buffers(model)
        return model

    def _capture_projector(self, module, args, output):
        self._captured["vision"] = args[0].detach().float().clone()
        self._captured["projector"] = output.detach().float().clone()

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def generation_config(self, max_new_tokens: int):
        gc_ = copy.deepcopy(self.model.generation_config)
        gc_.update(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            temperature=None,
            top_p=None,
            top_k=None,
            max_length=None,
        )
        return gc_

    @torch.inference_mode()
    def run(
        self, image: Image.Image, question: str, original_ids: list[int], max_new_tokens: int
    ) -> ConvertedRun:
        try:
            prompt = self.prompt(question)
        except Exception as e:  # noqa: BLE001 - a missing/broken template is a finding, not a crash
            prompt = f"<no prompt: {type(e).__name__}: {e}>"
        with quiet():
            text = prompt if not prompt.startswith("<no prompt") else "<image>\n" + question
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        n_img = ids.count(self.image_token_id)
        run = ConvertedRun(
            prompt,
            ids,
            ids,
            inputs["pixel_values"].float().clone(),
            image_tokens=n_img,
            image_token_id=self.image_token_id,
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if collapse_image_tokens(ids, self.image_token_id) != original_ids and n_img:
            # Different text: compute the numbers on the original's ids (image expanded as the processor does)
            # so every later stage still lines up position by position.
            used = []
            for t in original_ids:
                used.extend([self.image_token_id] * n_img if t == IMAGE_TOKEN_INDEX else [t])
            run.used_ids = used
            inputs["input_ids"] = torch.tensor([used])
            inputs["attention_mask"] = torch.ones(1, len(used), dtype=torch.long)
        run.image_pos = run.used_ids.index(self.image_token_id) if n_img else 0
        self._captured = {}
        try:
            with quiet(), self.recorder.recording() as rec:
                out = self.model(**inputs, use_cache=False)
            run.logits = out.logits[0].float()
            run.inputs_embeds, run.norm = rec.embeds, rec.norm
            run.layers = [rec.layers[i] for i in range(len(rec.layers))]
            run.vision_features = self._captured.get("vision")
            run.image_features = self._captured.get("projector")
            if max_new_tokens > 0:
                with quiet():
                    gen = self.model.generate(
                        **inputs, generation_config=self.generation_config(max_new_tokens)
                    )
                run.generated = gen[0, len(run.used_ids) :].tolist()
        except Exception as e:  # noqa: BLE001 - a converted model that cannot run is a failed check
            run.error = f"{type(e).__name__}: {e}".split("\n")[0]
            # The vision stages may have run before the failure (e.g. a feature/token count mismatch).
            run.vision_features = self._captured.get("vision")
            run.image_features = self._captured.get("projector")
        return run

    def close(self) -> None:
        self.recorder.remove()
        self._hook.remove()
        if self._streamer is not None:
            self._streamer.remove()
        self.model = None


def collapse_image_tokens(ids: list[int], image_id: int) -> list[int]:
    """HF repeats the image token once per feature; the authors' prompt has one -200 per image."""
    out: list[int] = []
    for t in ids:
        if t == image_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------


def _diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    ref, got = ref.float(), got.float()
    d = (ref - got).abs()
    denom = float(ref.pow(2).sum())
    nmse = (
        float((ref - got).pow(2).sum()) / denom
        if denom > 0
        else (0.0 if float(d.max()) == 0 else float("inf"))
    )
    return float(d.max()), float(d.mean()), nmse


class _Stages:
    """Builds the stage table for one image."""

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds
        self.rows: list[StageDiff] = []
        self.hints: dict[str, str] = {}

    def tol(self, ref: torch.Tensor) -> float | None:
        if self.t.atol is None:
            return None
        return self.t.atol + self.t.rtol * float(ref.float().abs().max()) if ref.numel() else self.t.atol

    def close(self, ref: torch.Tensor, got: torch.Tensor) -> bool:
        """Within this stage's tolerance (used to match alternatives too)."""
        if ref.shape != got.shape:
            return False
        mx, _, nmse = _diff(ref, got)
        if self.t.atol is None:
            return nmse <= (self.t.stage_nmse or 0.0)
        return mx <= (self.tol(ref) or 0.0)

    def add(
        self,
        stage: str,
        ref: torch.Tensor | None,
        got: torch.Tensor | None,
        hint: Callable[[], str | None] | None = None,
        note: str = "",
    ) -> StageDiff:
        if ref is None or got is None:
            row = StageDiff(stage, ok=False, note=note or "not produced by the converted model")
        elif ref.shape != got.shape:
            row = StageDiff(stage, ok=False, note=f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        else:
            mx, mean, nmse = _diff(ref, got)
            tol = self.tol(ref)
            ok = mx <= tol if tol is not None else nmse <= (self.t.stage_nmse or 0.0)
            row = StageDiff(stage, ok, mx, mean, nmse, tol, note)
        self.rows.append(row)
        if not row.ok and hint is not None:
            h = hint()
            if h:
                self.hints[stage] = h
        return row

    def first(self) -> tuple[str | None, str | None]:
        for r in self.rows:
            if not r.ok:
                return r.stage, self.hints.get(r.stage)
        return None, None


def _template_hint(conv_prompt: str, question: str) -> str:
    from .reference import authors_prompt

    if conv_prompt.startswith("<no prompt"):
        return "prompt ids differ: the converted processor has no usable chat template"
    for mode in CONV_TEMPLATES:
        if authors_prompt(question, mode) == conv_prompt:
            return f"prompt ids differ: wrong chat template? (the converted template renders the authors' {mode!r})"
    return "prompt ids differ: wrong chat template?"


def compare(
    name: str,
    size: tuple[int, int],
    orig: OriginalRun,
    conv: ConvertedRun,
    thresholds: Thresholds,
    vocab: int,
    question: str,
    anyres: bool,
) -> ImageReport:
    """Figures and the stage table for one image."""
    t = thresholds
    st = _Stages(t)
    conv_text = collapse_image_tokens(conv.input_ids, conv.image_token_id)
    ids_match = conv_text == orig.input_ids
    rep = ImageReport(
        name,
        size,
        ids_match,
        (len(orig.input_ids), len(conv_text)),
        (orig.image_tokens, conv.image_tokens),
        None,
    )
    st.rows.append(StageDiff("prompt ids", ids_match))
    if not ids_match:
        st.hints["prompt ids"] = _template_hint(conv.prompt, question)
        rep.notes.append("the figures below are computed on the authors' prompt ids")

    # pixel values: compare tiles as a flat batch
    o_pv, c_pv = orig.stages.pixel_values, conv.pixel_values
    o_flat = o_pv.reshape(-1, *o_pv.shape[-3:])
    c_flat = c_pv.reshape(-1, *c_pv.shape[-3:])
    if c_pv.ndim == 5 and o_pv.ndim == 5:
        c_flat = c_flat[: o_flat.shape[0]] if c_flat.shape[0] >= o_flat.shape[0] else c_flat
    pix = StageDiff("pixel_values", ok=False)
    if o_flat.shape == c_flat.shape:
        mx, mean, nmse = _diff(o_flat, c_flat)
        rep.pixel_max_diff = mx
        pix = StageDiff("pixel_values", mx <= t.pixel_atol, mx, mean, nmse, t.pixel_atol)
    else:
        pix.note = f"shape {tuple(c_flat.shape)}, expected {tuple(o_flat.shape)}"
    st.rows.append(pix)
    if not pix.ok:
        st.hints["pixel_values"] = _pixel_hint(orig, c_flat, t, anyres)

    s = orig.stages
    if conv.error is None or conv.vision_features is not None:
        st.add(
            "vision tower (features)",
            s.vision_features,
            conv.vision_features,
            lambda: _vision_hint(s, conv.vision_features, st),
        )
        st.add(
            "projector",
            s.image_features,
            conv.image_features,
            lambda: _projector_hint(s, conv.image_features, st),
        )
    if conv.error:
        rep.error = conv.error
        st.rows.append(StageDiff("converted forward", ok=False, note=conv.error))
        st.hints["converted forward"] = "the converted model raised instead of running"
        rep.stages = st.rows
        rep.first_divergence, rep.hint = st.first()
        rep.generated_original = orig.generated
        return rep

    # Align the language-model sequences: text before the image, the image, text after it.
    o_len, c_len = (
        orig.inputs_embeds.shape[0],
        conv.inputs_embeds.shape[0] if conv.inputs_embeds is not None else 0,
    )
    pre = orig.image_pos
    o_suf = o_len - pre - orig.image_tokens
    c_suf = c_len - conv.image_pos - conv.image_tokens
    same_image = orig.image_tokens == conv.image_tokens
    text_aligned = pre == conv.image_pos and o_suf == c_suf
    if text_aligned:
        o_idx = list(range(pre)) + (list(range(pre, pre + orig.image_tokens)) if same_image else [])
        c_idx = list(range(pre)) + (list(range(pre, pre + conv.image_tokens)) if same_image else [])
        o_idx += list(range(pre + orig.image_tokens, o_len))
        c_idx += list(range(conv.image_pos + conv.image_tokens, c_len))
    else:
        o_idx = c_idx = []
    note = (
        "" if same_image else f"image tokens {conv.image_tokens} vs {orig.image_tokens}: text positions only"
    )

    if anyres:
        got = (
            conv.inputs_embeds[conv.image_pos : conv.image_pos + conv.image_tokens]
            if conv.inputs_embeds is not None
            else None
        )
        st.add("image merge (unpad + newline)", s.merged, got, lambda: _merge_hint(s, got))
    if text_aligned and conv.inputs_embeds is not None:
        oi, ci = torch.tensor(o_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long)
        quant = t.quantized

        def lm_hint(text: str) -> Callable[[], str]:
            if quant:
                return lambda: (
                    "quantization error exceeds the stage threshold from here on (a lighter quantization?)"
                )
            return lambda: text

        st.add(
            "embeddings",
            orig.inputs_embeds[oi],
            conv.inputs_embeds[ci],
            lm_hint("text embeddings differ (embed_tokens rows or the image token's position?)"),
            note=note,
        )
        for i, (lo, lc) in enumerate(zip(orig.layers, conv.layers, strict=False)):
            st.add(
                f"decoder layer {i}",
                lo[oi],
                lc[ci],
                lm_hint(f"decoder layer {i} weights differ (corrupted, misordered or mis-mapped layer?)"),
                note=note,
            )
        if len(conv.layers) != len(orig.layers):
            st.rows.append(
                StageDiff(
                    "decoder layers", False, note=f"{len(conv.layers)} layers, expected {len(orig.layers)}"
                )
            )
        st.add("final norm", orig.norm[oi], conv.norm[ci], lm_hint("final norm weight differs?"), note=note)
        lo_, lc_ = orig.logits[oi], conv.logits[ci][:, :vocab]
        st.add("logits", lo_, lc_, lm_hint("lm_head differs (tied or padded vocabulary rows?)"), note=note)
        mx, mean, nmse = _diff(lo_, lc_)
        rep.logits_max_abs, rep.logits_mean_abs, rep.logits_nmse = mx, mean, nmse
        lp_o = torch.log_softmax(lo_.double(), -1)
        lp_c = torch.log_softmax(lc_.double(), -1)
        rep.kl = float((lp_o.exp() * (lp_o - lp_c)).sum(-1).mean())
        rep.top1 = float((lo_.argmax(-1) == lc_.argmax(-1)).float().mean())
        rep.positions = len(o_idx)
    else:
        st.rows.append(StageDiff("embeddings", False, note="the sequences cannot be aligned"))
    rep.generated_original = orig.generated
    rep.generated_converted = conv.generated
    rep.stages = st.rows
    rep.first_divergence, rep.hint = st.first()
    return rep


def _pixel_hint(orig: OriginalRun, c_flat: torch.Tensor, t: Thresholds, anyres: bool) -> str:
    alt = orig.stages.alternatives
    for key, text in (
        (
            "pixel_values:crop",
            "pixel_values differ: pad vs centre-crop? (the converted processor centre-crops; "
            "the authors pad to a square with the mean colour: do_pad)",
        ),
        (
            "pixel_values:pad",
            "pixel_values differ: pad vs centre-crop? (the converted processor pads; the authors "
            "resize and centre-crop)",
        ),
    ):
        a = alt.get(key)
        if a is not None:
            a = a.reshape(-1, *a.shape[-3:])
            if a.shape == c_flat.shape and float((a - c_flat).abs().max()) <= t.pixel_atol:
                return text
    transposed = alt.get("pixel_values:pinpoints_hw")
    if transposed is not None:
        transposed = transposed.reshape(-1, *transposed.shape[-3:])
        if transposed.shape == c_flat.shape and float((transposed - c_flat).abs().max()) <= t.pixel_atol:
            return (
                "pixel_values differ: the transposed anyres grid; image_grid_pinpoints were copied as the authors "
                "wrote them, but the authors read each pair as (width, height) and transformers as (height, "
                "width), so where candidates tie (an image no larger than the tower) another grid wins; "
                "convert again with this llava-convert, which writes the pairs swapped"
            )
    if anyres and c_flat.shape[0] != orig.stages.pixel_values.reshape(-1, *c_flat.shape[-3:]).shape[0]:
        return "pixel_values differ: a different anyres grid (image_grid_pinpoints?)"
    return "pixel_values differ: image processor settings (size, crop, resample, mean/std, do_pad)?"


def _vision_hint(s: ImageStages, got: torch.Tensor | None, st: _Stages) -> str | None:
    if got is None:
        return None
    ref = s.vision_features
    if got.shape != ref.shape:
        if got.shape[:1] == ref.shape[:1] and abs(got.shape[1] - ref.shape[1]) == 1:
            return "vision_feature_select_strategy differs (CLS token kept vs dropped)?"
        return "vision features have another shape (tower config or crops differ)"
    for i, feats in s.vision_hidden_states.items():
        if i != s.select_layer and st.close(feats, got):
            return (
                f"vision_feature_layer off by one? (the converted features are the authors' "
                f"hidden_states[{i - s.num_hidden_states}], not [{s.select_layer - s.num_hidden_states}])"
            )
    if "vision:stock" in s.alternatives and st.close(s.alternatives["vision:stock"], got):
        return "stock CLIP instead of the checkpoint's fine-tuned tower?"
    if "vision:stray" in s.alternatives and st.close(s.alternatives["vision:stray"], got):
        return "the checkpoint's unused vision_tower.* weights instead of the tower directory's?"
    return "vision tower weights or config differ"


def _projector_hint(s: ImageStages, got: torch.Tensor | None, st: _Stages) -> str | None:
    if got is None:
        return None
    for key, text in (
        ("projector:swapped", "projector layers swapped?"),
        ("projector:no_activation", "projector activation missing (projector_hidden_act)?"),
        ("projector:gelu", "GELU applied to a linear projector (projector_hidden_act should be linear)?"),
    ):
        a = s.alternatives.get(key)
        if a is not None and st.close(a, got):
            return text
    return "projector weights differ (linear_1/linear_2 mapping?)"


def _merge_hint(s: ImageStages, got: torch.Tensor | None) -> str | None:
    if got is None:
        return None
    if got.shape != s.merged.shape:
        return "a different number of image features (anyres grid or unpadding: image_grid_pinpoints?)"
    rows = s.newline_rows
    diff = (s.merged.float() - got.float()).abs().amax(-1)
    if rows.any() and (~rows).any() and float(diff[~rows].max()) <= 1e-3 * float(diff[rows].max()):
        return "image_newline differs?"
    return "image features merged differently (unpad / tile order)?"


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
    from importlib import metadata

    from . import __version__

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


def check(
    original: Path | str,
    converted: Path | str,
    *,
    vision_tower: Path | str | None = None,
    images: Sequence[Path | str | Image.Image] | None = None,
    prompt: str = DEFAULT_PROMPT,
    dtype: str = "float32",
    atol: float | None = None,
    min_top1: float | None = None,
    max_kl: float | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    low_memory: bool = False,
    progress: bool = False,
    base: Path | str | None = None,
    delta: bool | None = None,
) -> CheckReport:
    """Compare an original LLaVA checkpoint with its Hugging Face conversion on the same inputs.

    The original runs through the authors' forward pass (`reference.ReferenceModel`), the converted checkpoint
    through transformers 5 (`AutoModelForImageTextToText` + `AutoProcessor.apply_chat_template`). The models are
    never resident together.

    Args:
        original: the original checkpoint: a directory or a Hub repo id (fetched, or read from the HF cache).
        converted: the converted (optionally bitsandbytes-quantized) directory.
        vision_tower: CLIP directory or Hub repo id for the original (default: its config's `mm_vision_tower`).
        images: image files or PIL images; default: one built-in, deterministic, non-square test image.
        prompt: the question asked about each image.
        dtype: compute dtype on both sides, "float32" or "bfloat16" (a quantized CONVERTED runs in its
            stored dtype).
        atol: absolute tolerance on logits (default per dtype; ignored for quantized checkpoints).
        min_top1: lowest acceptable top-1 agreement (default per dtype / quantization type).
        max_kl: largest acceptable mean KL(original || converted) (default per dtype / quantization type).
        max_new_tokens: greedy tokens generated and compared.
        low_memory: stream decoder layers one at a time on both sides (same figures, far less memory).
        progress: report what is running on stderr.
        base: the base LLM, when ORIGINAL is a LoRA adapter, a projector-only checkpoint or delta weights.
        delta: ORIGINAL is delta weights (default: by name, as `convert` decides).

    Returns:
        A `CheckReport`; `report.passed` is the verdict, `report.raise_for_verdict()` raises `CheckFailed`.

    Raises:
        LlavaConvertError: unreadable inputs (directories, configs, weights, tokenizer, processor, images).

    Example:
        >>> report = check("llava-v1.5-7b", "llava-1.5-7b-hf", vision_tower="clip-vit-large-patch14-336")
        >>> print(report.summary())
    """
    with quiet():
        return _check(
            Path(original),
            Path(converted),
            vision_tower=vision_tower,
            images=images,
            prompt=prompt,
            dtype=dtype,
            atol=atol,
            min_top1=min_top1,
            max_kl=max_kl,
            max_new_tokens=max_new_tokens,
            low_memory=low_memory,
            progress=progress,
            base=base,
            delta=delta,
        )


def _check(
    original: Path,
    converted: Path,
    *,
    vision_tower: Path | str | None,
    images: Sequence[Path | str | Image.Image] | None,
    prompt: str,
    dtype: str,
    atol: float | None,
    min_top1: float | None,
    max_kl: float | None,
    max_new_tokens: int,
    low_memory: bool,
    progress: bool,
    base: Path | str | None = None,
    delta: bool | None = None,
) -> CheckReport:
    if dtype not in ("float32", "bfloat16"):
        raise LlavaConvertError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    if max_new_tokens < 0:
        raise LlavaConvertError(f"--max-new-tokens {max_new_tokens}: must not be negative")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    # Validate both sides before running anything.
    from .hub import locate

    original = locate(original, role="SOURCE").path  # a directory, or a Hub repo id (its cached snapshot)
    conv_config = read_converted_config(converted)
    processor = load_processor(converted)
    quant = quantization_type(conv_config)
    thresholds = thresholds_for(dtype, quant, atol=atol, min_top1=min_top1, max_kl=max_kl)
    pictures = _load_images(images)
    notes: list[str] = []
    if quant is not None and atol is not None:
        notes.append(f"--atol ignored: {quant}-quantized checkpoints are judged by KL and top-1")

    # The original side first; it is freed before the converted model is loaded.
    log(f"original: {original} (authors' forward pass{', streamed' if low_memory else ''})")
    ref = ReferenceModel(
        original, vision_tower=vision_tower, dtype=dtype, low_memory=low_memory, base=base, delta=delta
    )
    vocab = ref.vocab_size
    anyres = ref.config.get("image_aspect_ratio") == "anyres"
    downcast = storage_downcast(ref, converted)
    if downcast and quant is None and atol is None:
        thresholds = replace(thresholds, atol=None, max_kl=min(thresholds.max_kl * 10, 1e-3), stage_nmse=1e-4)
        notes.append(
            f"the converted checkpoint stores {downcast} with less precision than the original "
            "(e.g. a float32 CLIP tower saved as float16): judged by KL, top-1 and greedy tokens, not atol; "
            "convert with --dtype float32 for an exact comparison"
        )
    orig_runs = run_original(ref, pictures, prompt, max_new_tokens)
    ref.close()
    del ref
    gc.collect()

    log(f"converted: {converted} (transformers{', streamed' if low_memory else ''})")
    model = ConvertedModel(converted, dtype=dtype, low_memory=low_memory, processor=processor)
    notes += model.notes
    conv_runs = [
        model.run(img, prompt, o.input_ids, max_new_tokens)
        for (_, img), o in zip(pictures, orig_runs, strict=False)
    ]
    missing = model.missing
    model.close()
    del model

    reports = [
        compare(name, img.size, o, c, thresholds, vocab, prompt, anyres)
        for (name, img), o, c in zip(pictures, orig_runs, conv_runs, strict=False)
    ]
    reasons = _verdict(reports, thresholds)
    if missing:
        reasons.insert(
            0,
            f"the converted checkpoint lacks {len(missing)} weight(s) transformers initialised "
            f"randomly: {', '.join(missing[:3])}",
        )
    return CheckReport(
        original=str(original),
        converted=str(converted),
        dtype=dtype,
        quantization=quant,
        low_memory=low_memory,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        thresholds=thresholds,
        images=reports,
        reasons=reasons,
        notes=notes,
        versions=versions(),
        sources={"original": source_hashes(original), "converted": source_hashes(converted)},
    )


_PRECISION = {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def storage_downcast(ref, converted: Path) -> str | None:
    """Which original weights the converted checkpoint stores in a narrower float type, if any."""
    from .readers import read_checkpoint

    try:
        conv = read_checkpoint(converted)
    except LlavaConvertError:
        return None
    conv_bits = min((_PRECISION.get(r.dtype, 64) for r in conv.values() if r.dtype.is_floating_point), default=64)
    groups: dict[str, int] = {}
    sources = [("language model", ref.ckpt.path, None)]
    tower = getattr(ref, "tower", None)
    if tower is not None and getattr(tower, "weight_files", None):
        sources.append(("vision tower", tower.path, tower.weight_files))
    for label, path, files in sources:
        try:
            refs = read_checkpoint(path, files=files)
        except LlavaConvertError:
            continue
        bits = max((_PRECISION.get(r.dtype, 0) for r in refs.values() if r.dtype.is_floating_point), default=0)
        groups[label] = bits
    lossy = [label for label, bits in groups.items() if bits > conv_bits]
    return " and ".join(lossy) + " weights" if lossy else None


def _verdict(reports: list[ImageReport], t: Thresholds) -> list[str]:
    reasons: list[str] = []

    def add(msg: str) -> None:
        if msg not in reasons:
            reasons.append(msg)

    for im in reports:
        tag = f"{im.name}: "
        if im.error:
            add(tag + f"the converted model failed ({im.error})")
            continue
        if not im.prompt_ids_match:
            add(tag + "prompt ids differ")
        if im.pixel_max_diff is None or im.pixel_max_diff > t.pixel_atol:
            add(tag + f"pixel_values differ (max {_fmt(im.pixel_max_diff)})")
        if im.logits_max_abs is None:
            add(tag + "logits could not be compared")
            continue
        if t.atol is not None and im.logits_max_abs > t.atol:
            add(tag + f"logits max abs diff {_fmt(im.logits_max_abs)} > atol {_fmt(t.atol)}")
        if im.kl is not None and im.kl > t.max_kl:
            add(tag + f"KL {_fmt(im.kl)} > {_fmt(t.max_kl)}")
        if im.top1 is not None and im.top1 < t.min_top1:
            add(tag + f"top-1 agreement {_pct(im.top1)} < {_pct(t.min_top1)}")
        if t.require_generation and not im.generation_match:
            add(tag + f"greedy generation differs after {im.generation_agreeing} token(s)")
    return reasons

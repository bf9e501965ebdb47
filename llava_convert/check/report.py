"""The check's verdict and report: what counts as agreement (thresholds per dtype and quantization type),
the stage table of one image, the figures over all images, the parts of the original side that are the
converter's own code (what `check` cannot catch), and the JSON / text renderings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckFailed

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


@dataclass(frozen=True)
class SharedPart:
    """A part of the original side that runs the converter's own code, so `check` cannot catch a bug in it
    (the two sides agree on the same mistake); the oracle tier, which runs the authors' code, covers it."""

    part: str  # what is shared, in words
    code: tuple[str, ...]  # the functions both sides call (module.name)
    consequence: str  # what a bug there does, and what covers it


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
    shared: list[SharedPart] = field(default_factory=list)

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
            "shared_with_converter": [{**asdict(p), "code": list(p.code)} for p in self.shared],
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
        if self.shared:
            lines.append(
                "  not checked, the converter's own code on both sides (the oracle tier covers it): "
                + "; ".join(f"{p.part} ({', '.join(p.code)})" for p in self.shared)
            )
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


def verdict(reports: list[ImageReport], t: Thresholds) -> list[str]:
    """Why the check fails (empty when it passes): one line per image and broken threshold."""
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


"""The plan: what a conversion (or `quantize`) writes, decided before any tensor is read.

A `PlanEntry` is one output tensor: its sources (`TensorSource`s: stored tensors, or `Composite`s computed
from them), transform, dtype, shape, shard and quantization. `Plan` is a whole conversion. The writer
executes a plan through `compute_entry` and each source's `byte_range()` (copied by the kernel when the
output is exactly those bytes); it knows nothing of where a source came from.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import torch

from . import transforms
from .hfconfig import Vocab
from .original import OriginalCheckpoint
from .original.tower import VisionTower
from .quantize import QUANT_STATE_MAX, QuantSpec, quantize_tensor, quantized_outputs, should_quantize
from .readers import TensorRef, dtype_size

# Output dtypes by name (`--dtype`).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TensorSource(Protocol):
    """A lazy input tensor: what the planner reads (names, shapes, dtypes) and the writer loads or copies."""

    name: str
    path: Path  # the file it is read from (the first stored part's for a computed one)
    dtype: torch.dtype
    shape: tuple[int, ...]
    origin: str  # which input it comes from ("", "vision_tower", "base+lora", ...)

    @property
    def nbytes(self) -> int: ...

    def load(self) -> torch.Tensor:
        """The value (a stored tensor as stored; a computed one in float32)."""
        ...

    def byte_range(self) -> tuple[Path, int, int] | None:
        """(file, offset, length) when the value is exactly those stored bytes, else None."""
        ...

    def leaves(self) -> tuple[TensorRef, ...]:
        """The stored tensors it is made of."""
        ...


@dataclass(frozen=True)
class Composite:
    """A tensor computed from stored ones when loaded (a `TensorSource`, never a plain byte range).

    `kind` "lora": parts (W, A, B), value W + scale * B @ A (transposed for fan_in_fan_out), as PEFT's
    `merge_and_unload`. `kind` "delta": parts (delta, base), value delta + base over the base's extent,
    the delta's extra rows as they are, as the authors' `apply_delta`. Computed in float32; the caller casts.
    """

    name: str
    kind: str
    parts: tuple[TensorRef, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float = 1.0
    fan_in_fan_out: bool = False
    origin: str = ""

    @property
    def path(self) -> Path:
        return self.parts[0].path

    @property
    def contiguous(self) -> bool:
        return False  # never a plain byte range: the writer must compute it

    def byte_range(self) -> None:
        return None

    def leaves(self) -> tuple[TensorRef, ...]:
        return tuple(leaf for p in self.parts for leaf in p.leaves())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def load(self) -> torch.Tensor:
        """The value in float32, one output-sized buffer (the factors are small; W is read from its mapping)."""
        _release_freed_memory()
        if self.kind == "lora":
            w, a, b = (p.load() for p in self.parts)
            a, b = a.to(torch.float32), b.to(torch.float32)
            # PEFT: W + transpose(B @ A, fan_in_fan_out) * scaling; A^T @ B^T is (B @ A)^T, built contiguous.
            out = torch.mm(a.t(), b.t()) if self.fan_in_fan_out else torch.mm(b, a)
            out.mul_(self.scale)
            out.add_(w)
            return out
        if self.kind == "delta":
            d, base = (p.load() for p in self.parts)
            out = d.to(torch.float32, copy=True)
            out[tuple(slice(0, n) for n in base.shape)].add_(base)
            return out
        raise AssertionError(f"unknown composite kind {self.kind!r}")


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give the previous tensors' freed buffers back to the OS before the next float32 merge.

    glibc raises its mmap threshold after the first large free, so later buffers of a few MB come from the
    heap, and merges interleaving buffers of several sizes (float32 result, cast, factors) fragment it: the
    process keeps growing by ~the largest tensor per merge before it settles. Trimming keeps resident memory
    at the bound the streaming writer promises (largest tensor plus a constant). No-op off glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class PlanEntry:
    """One output tensor: where it comes from, how it is made, what it will be."""

    target: str
    sources: tuple[TensorSource, ...]
    transform: str | None
    rule: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    shard: str = ""
    quant: QuantSpec | None = None  # set when this weight is written bitsandbytes-quantized
    extra: dict[str, Any] = field(default_factory=dict)

    def outputs(self) -> list[tuple[str, torch.dtype, tuple[int, ...] | None]]:
        """The tensors this entry writes: one, or a quantized weight's several (a `None` shape is
        sized by the data, up to `quantize.QUANT_STATE_MAX` bytes)."""
        if self.quant is None:
            return [(self.target, self.dtype, self.shape)]
        return quantized_outputs(self.target, self.shape, self.dtype, self.quant)

    @property
    def nbytes(self) -> int:
        """Bytes written (an upper bound for quantized weights)."""
        total = 0
        for _, dtype, shape in self.outputs():
            if shape is None:
                total += QUANT_STATE_MAX
                continue
            n = 1
            for s in shape:
                n *= s
            total += n * dtype_size(dtype)
        return total

    @property
    def passthrough(self) -> bool:
        """True when the output bytes are exactly a byte range of the source file (kernel copy)."""
        return (
            self.transform is None
            and self.quant is None
            and len(self.sources) == 1
            and self.sources[0].dtype == self.dtype
            and self.sources[0].byte_range() is not None
            and self.sources[0].shape == self.shape
        )

    @property
    def appends(self) -> bool:
        """True when the output is the source's bytes followed by computed rows (`Transform.tail`): the writer
        copies the source range and appends, so the matrix never sits in memory (vocabulary padding)."""
        if self.transform is None or self.quant is not None or len(self.sources) != 1:
            return False
        src = self.sources[0]
        return (
            transforms.get(self.transform).tail is not None
            and src.dtype == self.dtype
            and src.byte_range() is not None
        )

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": [f"{s.origin}:{s.name}" if s.origin else s.name for s in self.sources],
            "transform": self.transform,
            "dtype": str(self.dtype).replace("torch.", ""),
            "shape": list(self.shape or ()),
            "shard": self.shard,
            "rule": self.rule,
            "quantize": self.quant.quant_type if self.quant is not None else None,
        }


@dataclass
class Plan:
    """Everything `convert` will write, decided before any tensor is read."""

    source: OriginalCheckpoint
    tower: VisionTower
    vocab: Vocab
    config: dict[str, Any]
    entries: list[PlanEntry]
    index: dict[str, Any]
    dtype: torch.dtype
    chat_template: str
    chat_template_reason: str = ""
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def facts(self) -> dict[str, Any]:
        return self.source.facts

    def summary(self) -> dict[str, Any]:
        return {
            "source": str(self.source.path),
            "form": self.source.form,
            "backbone": self.source.backbone,
            "facts": self.facts,
            "target": self.config["architectures"][0],
            "vision_tower": str(self.tower.path),
            "vocab": {
                "original": self.vocab.original,
                "image_token_id": self.vocab.image_token_id,
                "pad_token_id": self.vocab.pad_token_id,
                "padded": self.vocab.padded,
            },
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template": self.chat_template,
            "chat_template_reason": self.chat_template_reason,
            "total_bytes": self.index["metadata"]["total_size"],
            "shards": sorted({e.shard for e in self.entries}),
            "tensors": [e.describe() for e in self.entries],
            "dropped": [{"source": k, "rule": r} for k, r in self.dropped],
            "warnings": self.warnings,
        }


def apply_quantization(entries: list[PlanEntry], config: dict[str, Any], spec: QuantSpec | None) -> None:
    """Mark the weights the policy quantizes and record `quantization_config` in the config."""
    if spec is None:
        return
    spec.validate()
    for e in entries:
        if should_quantize(e.target, tuple(e.shape), spec):
            e.quant = spec
    config["quantization_config"] = spec.config()


def source_order(e: PlanEntry) -> tuple:
    if not e.sources:
        return (1, "", 0, e.target)
    src = e.sources[0]
    stored = src.byte_range()
    # Names, not absolute paths: the same checkpoint gives the same bytes wherever it lies (local, Hub cache).
    return (0, src.origin, src.path.name, stored[1] if stored else 0, e.target)


def compute_entry(e: PlanEntry, ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One entry's output tensors, materialised: read, transform, cast, and quantize if planned.

    For an entry that `appends` to its source, only the appended rows (the writer copies the rest)."""
    tensors = [s.load() for s in e.sources]
    if e.appends:
        return {e.target: transforms.get(e.transform).tail(tensors, ctx, e.shape)}
    if e.transform:
        t = transforms.get(e.transform).apply(tensors, ctx, e.shape)
    else:
        (t,) = tensors
    t = t.to(e.dtype).contiguous() if t.dtype != e.dtype else t.contiguous()
    if e.quant is not None:
        return quantize_tensor(e.target, t, e.quant)
    return {e.target: t}

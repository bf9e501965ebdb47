"""Named tensor transforms referenced by the mapping tables.

Each transform knows its output shape from the source shapes (so the plan can be validated before any
data is read) and computes its output one tensor at a time (so memory stays bounded by the largest tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LlavaConvertError


@dataclass(frozen=True)
class Transform:
    """`shape` gives the output shape from the source shapes; `apply` computes the output. A transform whose
    output is its single source followed by extra rows also has `tail`, computing just those rows, so the
    writer can copy the source bytes and append (no copy of the matrix in memory)."""

    shape: Callable[[list[tuple[int, ...]], dict[str, Any], tuple[int, ...] | None], tuple[int, ...]]
    apply: Callable[[list[torch.Tensor], dict[str, Any], tuple[int, ...]], torch.Tensor]
    tail: Callable[[list[torch.Tensor], dict[str, Any], tuple[int, ...]], torch.Tensor] | None = None


def _pad_vocab_shape(shapes, ctx, expected):
    (rows, cols) = shapes[0]
    vocab = ctx["vocab"]
    if rows != vocab.original:
        raise LlavaConvertError(
            f"embedding has {rows} rows but the tokenizer/config vocabulary has {vocab.original}"
        )
    return (vocab.padded, cols)


def _pad_vocab(tensors, ctx, shape):
    """Append rows for `<image>`, `<pad>` and alignment, each set to the mean of the original rows.

    Deterministic (no sampling), and the mean keeps new logits below the best original one, so greedy
    decoding never picks a padding row. Output in the source dtype (the caller casts).
    """
    (w,) = tensors
    out = torch.empty(shape, dtype=w.dtype)
    out[: w.shape[0]] = w
    out[w.shape[0] :] = _pad_rows(tensors, ctx, shape)
    return out


def _pad_rows(tensors, ctx, shape):
    """Just the appended rows of `_pad_vocab`: the row mean, accumulated in float64 over row blocks."""
    (w,) = tensors
    rows, cols = w.shape
    acc = torch.zeros(cols, dtype=torch.float64)
    buf = torch.empty((min(_MEAN_ROWS, max(rows, 1)), cols), dtype=torch.float64)
    for start in range(0, rows, _MEAN_ROWS):
        block = w[start : start + _MEAN_ROWS]
        b = buf[: block.shape[0]]
        b.copy_(block)  # a reused float64 buffer: faster than a float64 sum over a half-precision block
        acc += b.sum(dim=0)
    mean = (acc / max(rows, 1)).to(w.dtype)
    return mean.expand(shape[0] - rows, cols).contiguous()


_MEAN_ROWS = 1024


def _eye(tensors, ctx, shape):
    return torch.eye(shape[0], shape[1], dtype=torch.float32)


def _zeros(tensors, ctx, shape):
    return torch.zeros(shape, dtype=torch.float32)


def _expected_shape(shapes, ctx, expected):
    if expected is None:
        raise LlavaConvertError("a synthesized tensor needs a target parameter to take its shape from")
    return tuple(expected)


TRANSFORMS: dict[str, Transform] = {
    "pad_vocab": Transform(_pad_vocab_shape, _pad_vocab, tail=_pad_rows),
    "eye": Transform(_expected_shape, _eye),
    "zeros": Transform(_expected_shape, _zeros),
}


def get(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise LlavaConvertError(f"unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS))})") from None

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
    shape: Callable[[list[tuple[int, ...]], dict[str, Any], tuple[int, ...] | None], tuple[int, ...]]
    apply: Callable[[list[torch.Tensor], dict[str, Any], tuple[int, ...]], torch.Tensor]


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
    decoding never picks a padding row.
    """
    (w,) = tensors
    # Output in the source dtype and the mean accumulated over row blocks: peak memory stays about one
    # copy of the matrix (a float32 copy of a 32000x4096 embedding would add 0.5 GB, twice).
    out = torch.empty(shape, dtype=w.dtype)
    rows = w.shape[0]
    out[:rows] = w
    acc = torch.zeros(shape[1], dtype=torch.float64)
    for start in range(0, rows, _MEAN_ROWS):
        acc += w[start : start + _MEAN_ROWS].sum(dim=0, dtype=torch.float64)
    out[rows:] = (acc / max(rows, 1)).to(w.dtype)
    return out


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
    "pad_vocab": Transform(_pad_vocab_shape, _pad_vocab),
    "eye": Transform(_expected_shape, _eye),
    "zeros": Transform(_expected_shape, _zeros),
}


def get(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise LlavaConvertError(f"unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS))})") from None

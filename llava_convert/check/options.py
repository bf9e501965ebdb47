"""What a user chooses for `check`: one frozen value, built by the CLI (or a caller), read by every step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import LlavaConvertError

DEFAULT_PROMPT = "What is shown in this image?"
DEFAULT_MAX_NEW_TOKENS = 8
CHECK_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class CheckOptions:
    """How to run and judge `check(original, converted, options)`.

    Attributes:
        vision_tower: CLIP directory or Hub repo id for the original (default: its `mm_vision_tower`).
        base: the base LLM, when the original is a LoRA adapter, a projector-only checkpoint or delta weights.
        delta: the original is delta weights (default: by name, as `convert` decides).
        images: image files or PIL images; default: one built-in, deterministic, non-square test image.
        prompt: the question asked about each image.
        dtype: compute dtype on both sides, "float32" or "bfloat16" (a quantized converted checkpoint runs in
            its stored dtype).
        atol: absolute tolerance on logits (default per dtype; ignored for quantized checkpoints).
        min_top1: lowest acceptable top-1 agreement (default per dtype / quantization type).
        max_kl: largest acceptable mean KL(original || converted) (default per dtype / quantization type).
        max_new_tokens: greedy tokens generated and compared.
        low_memory: stream decoder layers one at a time on both sides (same figures, far less memory).
        progress: report what is running on stderr.

    Raises:
        LlavaConvertError: a dtype other than float32 / bfloat16, a negative max_new_tokens.

    Example:
        >>> CheckOptions(dtype="bfloat16", max_new_tokens=4).max_new_tokens
        4
    """

    vision_tower: Path | str | None = None
    base: Path | str | None = None
    delta: bool | None = None
    images: Sequence[Path | str | Image.Image] | None = None
    prompt: str = DEFAULT_PROMPT
    dtype: str = "float32"
    atol: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    low_memory: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in CHECK_DTYPES:
            raise LlavaConvertError(f"--dtype {self.dtype!r}: expected float32 or bfloat16")
        if self.max_new_tokens < 0:
            raise LlavaConvertError(f"--max-new-tokens {self.max_new_tokens}: must not be negative")
        if self.images is not None:
            object.__setattr__(self, "images", tuple(self.images) or None)

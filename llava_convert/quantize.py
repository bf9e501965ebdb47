"""Quantization policy: which tensors become bitsandbytes int8 / nf4 / fp4, and what they serialize to.

The policy is a predicate over (tensor name, shape): a weight is quantized when it belongs to an
`nn.Linear` (the only modules bitsandbytes replaces) and its module is not in the skip list. The kernels
that produce the bytes are in `quant.py` (byte-identical to bitsandbytes, chunked, multi-threaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LlavaConvertError

QUANT_TYPES = ("int8", "nf4", "fp4")

# Kept unquantized by default; chosen by measurement (README, "Quantization quality"): quantizing the
# vision tower and projector costs far more agreement with the unquantized model than it saves memory.
DEFAULT_SKIP = ("lm_head", "vision_tower", "multi_modal_projector")

# Linear layers of HF Llava / LlavaNext, in the legacy (on-disk) and transformers-5 (in-memory) layouts.
_LINEAR = re.compile(
    r"(language_model\.model\.|model\.language_model\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|(language_model\.)?lm_head"
    r"|(model\.)?vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    r"|(model\.)?multi_modal_projector\.linear_[12]"
)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bitsandbytes settings plus the skip list."""

    quant_type: str
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "float16"
    skip_modules: tuple[str, ...] = DEFAULT_SKIP
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def validate(self) -> None:
        from .quant import SUPPORTED_BLOCKSIZES

        if self.quant_type not in QUANT_TYPES:
            raise LlavaConvertError(f"--quantize {self.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        if self.quant_type != "int8" and self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise LlavaConvertError(
                f"--blocksize {self.blocksize}: bitsandbytes supports {', '.join(map(str, SUPPORTED_BLOCKSIZES))}"
            )
        if self.compute_dtype not in ("float16", "bfloat16", "float32"):
            raise LlavaConvertError(f"--compute-dtype {self.compute_dtype!r}: expected float16, bfloat16 or float32")
        if self.device not in ("cpu", "cuda"):
            raise LlavaConvertError(f"--device {self.device!r}: expected cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LlavaConvertError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")

    def config(self) -> dict[str, Any]:
        from .quant import bnb_quantization_config

        return bnb_quantization_config(
            quant_type=self.quant_type,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            skip_modules=list(self.skip_modules),
        )


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and bool(_LINEAR.fullmatch(name[: -len(".weight")]))


def should_quantize(name: str, shape: tuple[int, ...], spec: QuantSpec) -> bool:
    """The policy predicate: a Linear weight whose module is not skipped."""
    from .quant import module_is_skipped

    return is_linear_weight(name, shape) and not module_is_skipped(name[: -len(".weight")], spec.skip_modules)


QUANT_STATE_MAX = 512  # bytes; the JSON quant state is ~200


def quantized_outputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: QuantSpec):
    """The tensors one quantized weight serializes to: (name, dtype, shape), shapes known up front except
    the JSON quant state, whose length depends on the data (its nested offset); `None` marks that one."""
    module = name[: -len(".weight")]
    n = 1
    for s in shape:
        n *= s
    if spec.quant_type == "int8":
        return [(f"{module}.weight", torch.int8, shape), (f"{module}.SCB", torch.float32, (shape[0],)),
                (f"{module}.weight_format", torch.uint8, ())]
    blocks = -(-n // spec.blocksize)
    out = [
        (f"{module}.weight", torch.uint8, ((n + 1) // 2, 1)),
        (f"{module}.weight.absmax", torch.uint8 if spec.double_quant else torch.float32, (blocks,)),
        (f"{module}.weight.quant_map", torch.float32, (16,)),
    ]
    if spec.double_quant:
        out += [
            (f"{module}.weight.nested_absmax", torch.float32, (-(-blocks // 256),)),
            (f"{module}.weight.nested_quant_map", torch.float32, (256,)),
        ]
    out.append((f"{module}.weight.quant_state.bitsandbytes__{spec.quant_type}", torch.uint8, None))
    return out


def quantize_tensor(name: str, weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Serialized bitsandbytes tensors for one weight, keyed by full name, in `quantized_outputs` order."""
    module = name[: -len(".weight")]
    if spec.device == "cuda":
        parts = _quantize_cuda(weight, spec)
    else:
        from .quant import quantize_weight

        parts = quantize_weight(
            weight, quant_type=spec.quant_type, blocksize=spec.blocksize, double_quant=spec.double_quant
        )
    out = {}
    for out_name, _, _ in quantized_outputs(name, tuple(weight.shape), weight.dtype, spec):
        suffix = out_name[len(module) + 1 :]
        out[out_name] = parts[suffix]
    return out


def _quantize_cuda(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """bitsandbytes' own CUDA kernels; results moved back to the CPU for writing."""
    import bitsandbytes.functional as F

    w = weight.to("cuda")
    if spec.quant_type == "int8":
        q, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": q.cpu(), "SCB": scb.float().cpu(), "weight_format": torch.tensor(0, dtype=torch.uint8)}
    packed, state = F.quantize_4bit(
        w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type
    )
    parts = {"weight": packed.cpu()}
    for k, v in state.as_dict(packed=True).items():
        parts["weight." + k] = v.cpu() if isinstance(v, torch.Tensor) else v
    return parts


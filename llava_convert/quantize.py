"""Quantization policy: which tensors become bitsandbytes int8 / nf4 / fp4, and what they serialize to.

The policy is a predicate over (tensor name, shape): a weight is quantized when it belongs to an
`nn.Linear` (the only modules bitsandbytes replaces) and its module is not in the skip list, whatever key
layout the names are in (`layouts.py`). The `quantization_config` written with it spells the skip list in
every layout. The kernels that produce the bytes are in `quant.py` (byte-identical to bitsandbytes,
chunked, multi-threaded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LlavaConvertError
from .layouts import spellings, to_legacy, under
from .quant import SUPPORTED_BLOCKSIZES, quantize_weight

QUANT_TYPES = ("int8", "nf4", "fp4")

# Kept unquantized by default; chosen by measurement (README, "Quantization quality"): quantizing the
# vision tower and projector costs far more agreement with the unquantized model than it saves memory.
DEFAULT_SKIP = ("lm_head", "vision_tower", "multi_modal_projector")

# Linear layers of HF Llava / LlavaNext, spelled in the legacy layout (names are translated to it first).
_LINEAR = re.compile(
    r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|language_model\.lm_head"
    r"|vision_tower\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    r"|multi_modal_projector\.linear_[12]"
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
        return bnb_quantization_config(
            quant_type=self.quant_type,
            double_quant=self.double_quant,
            compute_dtype=self.compute_dtype,
            skip_modules=list(self.skip_modules),
        )


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A Linear's weight, in any key layout."""
    return name.endswith(".weight") and len(shape) == 2 and bool(_LINEAR.fullmatch(to_legacy(name[: -len(".weight")])))


def should_quantize(name: str, shape: tuple[int, ...], spec: QuantSpec) -> bool:
    """The policy predicate: a Linear weight whose module is not skipped."""
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
    import bitsandbytes.functional as F  # lazy: optional dependency, only for --device cuda

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


def expand_skip_modules(skip_modules: Iterable[str]) -> list[str]:
    """Spell each skip entry in every LLaVA layout, so every transformers version reads it the same.

    Args:
        skip_modules: module names (or subtree roots) in any layout, e.g. ``"lm_head"``,
            ``"vision_tower"``, ``"language_model.model.layers.0.mlp"``,
            ``"model.vision_tower.encoder.layers.0"``; names outside the LLaVA roots (``"k_proj"``)
            are kept as they are.

    Returns:
        The de-duplicated list, order preserved, each entry followed by its other spellings.

    Raises:
        ValueError: an entry is empty, not a string, or starts/ends with a dot.
    """
    out: list[str] = []
    for name in skip_modules:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"invalid skip module name {name!r}")
        for alias in spellings(name):
            if alias not in out:
                out.append(alias)
    return out


def module_is_skipped(module_path: str, skip_modules: Iterable[str]) -> bool:
    """Whether a Linear at ``module_path`` stays unquantized under ``skip_modules``.

    This is the meaning :func:`bnb_quantization_config` guarantees for every transformers version:
    the module is skipped iff it *is*, or lies *under*, one of the skip entries (compared in the
    legacy layout, so any spelling works), or its last path component equals an entry without a dot
    (bare leaf names such as ``"k_proj"`` match anywhere: 4.x by child name, 5.x by suffix). Use it to
    decide which weights to quantize when writing the checkpoint.

    Args:
        module_path: dotted module path in any layout (``language_model.model.layers.0.mlp.up_proj``,
            ``model.language_model.layers.0.mlp.up_proj``); a trailing ``.weight`` is ignored.
        skip_modules: the entries passed to :func:`bnb_quantization_config`.

    Returns:
        True if the module must be written unquantized.
    """
    path = to_legacy(module_path.removesuffix(".weight"))
    leaf = path.rsplit(".", 1)[-1]
    for entry in skip_modules:
        if "." not in entry and leaf == entry:
            return True
        if under(path, to_legacy(entry)):
            return True
    return False


def bnb_quantization_config(
    *, quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` for config.json of a checkpoint written with :func:`quantize_weight`.

    It equals ``transformers.BitsAndBytesConfig(...).to_dict()`` for the same settings (so transformers
    5 and 4.x load the checkpoint with no ``quantization_config`` argument; 4.x ignores the keys it
    does not know, such as ``bnb_4bit_quant_storage`` and the ``_load_in_*`` mirrors).

    Skip list semantics differ between versions (transformers source, checked):

    * 4.36 ``_replace_with_bnb_linear``: a Linear is skipped if its child name is in the list or any
      entry is a *substring* of its dotted path. Later 4.x: child name in the list, or
      ``entry + "."`` is a substring, or ``entry == path``. (4.36 loads pre-quantized int8 only;
      pre-quantized 4-bit needs transformers >= 4.37 with bitsandbytes >= 0.41.3.)
    * 5.x ``should_convert_module``: skipped if an entry matches *from the start* of the path up to a
      module boundary (the entry is used as a regex), or the path *ends with* the entry. There is no
      inheritance from parent modules and no substring match, so ``"vision_tower"`` does **not** skip
      ``model.vision_tower.vision_model...q_proj``.
    * In every version, passing any list replaces the default skip (``get_keys_to_not_convert``, i.e.
      the output embedding ``lm_head``), so ``lm_head`` must be listed explicitly to stay unquantized.
    * The in-memory paths differ too. A LlavaForConditionalGeneration is ``language_model.model.*``,
      ``language_model.lm_head``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*`` before
      transformers 4.52 (the legacy checkpoint layout); ``model.language_model.*``, ``lm_head``,
      ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*`` from 4.52; and in 5.x
      ``model.language_model.*``, ``lm_head``, ``model.vision_tower.*`` (CLIPVisionModel loses its
      ``vision_model`` level), ``model.multi_modal_projector.*``. 5.x renames legacy checkpoint keys
      on load, the ``.weight.absmax``/``.weight.quant_state...`` suffixes included.

    Therefore every entry is written in every layout (:func:`expand_skip_modules`): for example
    ``["lm_head", "vision_tower", "multi_modal_projector"]`` becomes ``["lm_head",
    "language_model.lm_head", "vision_tower", "model.vision_tower", "multi_modal_projector",
    "model.multi_modal_projector"]``, which skips exactly the LM head, the whole vision tower and the
    projector under all the rules (4.x by child name/substring, 5.x by prefix/suffix). Entries
    should name whole modules or subtrees; note that 4.36's substring rule makes
    ``...layers.1`` also match ``...layers.10`` and 5.x treats ``.`` as a regex wildcard, so avoid
    entries that are a prefix of a sibling's name. :func:`module_is_skipped` gives the resulting
    decision for a module path.

    Args:
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        double_quant: ``bnb_4bit_use_double_quant`` (must match what :func:`quantize_weight` used;
            the loader actually reads it from each weight's quant state).
        compute_dtype: ``bnb_4bit_compute_dtype``: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        skip_modules: modules to keep unquantized, in any LLaVA layout.

    Returns:
        A JSON-serializable dict.

    Raises:
        ValueError: unknown ``quant_type`` / ``compute_dtype`` or an invalid skip entry.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}")
    if compute_dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"compute_dtype must be 'float16', 'bfloat16' or 'float32', got {compute_dtype!r}")
    four_bit = quant_type != "int8"
    return {
        "_load_in_4bit": four_bit,
        "_load_in_8bit": not four_bit,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type if four_bit else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four_bit else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": expand_skip_modules(skip_modules),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four_bit,
        "load_in_8bit": not four_bit,
        "quant_method": "bitsandbytes",
    }

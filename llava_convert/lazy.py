"""Build a transformers model on the meta device, then give it lazily read weights: strictly, or one
decoder layer at a time.

`load_into` assigns a whole module's weights (every parameter must be given, with its shape);
`load_outside` all but one prefix, which `LayerStreamer` then materialises layer by layer around each
forward (weights held: the largest layer, not the model); `materialize_buffers` fills the non-persistent
buffers a meta-device build leaves empty. The weights are `readers.TensorRef`s, read when assigned
(`RowSlice`: the first rows of one, as `resize_token_embeddings` shrinks a padded vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import LlavaConvertError
from .readers import TensorRef


def materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers a meta-device build leaves empty: rotary tables, CLIP / SigLIP position ids."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            fresh = type(module)(config=module.config)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
        elif type(module).__name__ in ("CLIPVisionEmbeddings", "SiglipVisionEmbeddings"):
            module.register_buffer(
                "position_ids", torch.arange(module.num_positions).expand((1, -1)), persistent=False
            )


class RowSlice:
    """The first ROWS rows of a lazily read tensor (what `resize_token_embeddings` keeps when it shrinks)."""

    def __init__(self, ref: TensorRef, rows: int):
        self.ref, self.rows = ref, rows
        self.shape = (rows, *tuple(ref.shape)[1:])
        self.path = ref.path
        self.dtype = ref.dtype

    def load(self) -> torch.Tensor:
        return self.ref.load()[: self.rows]


def load_as(ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
    """REF read into a fresh contiguous tensor, floating point cast to DTYPE."""
    t = ref.load()
    if t.is_floating_point():
        return t.to(dtype=dtype, copy=True).contiguous()
    return t.clone().contiguous()


def load_outside(
    model: nn.Module, refs: dict[str, TensorRef], dtype: torch.dtype, *, skip: str, where: str
) -> None:
    """Assign every parameter of MODEL outside SKIP (a name prefix), strictly; SKIP stays on the meta device."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = sorted(set(expected) - set(refs)), sorted(set(refs) - set(expected))
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:5])
        raise LlavaConvertError(
            f"{where}: weights do not fit {type(model).__name__} ({'missing' if missing else 'unexpected'} {names})"
        )
    for k, r in refs.items():
        if tuple(r.shape) != tuple(expected[k].shape):
            raise LlavaConvertError(
                f"{where}: {k} has shape {tuple(r.shape)}, expected {tuple(expected[k].shape)}"
            )
        _assign(model, k, load_as(r, dtype))


def load_into(module: nn.Module, refs: dict[str, TensorRef], dtype: torch.dtype, *, where: str) -> None:
    """Assign lazily read weights to MODULE (built on the meta device); every parameter must be provided."""
    expected = dict(module.state_dict())
    missing = sorted(set(expected) - set(refs))
    unexpected = sorted(set(refs) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        raise LlavaConvertError(f"{where}: weights do not fit {type(module).__name__} ({'; '.join(parts)})")
    bad = [k for k, r in refs.items() if tuple(r.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise LlavaConvertError(
            f"{where}: {k} has shape {tuple(refs[k].shape)}, expected {tuple(expected[k].shape)} "
            f"(in {refs[k].path.name})"
        )
    module.load_state_dict({k: load_as(r, dtype) for k, r in refs.items()}, strict=True, assign=True)


class LayerStreamer:
    """Materialises each decoder layer just before its forward and frees it right after.

    LAYERS are modules built on the meta device; WEIGHTS(i) gives layer i's lazy tensors keyed by the names
    inside the layer. Works inside `generate` (the KV cache lives outside the layers).
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        weights: Callable[[int], dict[str, TensorRef]],
        dtype: torch.dtype,
        where: str,
    ):
        self._handles = []
        self.loads = 0
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._loader(i, weights, dtype, where)))
            self._handles.append(layer.register_forward_hook(self._free))

    def _loader(self, i, weights, dtype, where):
        def hook(module, args):
            load_into(module, weights(i), dtype, where=f"{where} (decoder layer {i})")
            self.loads += 1

        return hook

    @staticmethod
    def _free(module, args, output):
        module.to("meta")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Parameter):
        setattr(parent, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        parent.register_buffer(attr, tensor)

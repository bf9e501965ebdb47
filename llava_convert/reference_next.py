"""The LLaVA-NeXT repository's families run as the authors' code (lmms-lab/LLaVA-NeXT `llava`) runs them.

The original side of `llava-convert check` for LLaVA-OneVision (Qwen2 + SigLIP, `anyres_max_N`),
LLaVA-NeXT-Interleave (Qwen1.5 + SigLIP, `anyres`), llama3-llava-next-8b (Llama-3 + CLIP) and
llava-next-72b/110b (Qwen1.5 + CLIP): `ReferenceModel` with these differences (its hooks), the algorithms
themselves in `authors/`:

* language model: `Qwen2ForCausalLM` (`LlavaQwenForCausalLM` is a Qwen2 model) or `LlamaForCausalLM`, with the
  first `len(tokenizer)` rows of the embeddings and lm_head, as the authors' `load_pretrained_model` leaves
  them after `resize_token_embeddings(len(tokenizer))` (Qwen configs carry a padded vocabulary); a tied
  lm_head (no `lm_head.weight` on disk) is the embedding matrix;
* SigLIP tower (`multimodal_encoder/siglip_encoder.py`): the tower config named by `mm_vision_tower` (a Hub id,
  resolved through the HF cache), its LAST encoder layer deleted and its head dropped; the features are
  `hidden_states[-1]` of that truncated encoder (no post_layernorm, all patches; `mm_vision_select_layer` and
  `mm_vision_select_feature` are ignored); 384 px crops normalised with mean = std = 0.5 whatever the tower
  says (`authors.images.SiglipPreprocessor`). CLIP tower: as the LLaVA-1.x reference, with the attention
  numerics of the authors' transformers (`reference.legacy_clip_attention`);
* the checkpoint's own tower weights whenever it carries them (the authors build the tower in `__init__` and
  `from_pretrained` overwrites it), else the tower named by `mm_vision_tower`;
* merging (`llava_arch.py`): unpad, then the `anyres_max_N` bilinear downscale when the unpadded grid exceeds N
  tiles by more than 1.1x (`authors.images.downscale_anyres_max`), one `image_newline` per row;
* prompts: `authors.templates` (`qwen_1_5` / `qwen_2`, `llava_llama_3`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import SiglipVisionModel

from .authors import config as authors_config
from .authors.images import (
    SiglipPreprocessor,
    anyres_max_tiles,
    downscale_anyres_max,
    expand_pinpoints,
    select_best_resolution,
    tile_size,
    unpad_image,
    unpad_image_transformers,
)
from .errors import LlavaConvertError
from .lazy import RowSlice, load_into, materialize_buffers
from .logs import quiet
from .original import open_original
from .readers import TensorRef, read_checkpoint, weight_files
from .reference import LEGACY_CLIP_ATTENTION, ImageStages, ReferenceModel

# The attention kernel of the authors' SigLIP copy (attention computed by hand: transformers' eager).
SIGLIP_ATTENTION = "eager"

# Hints for the checker: what a converted stage that equals one of the alternatives most likely got wrong.
HINTS = {
    "pixel_values:pinpoints_unexpanded": (
        'pixel_values differ: the image_grid_pinpoints range "(AxB),...,(CxD)" was not expanded (the authors '
        "read it as every (i*S, j*S) from its first to its last pair, S the tile size): write the expanded list"
    ),
    "vision:siglip_last_layer_kept": (
        "SigLIP tower with its last layer kept? (the authors delete the tower's last encoder layer and take "
        "hidden_states[-1] of the rest: num_hidden_layers = the Hub tower's - 1, vision_feature_layer -1)"
    ),
    "vision:siglip_hub_whole": (
        "SigLIP tower with its last layer kept: the Hub tower whole? (the authors run the checkpoint's own tower, "
        "whose last encoder layer they deleted, and take hidden_states[-1]: num_hidden_layers = the Hub "
        "tower's - 1, vision_feature_layer -1, weights from the checkpoint)"
    ),
    "vision:siglip_post_layernorm": (
        "SigLIP features taken after post_layernorm (last_hidden_state)? The authors take hidden_states[-1], "
        "before post_layernorm"
    ),
    "vision:hub_tower": "the Hub tower instead of the checkpoint's own (trained) SigLIP tower?",
    "merge:no_downscale": (
        "image features merged without the anyres_max_N downscale (vision_aspect_ratio? the authors shrink the "
        "unpadded grid bilinearly when it exceeds N tiles by more than 1.1x)"
    ),
    "merge:base_only": (
        "only the base crop's features: converted as plain LLaVA (no anyres / spatial_unpad)? The authors use "
        "the anyres tiles, unpadded, with image_newline"
    ),
    "merge:transformers_unpad": (
        "image features unpadded with transformers' rounding (int(round(x, 7))) instead of the authors' int(x): "
        "this image's size hits the rounding boundary"
    ),
}


class NextReferenceModel(ReferenceModel):
    """An original LLaVA-NeXT-repository checkpoint run as the authors' code runs it (see the module doc).

    Arguments as `ReferenceModel`'s; the checkpoint, its family and its tower come from `original/`
    (`open_original`, `find_vision_tower`: a SigLIP tower described minus its last layer; the checkpoint's own
    tower weights, which the LLaVA-NeXT loader always runs).
    """

    clip_attention = LEGACY_CLIP_ATTENTION

    # -- construction ----------------------------------------------------------------------------------

    @property
    def is_siglip(self) -> bool:
        return self.ckpt.siglip

    def _image_processor(self):
        return SiglipPreprocessor() if self.is_siglip else super()._image_processor()

    def _vocab_rows(self, embed: TensorRef) -> int:
        # resize_token_embeddings(len(tokenizer)): the logits the authors' model gives
        rows = len(self.tokenizer)
        if rows > embed.shape[0]:
            raise LlavaConvertError(
                f"{self.ckpt.path}: the tokenizer has {rows} tokens but model.embed_tokens.weight only "
                f"{embed.shape[0]} rows"
            )
        return rows

    def _hub_tower_refs(self, *, whole: bool) -> dict[str, TensorRef]:
        """The tower directory's SigLIP weights as the authors' tower loads them (vision part, no head; the
        last layer dropped unless WHOLE), only when they are on disk: the checker's alternatives never
        download a tower the checkpoint does not need."""
        refs = read_checkpoint(self.tower.path, origin="vision_tower", files=weight_files(self.tower.path))
        refs = {k: r for k, r in refs.items() if k.startswith("vision_model.") and ".head." not in k}
        if not whole:
            last = int(self.tower.config["num_hidden_layers"])  # the Hub tower's last layer
            refs = {k: r for k, r in refs.items() if not k.startswith(f"vision_model.encoder.layers.{last}.")}
        return refs

    def _directory_tower_refs(self) -> dict[str, TensorRef]:
        # A checkpoint without its tower (projector-only): the Hub SigLIP tower as the authors load it.
        return self._hub_tower_refs(whole=False) if self.is_siglip else super()._directory_tower_refs()

    def stray_tower_refs(self) -> dict[str, TensorRef] | None:
        return None  # the authors' NeXT loader always runs the checkpoint's own tower

    def stock_tower_refs(self) -> dict[str, TensorRef] | None:
        return None if self.is_siglip else super().stock_tower_refs()  # SigLIP: `_siglip_alternatives`

    def _build_vision(self, refs: dict[str, TensorRef], *, where: str, whole: bool = False):
        """The tower as the authors build it; WHOLE: a SigLIP tower with the Hub tower's every layer."""
        if not self.is_siglip:
            return super()._build_vision(refs, where=where)
        tower = self.tower
        if whole:
            tower = replace(tower, config={**tower.config, "num_hidden_layers": tower.config["num_hidden_layers"] + 1})
        cfg = authors_config.vision_config(tower)
        cfg._attn_implementation = SIGLIP_ATTENTION
        with quiet(), torch.device("meta"):
            model = SiglipVisionModel(cfg)
        # transformers 5's SiglipVisionModel is the vision transformer itself (no `vision_model.` level).
        state = {k.removeprefix("vision_model."): r for k, r in refs.items()}
        load_into(model, state, self.dtype, where=f"{where} (SigLIP tower)")
        materialize_buffers(model)
        return model.eval()

    def _language_model_refs(self, refs: dict[str, TensorRef], cfg) -> dict[str, Any]:
        """A tied lm_head is the embedding matrix; both keep their first len(tokenizer) rows."""
        if "lm_head.weight" not in refs and not cfg.tie_word_embeddings:
            raise LlavaConvertError(
                f"{self.ckpt.path}: no lm_head.weight and tie_word_embeddings is not true in config.json"
            )
        out: dict[str, Any] = dict(super()._language_model_refs(refs, cfg))
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if out[k].shape[0] != self.vocab_size:
                out[k] = RowSlice(out[k], self.vocab_size)
        return out

    # -- the authors' pipeline -------------------------------------------------------------------------

    @property
    def aspect(self) -> str:
        return str(self.config.get("image_aspect_ratio") or "square")

    @property
    def anyres(self) -> bool:
        return self.aspect.startswith("anyres")

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.is_siglip else super()._select(hidden)

    def _select_layer(self) -> int:
        # SigLIP: hidden_states[-1] of the truncated tower (mm_vision_select_layer is ignored).
        return -1 if self.is_siglip else super()._select_layer()

    @torch.inference_mode()
    def encode(self, image: Image.Image, *, alternatives: bool = True) -> ImageStages:
        stages = super().encode(image, alternatives=False)
        if alternatives:
            stages.alternatives = self._next_alternatives(image.convert("RGB"), stages)
        return stages

    def merge(self, projected: torch.Tensor, image_size: tuple[int, int], *, anyres: bool, **variant):
        """LLaVA-NeXT's merging for one image (LLaVA-1.6's with the `_unpadded` hook below); VARIANT
        (`downscale=False`, `unpad=unpad_image_transformers`) gives known wrong versions for the hints."""
        self._variant = variant
        try:
            return super().merge(projected, image_size, anyres=anyres)
        finally:
            self._variant = {}

    def _unpadded(self, grid: torch.Tensor, image_size: tuple[int, int], side: int) -> torch.Tensor:
        variant = getattr(self, "_variant", {})
        grid = variant.get("unpad", unpad_image)(grid, image_size)
        max_tiles = anyres_max_tiles(self.aspect)
        if max_tiles is not None and variant.get("downscale", True):
            grid = downscale_anyres_max(grid, max_tiles, side)
        return grid

    # -- alternatives (for the checker's hints) --------------------------------------------------------

    def _next_alternatives(self, image: Image.Image, s: ImageStages) -> dict[str, torch.Tensor]:
        alt: dict[str, torch.Tensor] = {}
        pv, projected, size = s.pixel_values, s.image_features, image.size
        if self.anyres:
            pins = self.config.get("image_grid_pinpoints")
            tile = tile_size(self.image_processor)[0]
            if isinstance(pins, str) and "x" in pins:
                ends = re.findall(r"\((\d+)x(\d+)\)", pins)
                raw = [[int(a) * tile, int(b) * tile] for a, b in (ends[0], ends[-1])]
                alt["pixel_values:pinpoints_unexpanded"] = self.pixel_values(image, raw)
            expanded = expand_pinpoints(pins, tile)
            transposed = [[h, w] for w, h in expanded]
            if select_best_resolution(size, transposed) != select_best_resolution(size, expanded):
                alt["pixel_values:pinpoints_hw"] = self.pixel_values(image, transposed)
            if anyres_max_tiles(self.aspect) is not None:
                alt["merge:no_downscale"] = self.merge(projected, size, anyres=True, downscale=False)[0]
            alt["merge:base_only"] = projected[0]
            other = self.merge(projected, size, anyres=True, unpad=unpad_image_transformers)[0]
            if other.shape != s.merged.shape:
                alt["merge:transformers_unpad"] = other
        if self.is_siglip:
            alt.update(self._siglip_alternatives(pv, s.vision_features))
        return alt

    def _siglip_alternatives(self, pv: torch.Tensor, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        alt = {"vision:siglip_post_layernorm": self.vision.post_layernorm(feats).to(self.dtype)}
        where = str(self.tower.path)
        try:
            full = self._build_vision(self._hub_tower_refs(whole=True), where=where, whole=True)
            stock = self._build_vision(self._hub_tower_refs(whole=False), where=where)
        except LlavaConvertError:  # the Hub tower's weights are not on disk
            return alt
        alt["vision:hub_tower"] = self.vision_hidden_states(pv, stock)[-1]
        alt["vision:siglip_hub_whole"] = self.vision_hidden_states(pv, full)[-1]
        # The last layer kept: on the checkpoint's own layers, the Hub tower's last layer run on top.
        out = full.encoder.layers[-1](feats.to(self.dtype), attention_mask=None)
        alt["vision:siglip_last_layer_kept"] = out[0] if isinstance(out, tuple) else out
        return alt


def open_reference(path: Path | str, **options: Any) -> ReferenceModel:
    """The original side of `check`: `NextReferenceModel` for a checkpoint of the LLaVA-NeXT repository
    (`OriginalCheckpoint.family`), else the LLaVA-1.x `ReferenceModel`; OPTIONS are `ReferenceModel`'s."""
    base, delta = options.get("base"), options.get("delta")
    ckpt = open_original(
        path, base=base, delta=delta if base is not None or delta else False, require_base=False, representable=False
    )
    return (NextReferenceModel if ckpt.family else ReferenceModel)(path, **options)

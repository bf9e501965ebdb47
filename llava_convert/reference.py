"""The authors' LLaVA forward pass (haotian-liu/LLaVA 1.2.2), rebuilt on transformers 5 building blocks.

This is the ORIGINAL side of `llava-convert check`: it reads the original checkpoint as the authors' code does
and runs it the way `llava/eval/run_llava.py` does, independently of the conversion (no mapping tables, no HF
llava classes):

* language model: HF `LlamaForCausalLM` / `MistralForCausalLM` built from the original config with the original
  vocabulary (no padding), loaded from the original key names (`model.*`, `lm_head.weight`);
* vision tower: `CLIPVisionModel` with the tower directory's config; weights from the checkpoint's
  `model.vision_tower.vision_tower.*` keys when `unfreeze_mm_vision_tower` is true, else from the tower directory
  (`llava/model/multimodal_encoder/clip_encoder.py`, `llava/model/builder.py`);
* projector as `build_vision_projector` builds it (`linear`, `mlp{N}x_gelu`, `identity`), `image_newline`;
* preprocessing as `llava/mm_utils.py` (`authors.images`) with the tower's CLIP image-processor settings;
  prompts as `conversation.py` + `tokenizer_image_token` (`authors.templates`, `authors.tokenizer`);
* feature selection, splicing and `spatial_unpad` merging as `llava/model/llava_arch.py`.

The authors' algorithms and quirks it shares with the converter live in `authors/` (templates, tokenizer,
images, the config fold); the oracle tier checks both against the authors' own code. Weights are read lazily
(`readers.read_checkpoint`) and assigned to meta-device modules (`lazy.py`); with `low_memory=True` decoder
layers are materialised one at a time (`lazy.LayerStreamer`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GenerationConfig,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
)

from .authors import config as authors_config
from .authors.images import (
    get_anyres_image_grid_shape,
    parse_pinpoints,
    process_image,
    select_best_resolution,
    unpad_image,
)
from .authors.templates import authors_prompt, choose_chat_template
from .authors.tokenizer import (
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    authors_added_tokens,
    tokenizer_image_token,
    tokenizer_load_kwargs,
)
from .errors import LlavaConvertError, MappingError
from .lazy import LayerStreamer, load_as, load_into, load_outside, materialize_buffers
from .logs import quiet
from .mapping import load_table, map_tensors
from .original import SUPPORTED_MLP, OriginalCheckpoint, open_original, read_json
from .original.merge import read_tensors
from .original.tower import VisionTower, find_vision_tower
from .plan import DTYPES
from .readers import TensorRef, read_checkpoint, weight_files

TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."

# The attention kernels the authors' stack (transformers 4.36) picks: SDPA in Llama/Mistral, eager in CLIP.
TEXT_ATTENTION = "sdpa"
VISION_ATTENTION = "eager"

LEGACY_CLIP_ATTENTION = "llava_legacy_clip"


def legacy_clip_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CLIPAttention as transformers 4.37-4.40 compute it (the LLaVA-NeXT authors' stack): queries scaled BEFORE
    the product, batched `bmm` per head, softmax in the input dtype. transformers 5's eager kernel scales after
    the product, which differs in the last float32 bits (~5e-7 relative; on a CLIP-tower checkpoint ~1.5e-4 in
    the logits). Registered with transformers as `llava_legacy_clip` (`config._attn_implementation`)."""
    b, h, t, d = query.shape
    q = (query * scaling).reshape(b * h, t, d)
    k = key.reshape(b * h, -1, d)
    v = value.reshape(b * h, -1, d)
    weights = torch.bmm(q, k.transpose(1, 2))
    if attention_mask is not None:
        weights = (weights.view(b, h, t, -1) + attention_mask).view(b * h, t, -1)
    weights = nn.functional.softmax(weights, dim=-1)
    out = torch.bmm(weights, v).view(b, h, t, d).transpose(1, 2).contiguous()
    return out, None


AttentionInterface.register(LEGACY_CLIP_ATTENTION, legacy_clip_attention)

# Greedy decoding with the sampling settings cleared: how both sides of `check` generate.
GREEDY = {"do_sample": False, "num_beams": 1, "temperature": None, "top_p": None, "top_k": None}


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


def build_projector(projector_type: str, mm_hidden: int, hidden: int) -> nn.Module:
    """`build_vision_projector`: the same module tree, so state-dict keys match `model.mm_projector.*`."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden, hidden)
    m = SUPPORTED_MLP.match(projector_type)
    if m:
        modules: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(1, int(m.group(1))):
            modules += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return nn.Identity()
    raise LlavaConvertError(f"unknown mm_projector_type {projector_type!r}")


def clip_vision_state(refs: dict[str, TensorRef], *, where: str) -> dict[str, TensorRef]:
    """A CLIP tower's weights (any layout `mappings/clip.toml` reads: CLIPModel or CLIPVisionModel, saved by
    transformers 4.x or 5.x, with or without position_ids buffers) keyed as transformers 5's
    `CLIPVisionModel` names them (no `vision_model.`). Read through the table `convert` maps towers with,
    so the two commands accept the same towers."""
    problems: list[str] = []
    result = map_tensors(refs, load_table("clip.toml"), {}, problems)
    if problems:
        raise LlavaConvertError(f"{where}: {MappingError(problems)}")
    prefix = "vision_tower.vision_model."
    return {e.target[len(prefix) :]: e.sources[0] for e in result.entries}


# ----------------------------------------------------------------------------------------------------------
# The reference model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImageStages:
    """Every intermediate the reference produces for one image (float tensors on CPU)."""

    pixel_values: torch.Tensor  # [1, 3, S, S] or [1, N, 3, S, S]
    vision_hidden_states: dict[int, torch.Tensor]  # normalised hidden_states index -> selected features
    select_layer: int  # normalised index of mm_vision_select_layer
    num_hidden_states: int  # entries in the tower's hidden_states (layers + 1)
    vision_features: torch.Tensor  # [N, P, mm_hidden]
    image_features: torch.Tensor  # projector output [N, P, hidden]
    merged: torch.Tensor  # what is spliced into the sequence [T, hidden]
    newline_rows: torch.Tensor  # bool [T]: rows of `merged` that are image_newline
    alternatives: dict[str, torch.Tensor] = field(default_factory=dict)  # stage:variant -> tensor (for hints)


@dataclass
class Forward:
    """The language model's pass over one prompt: input embeddings, each layer, final norm, logits."""

    inputs_embeds: torch.Tensor  # [T, hidden]
    layers: list[torch.Tensor]  # each [T, hidden]
    norm: torch.Tensor  # [T, hidden]
    logits: torch.Tensor  # [T, vocab] float32


class Recorder:
    """Forward hooks that record the decoder's per-layer hidden states of the next forward pass."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module):
        self.active = False
        self.embeds: torch.Tensor | None = None
        self.layers: dict[int, torch.Tensor] = {}
        self.norm: torch.Tensor | None = None
        self._handles = [layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_hook(self._layer(i)))
        self._handles.append(norm.register_forward_hook(self._norm))

    @staticmethod
    def _first(x):
        return x[0] if isinstance(x, tuple) else x

    def _pre(self, module, args, kwargs):
        if self.active:
            h = args[0] if args else kwargs["hidden_states"]
            self.embeds = h[0].detach().float().clone()

    def _layer(self, i):
        def hook(module, args, output):
            if self.active:
                self.layers[i] = self._first(output)[0].detach().float().clone()

        return hook

    def _norm(self, module, args, output):
        if self.active:
            self.norm = self._first(output)[0].detach().float().clone()

    @contextlib.contextmanager
    def recording(self) -> Iterator[Recorder]:
        self.active, self.embeds, self.layers, self.norm = True, None, {}, None
        try:
            yield self
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ReferenceModel:
    """The original checkpoint run as the authors' code runs it.

    Args:
        path: original checkpoint directory.
        vision_tower: local CLIP directory (default: the config's `mm_vision_tower` when it is a local path).
        dtype: compute dtype, "float32" or "bfloat16".
        low_memory: stream decoder layers one at a time instead of holding the language model.
        base, delta: the base LLM of a LoRA / projector-only / delta checkpoint; force or rule out delta.
        clip_attention: the CLIP tower's attention kernel (default: the class's `clip_attention`, the one of
            the authors' transformers).

    Raises:
        LlavaConvertError: the checkpoint, its tower or its tokenizer cannot be read.

    Example:
        >>> ref = ReferenceModel("llava-v1.5-7b", vision_tower="clip-vit-large-patch14-336")
        >>> ids = ref.input_ids(ref.prompt("What is shown in this image?"))
    """

    def __init__(
        self,
        path: Path | str,
        *,
        vision_tower: Path | str | None = None,
        dtype: str = "float32",
        low_memory: bool = False,
        base: Path | str | None = None,
        delta: bool | None = None,
        clip_attention: str | None = None,
    ):
        if clip_attention is not None:
            self.clip_attention = clip_attention
        self.ckpt, self.tower = self._open(path, vision_tower=vision_tower, base=base, delta=delta)
        self.tensors, _ = read_tensors(self.ckpt)
        self.config = self.ckpt.config
        self.cfg_path = self.ckpt.path / "config.json"
        self.dtype = DTYPES[dtype]
        self.low_memory = low_memory
        self.conv_mode = choose_chat_template(self.ckpt).name
        tokenizer_dir = self.ckpt.tokenizer_dir
        with quiet():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(
                    str(tokenizer_dir), **tokenizer_load_kwargs(tokenizer_dir)
                )
            except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
                raise LlavaConvertError(
                    f"{tokenizer_dir}: cannot load the tokenizer ({type(e).__name__}: {e})"
                ) from None
            # The tokens the authors' builder adds (load_pretrained_model), in its order.
            added = authors_added_tokens(self.config, self.tokenizer)
            if added:
                self.tokenizer.add_tokens(list(added), special_tokens=True)
        self.image_processor = self._image_processor()
        embed = self.tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise LlavaConvertError(
                f"{self.ckpt.path}: no model.embed_tokens.weight in the checkpoint weights"
            )
        self.vocab_size = self._vocab_rows(embed)
        self.hidden_size = embed.shape[1]
        self.vision = self._build_vision(self._tower_refs(), where=self._tower_where())
        self.vision_config = self.vision.config
        self.projector = self._build_projector()
        newline = self.tensors.get("model.image_newline")
        self.image_newline = load_as(newline, self.dtype) if newline is not None else None
        self.lm, self._streamer = self._build_language_model()
        self.recorder = Recorder(self.lm.model.layers, self.lm.model.norm)

    # -- construction ----------------------------------------------------------------------------------

    def _open(self, path, *, vision_tower, base, delta) -> tuple[OriginalCheckpoint, VisionTower]:
        """The checkpoint and its tower (hook)."""
        # Any form (LoRA / projector-only / delta: the merged model the authors' loader builds, tensor by
        # tensor), also with projectors the converter refuses (`mlp{N}x_gelu` N != 2, `identity`): the
        # reference runs them as the authors do. Without --base or --delta, a full checkpoint whatever its name.
        ckpt = open_original(
            path, base=base, delta=delta if base is not None or delta else False, representable=False
        )
        if vision_tower is not None and Path(vision_tower).exists():
            vision_tower = Path(vision_tower)
        return ckpt, find_vision_tower(ckpt, vision_tower)

    def _image_processor(self):
        """The tower's image processor (hook): CLIP's, from its `preprocessor_config.json`."""
        with quiet():
            try:
                return CLIPImageProcessorPil.from_pretrained(str(self.tower.path))
            except Exception as e:  # noqa: BLE001
                raise LlavaConvertError(
                    f"{self.tower.path / 'preprocessor_config.json'}: cannot build the CLIP image processor ({e})"
                ) from None

    def _vocab_rows(self, embed: TensorRef) -> int:
        """Rows of the vocabulary the authors' model computes logits over (hook): the original's, unpadded."""
        return embed.shape[0]

    def _tower_where(self) -> str:
        return str(self.ckpt.path) if self.ckpt.tower_in_checkpoint else str(self.tower.path)

    def _tower_refs(self) -> dict[str, TensorRef]:
        """The tower the authors' builder uses: the checkpoint's fine-tuned one, or the tower directory's."""
        if self.ckpt.tower_in_checkpoint:
            refs = {k[len(TOWER_PREFIX) :]: r for k, r in self.tensors.items() if k.startswith(TOWER_PREFIX)}
            if not refs:
                raise LlavaConvertError(
                    f"{self.cfg_path}: unfreeze_mm_vision_tower is true but the weights have no "
                    f"{TOWER_PREFIX}* tensors"
                )
            return refs
        return self._directory_tower_refs()

    def _directory_tower_refs(self) -> dict[str, TensorRef]:
        files = self.tower.weight_files or weight_files(self.tower.path)
        return read_checkpoint(self.tower.path, origin="vision_tower", files=files)

    def stray_tower_refs(self) -> dict[str, TensorRef] | None:
        """Tower weights saved in the checkpoint that the authors' code ignores (frozen tower), if any."""
        if self.ckpt.tower_in_checkpoint:
            return None
        refs = {k[len(TOWER_PREFIX) :]: r for k, r in self.tensors.items() if k.startswith(TOWER_PREFIX)}
        return refs or None

    def stock_tower_refs(self) -> dict[str, TensorRef] | None:
        """The tower directory's weights when the checkpoint carries its own fine-tuned tower, if present."""
        if not self.ckpt.tower_in_checkpoint:
            return None
        try:
            return self._directory_tower_refs()
        except LlavaConvertError:
            return None

    clip_attention = VISION_ATTENTION  # the CLIP tower's attention kernel (hook: LLaVA-NeXT's is older)

    def _build_vision(self, refs: dict[str, TensorRef], *, where: str):
        cfg = authors_config.vision_config(self.tower)
        cfg._attn_implementation = self.clip_attention
        with torch.device("meta"):
            model = CLIPVisionModel(cfg)
        load_into(model, clip_vision_state(refs, where=where), self.dtype, where=where)
        materialize_buffers(model)
        return model.eval()

    def _build_projector(self) -> nn.Module:
        ptype = self.config.get("mm_projector_type", "linear")
        mm_hidden = self.config.get("mm_hidden_size") or self.vision_config.hidden_size
        with torch.device("meta"):
            proj = build_projector(ptype, mm_hidden, self.hidden_size)
        refs = {
            k[len(PROJECTOR_PREFIX) :]: r for k, r in self.tensors.items() if k.startswith(PROJECTOR_PREFIX)
        }
        load_into(proj, refs, self.dtype, where=f"{self.ckpt.path} (model.mm_projector, {ptype})")
        return proj.eval()

    def _language_model_class(self):
        """The language model's class and config (hook: the LLaVA-NeXT families add Qwen2)."""
        # The original vocabulary, unpadded; the config's pad id only where it is one of its rows.
        pad = self.config.get("pad_token_id")
        cfg = authors_config.text_config(
            self.config,
            self.ckpt.backbone,
            vocab_size=self.vocab_size,
            pad_token_id=pad if isinstance(pad, int) and 0 <= pad < self.vocab_size else None,
            where=self.cfg_path,
        )
        cfg._attn_implementation = TEXT_ATTENTION
        classes = {"mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
        return classes.get(self.ckpt.backbone, LlamaForCausalLM), cfg

    def _language_model_refs(self, refs: dict[str, TensorRef], cfg) -> dict[str, TensorRef]:
        """The language model's weights as its state dict names them (hook); a tied lm_head is the embedding."""
        if "lm_head.weight" not in refs and cfg.tie_word_embeddings:
            refs["lm_head.weight"] = refs["model.embed_tokens.weight"]
        return refs

    def _build_language_model(self):
        cls, cfg = self._language_model_class()
        with quiet(), torch.device("meta"):
            lm = cls(cfg)
        refs = {
            k: r
            for k, r in self.tensors.items()
            if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))
            # transformers < 4.31 saved the rotary tables; the authors' 4.36 loader ignores them.
            and not k.endswith("rotary_emb.inv_freq")
        }
        refs = self._language_model_refs(refs, cfg)
        where = str(self.ckpt.path)
        streamer = None
        if self.low_memory:
            n = cfg.num_hidden_layers
            per_layer: list[dict[str, TensorRef]] = [{} for _ in range(n)]
            rest = {}
            for k, r in refs.items():
                m = re.match(r"model\.layers\.(\d+)\.(.+)$", k)
                if m and int(m.group(1)) < n:
                    per_layer[int(m.group(1))][m.group(2)] = r
                else:
                    rest[k] = r
            # Everything but the decoder layers now, strictly; each layer is checked as it is streamed in.
            load_outside(lm, rest, self.dtype, skip="model.layers.", where=where)
            streamer = LayerStreamer(lm.model.layers, lambda i: per_layer[i], self.dtype, where)
        else:
            load_into(lm, refs, self.dtype, where=where)
        materialize_buffers(lm)
        return lm.eval(), streamer

    # -- the authors' pipeline -------------------------------------------------------------------------

    def prompt(self, question: str) -> str:
        """The authors' prompt string for QUESTION about one image."""
        return authors_prompt(question, self.conv_mode, im_start_end=bool(self.config.get("mm_use_im_start_end")))

    def input_ids(self, prompt: str) -> list[int]:
        """`tokenizer_image_token(prompt)`: prompt ids with one -200 per `<image>`."""
        return tokenizer_image_token(prompt, self.tokenizer)

    def pixel_values(self, image: Image.Image, pinpoints=None) -> torch.Tensor:
        """`process_images([image], image_processor, config)`; PINPOINTS (default: the config's) for the
        checker's alternatives."""
        return process_image(
            image.convert("RGB"),
            self.image_processor,
            self.config.get("image_aspect_ratio"),
            self.config.get("image_grid_pinpoints") if pinpoints is None else pinpoints,
        )

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        select = self.config.get("mm_vision_select_feature", "patch")
        if select == "patch":
            return hidden[:, 1:]
        if select == "cls_patch":
            return hidden
        raise LlavaConvertError(f"{self.cfg_path}: unknown mm_vision_select_feature {select!r}")

    def _select_layer(self) -> int:
        """The tower's hidden_states index the features come from (hook)."""
        return int(self.config.get("mm_vision_select_layer", -2))

    @torch.inference_mode()
    def vision_hidden_states(self, pixel_values: torch.Tensor, tower: nn.Module | None = None) -> tuple:
        flat = pixel_values.flatten(0, 1) if pixel_values.ndim == 5 else pixel_values
        out = (tower or self.vision)(flat.to(self.dtype), output_hidden_states=True)
        return out.hidden_states

    @torch.inference_mode()
    def encode(self, image: Image.Image, *, alternatives: bool = True) -> ImageStages:
        """Pixel values, tower features, projector output and the merged image features of IMAGE."""
        image = image.convert("RGB")
        pv = self.pixel_values(image)
        hs = self.vision_hidden_states(pv)
        n = len(hs)
        layer = self._select_layer()
        if not -n <= layer < n:
            raise LlavaConvertError(
                f"{self.cfg_path}: mm_vision_select_layer {layer} outside the tower's {n - 1} layers"
            )
        layer %= n
        near = {i: self._select(hs[i]).to(self.dtype) for i in (layer - 1, layer, layer + 1) if 0 <= i < n}
        feats = near[layer]
        projected = self.projector(feats)
        merged, newline_rows = self.merge(projected, image.size, anyres=pv.ndim == 5)
        stages = ImageStages(pv, near, layer, n, feats, projected, merged, newline_rows)
        if alternatives:
            stages.alternatives = self._alternatives(image, pv, feats)
        return stages

    def merge(self, projected: torch.Tensor, image_size: tuple[int, int], *, anyres: bool):
        """`prepare_inputs_labels_for_multimodal`'s image-feature merging for one image."""
        hidden = projected.shape[-1]
        if not anyres:
            feat = projected[0]
            return feat, torch.zeros(feat.shape[0], dtype=torch.bool)
        merge_type = self.config.get("mm_patch_merge_type", "flat")
        aspect = self.config.get("image_aspect_ratio", "square")
        if merge_type == "flat":
            feat = projected.flatten(0, 1)
            return feat, torch.zeros(feat.shape[0], dtype=torch.bool)
        if not merge_type.startswith("spatial"):
            raise LlavaConvertError(f"{self.cfg_path}: unexpected mm_patch_merge_type {merge_type!r}")
        unpad = "unpad" in merge_type
        if unpad and self.image_newline is None:
            raise LlavaConvertError(
                f"{self.ckpt.path}: mm_patch_merge_type {merge_type!r} but no model.image_newline"
            )
        if projected.shape[0] == 1:
            feat = projected[0]
            rows = torch.zeros(feat.shape[0], dtype=torch.bool)
            if unpad:
                feat = torch.cat((feat, self.image_newline[None].to(feat.dtype)), dim=0)
                rows = torch.cat((rows, torch.ones(1, dtype=torch.bool)))
            return feat, rows
        base, tiles = projected[0], projected[1:]
        side = self.vision_config.image_size // self.vision_config.patch_size
        if side * side != base.shape[0]:
            raise LlavaConvertError(
                f"{self.cfg_path}: {base.shape[0]} features per crop, not a {side}x{side} grid "
                "(mm_vision_select_feature cls_patch cannot be merged spatially)"
            )
        if not str(aspect).startswith("anyres"):
            raise LlavaConvertError(f"{self.cfg_path}: spatial merging needs image_aspect_ratio anyres")
        cols, rows_ = get_anyres_image_grid_shape(
            image_size, self.config["image_grid_pinpoints"], self.vision_config.image_size
        )
        t = tiles.view(rows_, cols, side, side, -1)
        if unpad:
            t = t.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            t = self._unpadded(t, image_size, side)
            nl = self.image_newline[:, None, None].expand(*t.shape[:-1], 1).to(t.dtype)
            marker = torch.zeros(1, *t.shape[1:], dtype=t.dtype)
            marker = torch.cat((marker, torch.ones(1, t.shape[1], 1, dtype=t.dtype)), dim=-1)
            t = torch.cat((t, nl), dim=-1)
            t = t.flatten(1, 2).transpose(0, 1)
            is_nl = marker.flatten(1, 2).transpose(0, 1)[:, 0] > 0
        else:
            t = t.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
            is_nl = torch.zeros(t.shape[0], dtype=torch.bool)
        feat = torch.cat((base, t), dim=0)
        rows = torch.cat((torch.zeros(base.shape[0], dtype=torch.bool), is_nl))
        assert feat.shape[-1] == hidden
        return feat, rows

    def _unpadded(self, grid: torch.Tensor, image_size: tuple[int, int], side: int) -> torch.Tensor:
        """The `[C, H, W]` tile grid with the padding removed (hook: LLaVA-NeXT also downscales it)."""
        return unpad_image(grid, image_size)

    @torch.inference_mode()
    def embed(self, input_ids: list[int], merged: torch.Tensor) -> torch.Tensor:
        """The spliced input embeddings `[T, hidden]` (text embeddings with the image features at -200)."""
        ids = torch.tensor(input_ids, dtype=torch.long)
        pos = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if len(pos) != 1:
            raise LlavaConvertError(
                f"the prompt must hold exactly one {DEFAULT_IMAGE_TOKEN}, found {len(pos)}"
            )
        text = torch.cat([ids[: pos[0]], ids[pos[0] + 1 :]])
        emb = self.lm.model.embed_tokens(text)
        out = torch.cat([emb[: pos[0]], merged.to(emb.dtype), emb[pos[0] :]], dim=0)
        max_len = self.config.get("tokenizer_model_max_length")
        return out[:max_len] if max_len else out

    @torch.inference_mode()
    def forward(self, inputs_embeds: torch.Tensor) -> Forward:
        """One pass of the language model over INPUTS_EMBEDS, recording every stage."""
        with self.recorder.recording() as rec:
            out = self.lm(inputs_embeds=inputs_embeds[None], use_cache=False)
        layers = [rec.layers[i] for i in range(len(rec.layers))]
        assert rec.embeds is not None and rec.norm is not None
        return Forward(rec.embeds, layers, rec.norm, out.logits[0].float())

    def generation_config(self, max_new_tokens: int):
        """Greedy decoding with the checkpoint's own generation settings (EOS), as `model.generate` uses them."""
        gen_path = self.ckpt.path / "generation_config.json"
        settings = read_json(gen_path) if gen_path.is_file() else {}
        settings = {
            k: v for k, v in settings.items() if k not in ("transformers_version", "_from_model_config")
        }
        settings.setdefault("bos_token_id", self.config.get("bos_token_id"))
        settings.setdefault("eos_token_id", self.config.get("eos_token_id"))
        settings.update(GREEDY, max_new_tokens=max_new_tokens)
        settings.pop("max_length", None)
        with quiet():
            return GenerationConfig(**settings)

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation (the authors' `generate` feeds the spliced embeddings to HF `generate`)."""
        if max_new_tokens <= 0:
            return []
        with quiet():
            out = self.lm.generate(
                inputs_embeds=inputs_embeds[None],
                attention_mask=torch.ones(1, inputs_embeds.shape[0], dtype=torch.long),
                generation_config=self.generation_config(max_new_tokens),
            )
        return out[0].tolist()

    # -- alternatives (for the checker's hints) --------------------------------------------------------

    def _alternatives(
        self, image: Image.Image, pv: torch.Tensor, feats: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Outputs of known conversion mistakes, so a disagreeing stage can be matched to its likely cause."""
        alt: dict[str, torch.Tensor] = {}
        aspect = self.config.get("image_aspect_ratio")
        if aspect == "pad":
            alt["pixel_values:crop"] = self.image_processor(image, return_tensors="pt")["pixel_values"]
        elif aspect != "anyres":
            alt["pixel_values:pad"] = process_image(image, self.image_processor, "pad")
        else:
            # The pinpoints copied as written: transformers reads each pair as (height, width), which on a tie
            # (an image no larger than the tower on both sides) picks the transposed grid.
            pins = parse_pinpoints(self.config.get("image_grid_pinpoints"))
            transposed = [(h, w) for w, h in pins]
            if select_best_resolution(image.size, transposed) != select_best_resolution(image.size, pins):
                alt["pixel_values:pinpoints_hw"] = process_image(image, self.image_processor, aspect, transposed)
        layer = int(self.config.get("mm_vision_select_layer", -2))
        for label, refs in (("stock", self.stock_tower_refs()), ("stray", self.stray_tower_refs())):
            if refs is None:
                continue
            try:
                tower = self._build_vision(refs, where=label)
            except LlavaConvertError:
                continue
            hs = self.vision_hidden_states(pv, tower)
            alt[f"vision:{label}"] = self._select(hs[layer]).to(self.dtype)
            del tower
        proj = self.projector
        if isinstance(proj, nn.Sequential) and len(proj) == 3:
            first, last = proj[0], proj[2]
            if first.weight.shape == last.weight.shape:
                alt["projector:swapped"] = first(proj[1](last(feats)))
            alt["projector:no_activation"] = last(first(feats))
        elif isinstance(proj, nn.Linear):
            alt["projector:gelu"] = nn.functional.gelu(proj(feats))
        return alt

    def close(self) -> None:
        """Drop hooks and weights (the checker frees the original before loading the converted model)."""
        self.recorder.remove()
        if self._streamer is not None:
            self._streamer.remove()
        self.lm = self.vision = self.projector = None  # type: ignore[assignment]
        self.tensors = {}


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
* preprocessing as `llava/mm_utils.py` (`expand2square`, `process_anyres_image`, ...) with the tower's
  CLIP image-processor settings; prompts as `conversation.py` + `tokenizer_image_token`;
* feature selection, splicing and `spatial_unpad` merging as `llava/model/llava_arch.py`.

Weights are read lazily (`readers.read_checkpoint`); with `low_memory=True` decoder layers are materialised one
at a time (`LayerStreamer`).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .errors import LlavaConvertError
from .logs import quiet
from .processor import choose_chat_template
from .readers import TensorRef, read_checkpoint, weight_files
from .source import (
    ORIGINAL_MODEL_TYPES,
    OriginalCheckpoint,
    VisionTower,
    find_vision_tower,
    open_original,
    read_json,
)

IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
TOWER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
_MLP = re.compile(r"^mlp(\d+)x_gelu$")

# The attention kernels the authors' stack (transformers 4.36) picks: SDPA in Llama/Mistral, eager in CLIP.
TEXT_ATTENTION = "sdpa"
VISION_ATTENTION = "eager"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Greedy decoding with the sampling settings cleared: how both sides of `check` generate.
GREEDY = {"do_sample": False, "num_beams": 1, "temperature": None, "top_p": None, "top_k": None}


# ----------------------------------------------------------------------------------------------------------
# Conversation templates (llava/conversation.py), single turn: the user's question, then the assistant's turn.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """One of the authors' `Conversation` templates (the fields `get_prompt` reads)."""

    system: str
    roles: tuple[str, str]
    style: str  # SINGLE | TWO | MPT | LLAMA_2
    sep: str
    sep2: str | None = None

    def get_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        """`Conversation.get_prompt` for plain-string messages (`None` = the turn to be generated)."""
        if self.style == "SINGLE":
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + ": " + message + self.sep if message else role + ":"
        elif self.style == "TWO":
            seps = [self.sep, self.sep2 or ""]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
        elif self.style == "MPT":
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + message + self.sep if message else role
        elif self.style == "LLAMA_2":
            ret = ""
            for i, (_role, message) in enumerate(messages):
                if not message:
                    continue
                if i == 0 and self.system:
                    message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
                if i % 2 == 0:
                    ret += self.sep + f"[INST] {message} [/INST]"
                else:
                    ret += " " + message + " " + (self.sep2 or "")
            ret = ret.lstrip(self.sep)  # sic: a character-set strip, as the authors do
        else:  # pragma: no cover - the table below only uses the styles above
            raise ValueError(self.style)
        return ret

    def prompt(self, query: str) -> str:
        return self.get_prompt([(self.roles[0], query), (self.roles[1], None)])


_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CONV_TEMPLATES: dict[str, Conversation] = {
    "llava_v0": Conversation(_V1_SYSTEM, ("Human", "Assistant"), "SINGLE", "###"),
    "llava_v1": Conversation(_V1_SYSTEM, ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "vicuna_v1": Conversation(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"),
        "TWO",
        " ",
        "</s>",
    ),
    "llava_llama_2": Conversation(
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        ("USER", "ASSISTANT"),
        "LLAMA_2",
        "<s>",
        "</s>",
    ),
    "mistral_instruct": Conversation("", ("USER", "ASSISTANT"), "LLAMA_2", "", "</s>"),
    "chatml_direct": Conversation(
        "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "MPT",
        "<|im_end|>",
    ),
    "mpt": Conversation(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        "MPT",
        "<|im_end|>",
    ),
}


def authors_prompt(question: str, conv_mode: str, *, im_start_end: bool = False) -> str:
    """The prompt `run_llava.py` builds for one image and QUESTION."""
    image = "<im_start>" + DEFAULT_IMAGE_TOKEN + "<im_end>" if im_start_end else DEFAULT_IMAGE_TOKEN
    if IMAGE_PLACEHOLDER in question:
        qs = question.replace(IMAGE_PLACEHOLDER, image)
    else:
        qs = image + "\n" + question
    try:
        conv = CONV_TEMPLATES[conv_mode]
    except KeyError:
        raise LlavaConvertError(
            f"unknown conversation mode {conv_mode!r} (known: {', '.join(sorted(CONV_TEMPLATES))})"
        ) from None
    return conv.prompt(qs)


def tokenizer_load_kwargs(tokenizer_dir: Path) -> dict[str, Any]:
    """Settings that make transformers' LlamaTokenizer split text like the authors' slow one (4.36).

    With `legacy` true or unset, the authors' tokenizer runs SentencePiece on each piece of text as it is, so
    the model's own `add_dummy_prefix` decides whether a piece starts with "▁". transformers' LlamaTokenizer
    ignores that flag, so a model without the dummy prefix (Yi, llava-v1.6-34b) needs add_prefix_space=False.
    """
    model = tokenizer_dir / "tokenizer.model"
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    legacy = (read_json(cfg_path) if cfg_path.is_file() else {}).get("legacy") is not False
    if not (legacy and model.is_file()):
        return {}
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; loading the tokenizer reports it
        return {}
    return {} if proto.normalizer_spec.add_dummy_prefix else {"add_prefix_space": False}


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """`llava.mm_utils.tokenizer_image_token`: chunks around `<image>` tokenized separately, -200 between."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    sep = [IMAGE_TOKEN_INDEX] * (offset + 1)
    interleaved = [x for chunk in chunks for x in (chunk, sep)][:-1]
    for x in interleaved:
        ids.extend(x[offset:])
    return ids


# ----------------------------------------------------------------------------------------------------------
# Image preprocessing (llava/mm_utils.py)
# ----------------------------------------------------------------------------------------------------------


def select_best_resolution(original_size: tuple[int, int], possible: list) -> tuple[int, int]:
    original_width, original_height = original_size
    best_fit = None
    max_effective = 0
    min_wasted = float("inf")
    for width, height in possible:
        scale = min(width / original_width, height / original_height)
        dw, dh = int(original_width * scale), int(original_height * scale)
        effective = min(dw * dh, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    assert best_fit is not None
    return best_fit


def resize_and_pad_image(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    original_width, original_height = image.size
    target_width, target_height = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    new_image.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return new_image


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    width, height = image.size
    return [
        image.crop((j, i, j + patch_size, i + patch_size))
        for i in range(0, height, patch_size)
        for j in range(0, width, patch_size)
    ]


def _pinpoints(grid_pinpoints) -> list:
    return grid_pinpoints if isinstance(grid_pinpoints, list) else ast.literal_eval(grid_pinpoints)


def get_anyres_image_grid_shape(
    image_size: tuple[int, int], grid_pinpoints, patch_size: int
) -> tuple[int, int]:
    """(columns, rows) of the tile grid."""
    width, height = select_best_resolution(image_size, _pinpoints(grid_pinpoints))
    return width // patch_size, height // patch_size


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def _preprocess(processor, image: Image.Image) -> torch.Tensor:
    return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def process_anyres_image(image: Image.Image, processor, grid_pinpoints) -> torch.Tensor:
    best = select_best_resolution(image.size, _pinpoints(grid_pinpoints))
    padded = resize_and_pad_image(image, best)
    patches = divide_to_patches(padded, processor.crop_size["height"])
    side = processor.size["shortest_edge"]
    base = image.resize((side, side))
    return torch.stack([_preprocess(processor, p) for p in [base, *patches]], dim=0)


def process_image(image: Image.Image, processor, aspect: str | None, grid_pinpoints=None) -> torch.Tensor:
    """`process_images([image], ...)`: `[1, 3, S, S]`, or `[1, N, 3, S, S]` for anyres."""
    if aspect == "pad":
        background = tuple(int(x * 255) for x in processor.image_mean)
        return _preprocess(processor, expand2square(image, background))[None]
    if aspect == "anyres":
        return process_anyres_image(image, processor, grid_pinpoints)[None]
    return processor(image, return_tensors="pt")["pixel_values"]


def unpad_image(tensor: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """`llava_arch.unpad_image`; ORIGINAL_SIZE is (width, height) as the authors pass `image.size`."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


def build_projector(projector_type: str, mm_hidden: int, hidden: int) -> nn.Module:
    """`build_vision_projector`: the same module tree, so state-dict keys match `model.mm_projector.*`."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden, hidden)
    m = _MLP.match(projector_type)
    if m:
        modules: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(1, int(m.group(1))):
            modules += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return nn.Identity()
    raise LlavaConvertError(f"unknown mm_projector_type {projector_type!r}")


def _init_fields(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}


# Keys of the authors' config that are not language-model settings (or that transformers 5 must not see).
_NOT_LM = {
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "vocab_size",
    "pad_token_id",
    "image_aspect_ratio",
    "image_grid_pinpoints",
}


def language_model_config(config: dict[str, Any], backbone: str, vocab_rows: int, attn: str = TEXT_ATTENTION):
    """`LlamaConfig` / `MistralConfig` from the authors' config, with the checkpoint's own vocabulary size."""
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if backbone == "mistral" else LlamaConfig
    allowed = _init_fields(cls) | {"rope_theta", "rope_scaling", "pretraining_tp"}
    fields = {
        k: v for k, v in config.items() if k in allowed and k not in _NOT_LM and not k.startswith("mm_")
    }
    fields = {k: v for k, v in fields.items() if v is not None or k == "sliding_window"}
    pad = config.get("pad_token_id")
    fields["pad_token_id"] = pad if isinstance(pad, int) and 0 <= pad < vocab_rows else None
    fields["vocab_size"] = vocab_rows
    fields.setdefault("tie_word_embeddings", False)
    try:
        cfg = cls(**fields)
    except (TypeError, ValueError) as e:
        raise LlavaConvertError(f"config.json: cannot build {cls.__name__} ({e})") from None
    cfg._attn_implementation = attn
    return cfg


def clip_vision_config(tower: VisionTower, attn: str = VISION_ATTENTION):
    from transformers import CLIPVisionConfig

    fields = {k: v for k, v in tower.config.items() if k in _init_fields(CLIPVisionConfig)}
    cfg = CLIPVisionConfig(**fields)
    cfg._attn_implementation = attn
    return cfg


def materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers a meta-device build leaves empty: rotary tables, CLIP position ids."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            fresh = type(module)(config=module.config)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
        elif type(module).__name__ == "CLIPVisionEmbeddings":
            module.register_buffer(
                "position_ids", torch.arange(module.num_positions).expand((1, -1)), persistent=False
            )


def _cast(ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
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
        _assign(model, k, _cast(r, dtype))


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
    module.load_state_dict({k: _cast(r, dtype) for k, r in refs.items()}, strict=True, assign=True)


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


def clip_vision_state(refs: dict[str, TensorRef], *, where: str) -> dict[str, TensorRef]:
    """A CLIP tower's weights (any layout `mappings/clip.toml` reads: CLIPModel or CLIPVisionModel, saved by
    transformers 4.x or 5.x, with or without position_ids buffers) keyed as transformers 5's
    `CLIPVisionModel` names them (no `vision_model.`). Read through the table `convert` maps towers with,
    so the two commands accept the same towers."""
    from .errors import MappingError
    from .mapping import load_table, map_tensors

    problems: list[str] = []
    result = map_tensors(refs, load_table("clip.toml"), {}, problems)
    if problems:
        raise LlavaConvertError(f"{where}: {MappingError(problems)}")
    prefix = "vision_tower.vision_model."
    return {e.target[len(prefix) :]: e.sources[0] for e in result.entries}


# ----------------------------------------------------------------------------------------------------------
# The reference model
# ----------------------------------------------------------------------------------------------------------


def open_reference_checkpoint(path: Path) -> OriginalCheckpoint:
    """`source.open_original`, but also for projectors the converter refuses (`mlp{N}x_gelu` N != 2, `identity`):
    the reference runs them as the authors do."""
    try:
        return open_original(path)
    except LlavaConvertError:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise
        config = read_json(cfg_path)
        ptype = config.get("mm_projector_type", "linear")
        if not (_MLP.match(ptype) or ptype == "identity") or "mm_vision_tower" not in config:
            raise
        if "text_config" in config or config.get("model_type") not in (*ORIGINAL_MODEL_TYPES, None):
            raise
        backbone = "mistral" if config.get("model_type") == "llava_mistral" else "llama"
        return OriginalCheckpoint(path, config, "full", backbone, weight_files(path))


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
    ):
        from transformers import AutoTokenizer, CLIPImageProcessorPil

        if base is not None or delta:
            # LoRA / projector-only / delta: the merged model the authors' loader builds, tensor by tensor.
            from .forms import open_source, read_tensors

            self.ckpt = open_source(path, base=base, delta=delta)
            self.tensors, _ = read_tensors(self.ckpt)
        else:
            self.ckpt = open_reference_checkpoint(Path(path))
            self.tensors = read_checkpoint(self.ckpt.path)
        if vision_tower is not None and Path(vision_tower).exists():
            vision_tower = Path(vision_tower)
        self.tower = find_vision_tower(self.ckpt, vision_tower)
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
            if self.config.get("mm_use_im_patch_token", True):
                self.tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
            if self.config.get("mm_use_im_start_end", False):
                self.tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
            try:
                self.image_processor = CLIPImageProcessorPil.from_pretrained(str(self.tower.path))
            except Exception as e:  # noqa: BLE001
                raise LlavaConvertError(
                    f"{self.tower.path / 'preprocessor_config.json'}: cannot build the CLIP image processor ({e})"
                ) from None
        embed = self.tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise LlavaConvertError(
                f"{self.ckpt.path}: no model.embed_tokens.weight in the checkpoint weights"
            )
        self.vocab_size = embed.shape[0]
        self.hidden_size = embed.shape[1]
        self.vision = self._build_vision(self._tower_refs(), where=self._tower_where())
        self.vision_config = self.vision.config
        self.projector = self._build_projector()
        newline = self.tensors.get("model.image_newline")
        self.image_newline = _cast(newline, self.dtype) if newline is not None else None
        self.lm, self._streamer = self._build_language_model()
        self.recorder = Recorder(self.lm.model.layers, self.lm.model.norm)

    # -- construction ----------------------------------------------------------------------------------

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

    def _build_vision(self, refs: dict[str, TensorRef], *, where: str):
        from transformers import CLIPVisionModel

        cfg = clip_vision_config(self.tower, VISION_ATTENTION)
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

    def _build_language_model(self):
        from transformers import LlamaForCausalLM, MistralForCausalLM

        cfg = language_model_config(self.config, self.ckpt.backbone, self.vocab_size, TEXT_ATTENTION)
        cls = MistralForCausalLM if self.ckpt.backbone == "mistral" else LlamaForCausalLM
        with quiet(), torch.device("meta"):
            lm = cls(cfg)
        refs = {
            k: r
            for k, r in self.tensors.items()
            if k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))
            # transformers < 4.31 saved the rotary tables; the authors' 4.36 loader ignores them.
            and not k.endswith("rotary_emb.inv_freq")
        }
        if "lm_head.weight" not in refs and cfg.tie_word_embeddings:
            refs["lm_head.weight"] = refs["model.embed_tokens.weight"]
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

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """`process_images([image], image_processor, config)`."""
        return process_image(
            image.convert("RGB"),
            self.image_processor,
            self.config.get("image_aspect_ratio"),
            self.config.get("image_grid_pinpoints"),
        )

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        select = self.config.get("mm_vision_select_feature", "patch")
        if select == "patch":
            return hidden[:, 1:]
        if select == "cls_patch":
            return hidden
        raise LlavaConvertError(f"{self.cfg_path}: unknown mm_vision_select_feature {select!r}")

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
        layer = int(self.config.get("mm_vision_select_layer", -2))
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
        if aspect != "anyres":
            raise LlavaConvertError(f"{self.cfg_path}: spatial merging needs image_aspect_ratio anyres")
        cols, rows_ = get_anyres_image_grid_shape(
            image_size, self.config["image_grid_pinpoints"], self.vision_config.image_size
        )
        t = tiles.view(rows_, cols, side, side, -1)
        if unpad:
            t = t.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            t = unpad_image(t, image_size)
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
        from transformers import GenerationConfig

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
            pins = _pinpoints(self.config.get("image_grid_pinpoints"))
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


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Parameter):
        setattr(parent, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        parent.register_buffer(attr, tensor)

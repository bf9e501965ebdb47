"""The key layouts of a Hugging Face llava / llava_next checkpoint, and the one place that translates them.

* legacy: the names stored on disk by transformers 4.x and the llava-hf repos (what `convert` writes):
  `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`, `image_newline`;
* transformers 5 (in memory): `model.language_model.*`, `lm_head`, `model.vision_tower.*` (CLIPVisionModel
  loses its `vision_model` level), `model.multi_modal_projector.*`, `model.image_newline`;
* in between, transformers 4.52-4.x in memory: as 5 but `model.vision_tower.vision_model.*`. Only skip
  lists (module paths a user may spell from any version) still meet it.

Legacy -> 5 is transformers' own renaming (`conversion_mapping.py`, the rules `from_pretrained` applies),
taken from the model itself (`conversion_rules`) or from a tiny one built once on the meta device. The reverse
direction and the 4.52 spelling are derived from the same rules, applied to the legacy roots below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, rename_source_key

# The model types of a converted checkpoint's config.json, and their transformers classes.
HF_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
MODEL_CLASSES = {
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
}

# The original (authors') LLaMA embedding key: its rows are the vocabulary, its dtype the checkpoint's.
EMBED_KEY = "model.embed_tokens.weight"
# The original output head (absent from a tied checkpoint: Qwen2-0.5B's).
LM_HEAD_KEY = "lm_head.weight"

# Every module root of the legacy layout, most specific first; names outside them keep their spelling.
LEGACY_ROOTS = (
    "language_model.lm_head",
    "language_model.model",
    "vision_tower.vision_model",
    "vision_tower",
    "multi_modal_projector",
    "image_newline",
)


@dataclass(frozen=True)
class Rules:
    """transformers' checkpoint-conversion rules for one model (legacy names -> in-memory names)."""

    renamings: tuple[WeightRenaming, ...]
    converters: tuple[WeightConverter, ...]
    prefix: str

    def rename(self, name: str, params: dict | None = None) -> str:
        """`name` as `from_pretrained` would load it (`params`: the model's own names, to settle its prefix)."""
        out, _ = rename_source_key(name, list(self.renamings), list(self.converters), self.prefix, params)
        return out


def conversion_rules(model: torch.nn.Module) -> Rules:
    """The rules transformers applies when loading a checkpoint into `model`."""
    conv = get_model_conversion_mapping(model)
    return Rules(
        tuple(c for c in conv if isinstance(c, WeightRenaming)),
        tuple(c for c in conv if isinstance(c, WeightConverter)),
        model.base_model_prefix,
    )


@cache
def _rules(model_type: str) -> Rules:
    """The rules of a tiny model of this type (they depend on the module tree, not on sizes)."""
    text = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "intermediate_size": 8, "vocab_size": 16}
    vision = {"model_type": "clip_vision_model", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
              "intermediate_size": 8, "image_size": 4, "patch_size": 2, "projection_dim": 8}
    config_cls, model_cls = MODEL_CLASSES[model_type]
    with torch.device("meta"):
        model = model_cls(config_cls(text_config=text, vision_config=vision))
    return conversion_rules(model)


def to_v5(name: str, model_type: str = "llava_next") -> str:
    """A tensor or module name in any layout -> transformers 5's in-memory name (5 names are unchanged).

    Example: `to_v5("vision_tower.vision_model.post_layernorm.bias") == "model.vision_tower.post_layernorm.bias"`.
    """
    return _rules(model_type).rename(name)


@cache
def _spellings() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each legacy root with its later spellings: 4.52-4.x (the llava rules only), then 5 (all rules)."""
    rules = _rules("llava_next")
    llava_only = Rules(tuple(r for r in rules.renamings if not isinstance(r, PrefixChange)), (), rules.prefix)
    out = []
    for root in LEGACY_ROOTS:
        later = []
        for r in (llava_only, rules):  # a child `.x`: the CLIP prefix rule renames only names under the root
            spelling = r.rename(root + ".x")[: -len(".x")]
            if spelling != root and spelling not in later:
                later.append(spelling)
        out.append((root, tuple(later)))
    return tuple(out)


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def to_legacy(path: str) -> str:
    """A module or tensor name in any layout -> its legacy (on-disk) spelling; other names unchanged.

    Example: `to_legacy("model.vision_tower.encoder.layers.0") == "vision_tower.vision_model.encoder.layers.0"`.
    """
    # 5's `model.vision_tower` is both the tower module (legacy `vision_tower`) and the root of what legacy
    # keeps under `vision_tower.vision_model`: the module itself takes the shorter legacy root, names under it
    # the longer one.
    exact = [legacy for legacy, later in _spellings() if path == legacy or path in later]
    if exact:
        return min(exact, key=len)
    best: tuple[int, int, str] | None = None
    for legacy, later in _spellings():
        for spelling in (legacy, *later):
            if under(path, spelling):
                key = (len(spelling), len(legacy), legacy + path[len(spelling) :])
                best = key if best is None or key > best else best
    return best[2] if best else path


def spellings(name: str) -> list[str]:
    """`name` followed by its spellings in every layout (legacy, 4.52-4.x, 5), if it lies under a known root."""
    legacy = to_legacy(name)
    out = [name]
    for root, later in _spellings():
        if under(legacy, root):
            rest = legacy[len(root) :]
            for spelling in (legacy, *(r + rest for r in later)):
                if spelling not in out:
                    out.append(spelling)
            break
    return out

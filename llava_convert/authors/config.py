"""The fold of an original LLaVA config into the configs of its parts, as transformers builds them.

The authors' `config.json` is the language model's config with the multimodal wiring and training settings
mixed in (`mm_*`, `image_*`, `tune_*`, ...); the vision tower has its own directory and config. Both the
converter (`hfconfig.py`: the converted checkpoint's `text_config` / `vision_config`) and the reference
(`reference.py`: the language model and tower it runs) build their configs here, so the two read the same
fields the same way; independence from the authors' code comes from the oracle tier.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LlavaConvertError

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, PretrainedConfig, SiglipVisionConfig

    from ..original.tower import VisionTower

# Fields of the authors' config that describe the checkpoint, the multimodal wiring or training, not the
# language model (or that the caller decides: vocab_size, pad_token_id).
_NOT_TEXT = {
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "vocab_size",
    "pad_token_id",
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "use_mm_proj",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "unfreeze_mm_vision_tower",
}

# The language model class of each backbone (`OriginalCheckpoint.backbone`), by its transformers name; the
# LLaVA-NeXT repository's Qwen2 / Qwen1.5 backbones are both Qwen2.
TEXT_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}

# The MistralConfig default of the transformers the authors' code ran with (4.36), used when the config
# does not say; not whatever the installed version defaults to.
AUTHORS_SLIDING_WINDOW = 4096


def init_fields(cls) -> set[str]:
    """The keyword arguments CLS's `__init__` names."""
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}


def text_config(
    config: dict[str, Any], backbone: str, *, vocab_size: int, pad_token_id: int | None, where: Path
) -> PretrainedConfig:
    """The language model's `LlamaConfig` / `MistralConfig` (by BACKBONE) from the authors' CONFIG.

    Args:
        config: the original config.json, as a dict.
        backbone: the checkpoint's backbone (TEXT_CONFIG_CLASSES; anything else builds a LlamaConfig).
        vocab_size: rows of the embedding matrix the model is built with.
        pad_token_id: the pad id the model is built with (None: none).
        where: the file named in an error (the original config.json).

    Raises:
        LlavaConvertError: the fields do not build the class.
    """
    # lazy: transformers takes seconds to import; planning and validating a conversion do not need it
    import transformers

    cls = getattr(transformers, TEXT_CONFIG_CLASSES.get(backbone, "LlamaConfig"))
    allowed = init_fields(cls) | {"rope_theta", "rope_scaling"}
    fields = {
        k: v
        for k, v in config.items()
        if k in allowed and k not in _NOT_TEXT and not k.startswith("mm_") and v is not None
    }
    fields["vocab_size"] = vocab_size
    fields["pad_token_id"] = pad_token_id
    fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    if backbone == "mistral":
        # As trained (null on llava-v1.6-mistral-7b), else the authors' default.
        fields["sliding_window"] = config.get("sliding_window", AUTHORS_SLIDING_WINDOW)
    return _build(cls, fields, where)


def authors_siglip_fields(vision: dict[str, Any]) -> dict[str, Any]:
    """A SigLIP tower's config as the LLaVA-NeXT repository runs it (`SigLipVisionTower`): its last encoder layer
    deleted (`layers[:-1]`) and its attention-pooling head replaced by Identity."""
    return {**vision, "model_type": "siglip_vision_model", "num_hidden_layers": int(vision["num_hidden_layers"]) - 1,
            "vision_use_head": False}


def vision_config(tower: VisionTower) -> CLIPVisionConfig | SiglipVisionConfig:
    """The tower's `CLIPVisionConfig` from its own config.json (a CLIPModel's or a CLIPVisionModel's), or its
    `SiglipVisionConfig` for a SigLIP tower (`authors_siglip_fields`).

    Raises:
        LlavaConvertError: the fields do not build the class.
    """
    # lazy: transformers takes seconds to import; planning and validating a conversion do not need it
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = SiglipVisionConfig if tower.config.get("model_type") == "siglip_vision_model" else CLIPVisionConfig
    fields = {k: v for k, v in tower.config.items() if k in init_fields(cls)}
    return _build(cls, fields, tower.path / "config.json")


def _build(cls, fields: dict[str, Any], where: Path):
    """CLS(**FIELDS), also serialisable (`to_dict` trips over values the constructor let through, e.g. a
    `dtype` string transformers cannot name), or one line naming WHERE."""
    try:
        cfg = cls(**fields)
        cfg.to_dict()
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, IndexError, huggingface_hub's StrictDataclassError
        raise LlavaConvertError(f"{where}: cannot build {cls.__name__} ({e})") from None
    return cfg

"""Fold an original LLaVA config (+ its tower's) into Hugging Face `LlavaConfig` / `LlavaNextConfig`, or for the
LLaVA-NeXT repository's families `LlavaOnevisionConfig` (OneVision) / `LlavaNextConfig` (the others)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .authors import config as authors_config
from .authors.images import expand_pinpoints, parse_pinpoints
from .errors import LlavaConvertError
from .original import OriginalCheckpoint
from .original.tower import VisionTower

VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class Vocab:
    """Token-id layout of the converted model."""

    original: int  # rows in the original embedding matrix
    image_token_id: int
    pad_token_id: int
    padded: int  # rows after padding to VOCAB_MULTIPLE
    # Tokens the authors' builder adds to the tokenizer at load time (`<im_patch>`, `<im_start>`, `<im_end>`,
    # when the config asks for them and the saved tokenizer lacks them), in order, before `<image>` / `<pad>`.
    added: tuple[str, ...] = ()


def plan_vocab(original_rows: int, *, tokens: int | None = None, added: tuple[str, ...] = ()) -> Vocab:
    """`<image>` and `<pad>` go right after the tokenizer's last token, the authors' load-time additions included.

    Args:
        original_rows: rows of the original embedding matrix.
        tokens: tokenizer length after the authors' additions (default: `original_rows`). Rows between
            `original_rows` and `tokens` (tokens the authors' builder adds with fresh rows) are filled like padding.
        added: the tokens the authors' builder adds, in order.
    """
    n = original_rows if tokens is None else tokens
    if n < original_rows:
        raise LlavaConvertError(f"tokenizer has {n} tokens, fewer than the {original_rows} embedding rows")
    padded = -(-(n + 2) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return Vocab(original_rows, n, n + 1, padded, tuple(added))


def text_config(ckpt: OriginalCheckpoint, vocab: Vocab) -> dict[str, Any]:
    """The language model's config as the HF class for its backbone builds it, plus 4.x-readable rope fields."""
    cfg = authors_config.text_config(
        ckpt.config,
        ckpt.backbone,
        vocab_size=vocab.padded,
        pad_token_id=vocab.pad_token_id,
        where=ckpt.path / "config.json",
    )
    out = cfg.to_dict()
    # transformers 4.x reads rope_theta / rope_scaling at the top level; 5.x reads rope_parameters.
    out["rope_theta"] = float(ckpt.config.get("rope_theta", 10000.0))
    if ckpt.config.get("rope_scaling") is not None:
        out["rope_scaling"] = ckpt.config["rope_scaling"]
    for k in ("id2label", "label2id"):
        out.pop(k, None)
    return out


def vision_config(tower: VisionTower) -> dict[str, Any]:
    out = authors_config.vision_config(tower).to_dict()
    for k in ("id2label", "label2id"):
        out.pop(k, None)
    return out


def feature_strategy(ckpt: OriginalCheckpoint) -> str:
    select = ckpt.config.get("mm_vision_select_feature", "patch")
    if select == "patch":
        return "default"
    if select == "cls_patch":
        return "full"
    raise LlavaConvertError(f"{ckpt.path / 'config.json'}: unknown mm_vision_select_feature {select!r}")


def image_seq_length(vision: dict[str, Any], strategy: str) -> int:
    n = (vision["image_size"] // vision["patch_size"]) ** 2
    cls = vision.get("model_type") != "siglip_vision_model"  # SigLIP has no CLS token
    return n + (1 if strategy == "full" and cls else 0)


def feature_layer_and_strategy(ckpt: OriginalCheckpoint) -> tuple[int, str]:
    """`vision_feature_layer` and strategy: a SigLIP tower's features are the last hidden state of the
    truncated encoder, every patch (the LLaVA-NeXT authors' SigLipVisionTower ignores mm_vision_select_*)."""
    if ckpt.siglip:
        return -1, "full"
    return int(ckpt.config.get("mm_vision_select_layer", -2)), feature_strategy(ckpt)


def check_next_supported(ckpt: OriginalCheckpoint, vision: dict[str, Any], pins: list | None = None) -> None:
    """Combinations the authors' code runs but LlavaNext cannot express: refuse before writing anything
    (PINS: the pinpoints as read, default the config's)."""
    cfg_path = ckpt.path / "config.json"
    aspect = ckpt.config.get("image_aspect_ratio")
    merge = ckpt.config.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise LlavaConvertError(
            f"{cfg_path}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not supported: "
            "LlavaNext always merges tiles spatially, unpads them and appends image_newline ('spatial_unpad')"
        )
    pins = pins if pins is not None else ckpt.config.get("image_grid_pinpoints")
    if not pins:
        raise LlavaConvertError(f"{cfg_path}: image_aspect_ratio {aspect!r} without image_grid_pinpoints")
    size = vision["image_size"]
    bad = [p for p in pins if p[0] % size or p[1] % size]
    if bad:
        raise LlavaConvertError(
            f"{cfg_path}: image_grid_pinpoints {bad} are not multiples of the vision tower's image size "
            f"{size}; LlavaNext tiles images into whole {size}x{size} crops"
        )


def hf_grid_pinpoints(pinpoints: list | str) -> list[list[int]]:
    """The authors' `image_grid_pinpoints` in the form transformers reads them.

    The authors' `select_best_resolution` (llava/mm_utils.py) reads each pair as (width, height), transformers'
    (processor and model alike) as (height, width); both run the same arithmetic and keep the first best
    candidate in list order. Swapping each pair and keeping the order makes transformers pick the authors' grid
    for every image size, ties included: an image no larger than the tower on both sides upscales equally into
    several candidates, and the first listed wins (the lists are symmetric, so only ties tell them apart).
    """
    return [[int(h), int(w)] for w, h in parse_pinpoints(pinpoints)]


def llava_config(ckpt: OriginalCheckpoint, tower: VisionTower, vocab: Vocab) -> dict[str, Any]:
    """The full HF config dict (`LlavaConfig`, `LlavaNextConfig` or `LlavaOnevisionConfig`), validated by
    building the class."""
    from transformers import LlavaConfig, LlavaNextConfig

    if ckpt.family and ckpt.architecture != "llava":
        return _next_family_config(ckpt, tower, vocab)

    text = text_config(ckpt, vocab)
    vision = vision_config(tower)
    layer, strategy = feature_layer_and_strategy(ckpt)
    projector = ckpt.projector_type
    mm_hidden = ckpt.config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision["hidden_size"]:
        raise LlavaConvertError(
            f"{ckpt.path / 'config.json'}: mm_hidden_size {mm_hidden} does not match the vision tower's "
            f"hidden_size {vision['hidden_size']} ({tower.path})"
        )
    common = dict(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab.image_token_id,
        projector_hidden_act="linear" if projector == "linear" else "gelu",
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_seq_length(vision, strategy),
        multimodal_projector_bias=True,
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    try:
        if ckpt.architecture == "llava_next":
            check_next_supported(ckpt, vision)
            cfg = LlavaNextConfig(image_grid_pinpoints=hf_grid_pinpoints(ckpt.config["image_grid_pinpoints"]), **common)
            arch = "LlavaNextForConditionalGeneration"
        else:
            cfg = LlavaConfig(**common)
            arch = "LlavaForConditionalGeneration"
    except LlavaConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, huggingface_hub's StrictDataclassError
        raise LlavaConvertError(f"{ckpt.path / 'config.json'}: cannot build the Hugging Face config ({e})") from None
    cfg.architectures = [arch]
    return _config_dict(cfg, text, vision, vocab)


def _config_dict(cfg, text: dict[str, Any], vision: dict[str, Any], vocab: Vocab) -> dict[str, Any]:
    """CFG as written to config.json: the sub-configs as folded, the pad id, no label maps."""
    out = cfg.to_dict()
    out["text_config"] = text
    out["vision_config"] = vision
    out["pad_token_id"] = vocab.pad_token_id
    for k in ("id2label", "label2id"):
        out.pop(k, None)
    return out


def _next_family_config(ckpt: OriginalCheckpoint, tower: VisionTower, vocab: Vocab) -> dict[str, Any]:
    """A LLaVA-NeXT-repository checkpoint: `LlavaOnevisionConfig` (OneVision: `vision_aspect_ratio`, a video
    token after `<image>`) or `LlavaNextConfig`, with the pinpoint range expanded; a SigLIP tower's features
    are the last hidden state of the truncated encoder, every patch ("full")."""
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    cfg_path = ckpt.path / "config.json"
    text = text_config(ckpt, vocab)
    vision = vision_config(tower)
    mm_hidden = ckpt.config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision["hidden_size"]:
        raise LlavaConvertError(
            f"{cfg_path}: mm_hidden_size {mm_hidden} does not match the vision tower's hidden_size "
            f"{vision['hidden_size']} ({tower.path})"
        )
    if ckpt.projector_type != "mlp2x_gelu":
        raise LlavaConvertError(f"{cfg_path}: mm_projector_type {ckpt.projector_type!r} (expected mlp2x_gelu)")
    pins = ckpt.config.get("image_grid_pinpoints")
    if not pins:
        raise LlavaConvertError(
            f"{cfg_path}: image_aspect_ratio {ckpt.config.get('image_aspect_ratio')!r} without image_grid_pinpoints"
        )
    tile = vision["image_size"]
    expanded = expand_pinpoints(pins, tile, where=str(cfg_path))
    check_next_supported(ckpt, vision, expanded)
    layer, strategy = feature_layer_and_strategy(ckpt)
    common = dict(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=hf_grid_pinpoints(expanded),
        multimodal_projector_bias=True,
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    try:
        if ckpt.architecture == "llava_onevision":
            cfg = LlavaOnevisionConfig(
                video_token_index=vocab.image_token_id + 1, vision_aspect_ratio=ckpt.config["image_aspect_ratio"],
                **common,
            )
            cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
        else:
            cfg = LlavaNextConfig(image_seq_length=(tile // vision["patch_size"]) ** 2, **common)
            cfg.architectures = ["LlavaNextForConditionalGeneration"]
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, huggingface_hub's StrictDataclassError
        raise LlavaConvertError(f"{cfg_path}: cannot build the Hugging Face config ({e})") from None
    return _config_dict(cfg, text, vision, vocab)

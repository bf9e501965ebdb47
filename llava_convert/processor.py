"""Tokenizer and processor for the converted checkpoint: `<image>` and `<pad>` tokens, image processor set up
the way the authors preprocess (pad-to-square, anyres tiling), and the chat template of the checkpoint family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LlavaConvertError
from .hfconfig import Vocab
from .source import OriginalCheckpoint, VisionTower
from .templates import authors_conv_mode, template_for

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def load_tokenizer(path: Path):
    import warnings

    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        raise LlavaConvertError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) in the checkpoint")
    try:
        # legacy=True: a "▁" is prepended to the text after each special token. The authors'
        # `tokenizer_image_token` tokenizes the text after `<image>` as a fresh string, which starts with
        # SentencePiece's dummy-prefix "▁"; this makes the single-string tokenization give the same ids.
        with warnings.catch_warnings():
            # transformers peeks at config.json, whose original (non-HF) fields it warns about.
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(path), legacy=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        raise LlavaConvertError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def build_tokenizer(ckpt: OriginalCheckpoint, vocab: Vocab):
    """The original tokenizer plus `<image>` (id = original vocab size) and `<pad>` (the next id)."""
    from tokenizers import AddedToken

    tok = load_tokenizer(ckpt.path)
    if len(tok) != vocab.original:
        raise LlavaConvertError(
            f"{ckpt.path}: the tokenizer has {len(tok)} tokens but model.embed_tokens.weight has "
            f"{vocab.original} rows"
        )
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN))
    if got != (vocab.image_token_id, vocab.pad_token_id):
        raise LlavaConvertError(
            f"{ckpt.path}: <image>/<pad> got ids {got}, expected {(vocab.image_token_id, vocab.pad_token_id)}"
        )
    max_len = ckpt.config.get("tokenizer_model_max_length")
    if max_len:
        tok.model_max_length = int(max_len)
    return tok


def _image_kwargs(tower: VisionTower) -> dict[str, Any]:
    """CLIP preprocessing settings carried over from the tower's `preprocessor_config.json`."""
    pre = tower.preprocessor
    size = pre.get("size", {"shortest_edge": tower.config.get("image_size", 336)})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = pre.get("crop_size", {"height": tower.config.get("image_size", 336)})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    kw: dict[str, Any] = {
        "size": size,
        "crop_size": crop,
        "image_mean": pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "image_std": pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        "resample": pre.get("resample", 3),
        "do_resize": pre.get("do_resize", True),
        "do_center_crop": pre.get("do_center_crop", True),
        "do_rescale": pre.get("do_rescale", True),
        "rescale_factor": pre.get("rescale_factor", 1 / 255),
        "do_normalize": pre.get("do_normalize", True),
        "do_convert_rgb": pre.get("do_convert_rgb", True),
    }
    return kw


def chat_template_name(ckpt: OriginalCheckpoint, override: str | None) -> str:
    return override or authors_conv_mode(ckpt.name)


def build_processor(
    ckpt: OriginalCheckpoint,
    tower: VisionTower,
    vocab: Vocab,
    hf_config: dict[str, Any],
    *,
    chat_template: str | None = None,
):
    """A `LlavaProcessor` / `LlavaNextProcessor` that reproduces the authors' preprocessing and prompts."""
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    tok = build_tokenizer(ckpt, vocab)
    template = template_for(chat_template_name(ckpt, chat_template))
    common = dict(
        tokenizer=tok,
        patch_size=tower.config["patch_size"],
        vision_feature_select_strategy=hf_config["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=template,
    )
    kw = _image_kwargs(tower)
    if ckpt.architecture == "llava_next":
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=hf_config["image_grid_pinpoints"], **kw)
        return LlavaNextProcessor(image_processor=image_processor, **common)
    aspect = ckpt.config.get("image_aspect_ratio", "square")
    image_processor = LlavaImageProcessor(do_pad=aspect == "pad", **kw)
    return LlavaProcessor(image_processor=image_processor, **common)

"""Tokenizer and processor for the converted checkpoint: `<image>` and `<pad>` tokens, image processor set up
the way the authors preprocess (pad-to-square, anyres tiling), and the chat template of the checkpoint family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LlavaConvertError
from .hfconfig import Vocab, plan_vocab
from .logs import quiet
from .readers import check_input_file
from .source import OriginalCheckpoint, VisionTower, read_json
from .templates import RELEASE_NAMES, TemplateChoice, authors_name_rule, template_for

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava/constants.py
IM_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"


def load_tokenizer(path: Path, *, legacy: bool = True):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        raise LlavaConvertError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) in the checkpoint")
    for name in TOKENIZER_FILES:  # the tokenizer is saved into OUTPUT: never read one from outside its directory
        if (path / name).is_symlink():
            check_input_file(path / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (path / name).is_file():
            read_json(path / name)  # one clear line for a corrupt file, before transformers trips over it
    if (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        _check_spm(path / "tokenizer.model")
    try:
        # legacy=True (the default): a "▁" is prepended to the text after each special token. The authors'
        # `tokenizer_image_token` tokenizes the text after `<image>` as a fresh string, which starts with
        # SentencePiece's dummy-prefix "▁"; this makes the single-string tokenization give the same ids
        # (see prefix_after_specials for the one case that needs legacy=False).
        kwargs: dict[str, Any] = {"legacy": legacy}
        if not spm_dummy_prefix(path) and authors_legacy(path):
            # A SentencePiece model without the dummy prefix (Yi, llava-v1.6-34b): the authors' legacy slow
            # tokenizer then starts no text with "▁", neither a chunk nor the text after a special token.
            # transformers' LlamaTokenizer ignores the model's flag and needs add_prefix_space=False ("never").
            kwargs["add_prefix_space"] = False
        with quiet():  # transformers peeks at config.json, whose original (non-HF) fields it warns about
            return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        raise LlavaConvertError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _check_spm(path: Path) -> None:
    """A corrupt SentencePiece model makes transformers fall back to tiktoken and blame its absence."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise LlavaConvertError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise LlavaConvertError(f"{path}: not a SentencePiece model (no pieces)")


def authors_added_tokens(config: dict[str, Any], tok) -> tuple[str, ...]:
    """The tokens `load_pretrained_model` adds to the saved tokenizer, in order: `<im_patch>` when
    mm_use_im_patch_token (true when the config lacks it), then `<im_start>`, `<im_end>` when
    mm_use_im_start_end; `add_tokens` skips those the tokenizer already has."""
    wanted = []
    if config.get("mm_use_im_patch_token", True):
        wanted.append(IM_PATCH_TOKEN)
    if config.get("mm_use_im_start_end", False):
        wanted += [IM_START_TOKEN, IM_END_TOKEN]
    have = tok.get_vocab()
    return tuple(t for t in wanted if t not in have)


def plan_tokens(ckpt: OriginalCheckpoint, rows: int) -> Vocab:
    """The converted vocabulary: the saved tokenizer, the authors' load-time additions, then `<image>`, `<pad>`.

    The authors' builder resizes the embeddings to the tokenizer's length after its additions, so the
    embedding rows must lie between the saved tokenizer's length and that length.

    Raises:
        LlavaConvertError: the tokenizer and the embedding rows do not fit together.
    """
    tok = load_tokenizer(ckpt.tokenizer_dir)
    added = authors_added_tokens(ckpt.config, tok)
    n = len(tok) + len(added)
    if not len(tok) <= rows <= n:
        extra = f" (+ {', '.join(added)} added by the authors' loader)" if added else ""
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: the tokenizer has {len(tok)} tokens{extra} but model.embed_tokens.weight has "
            f"{rows} rows"
        )
    return plan_vocab(rows, tokens=n, added=added)


def spm_dummy_prefix(tokenizer_dir: Path) -> bool:
    """Whether the SentencePiece model (tokenizer.model) starts a text with "▁" (`add_dummy_prefix`, true for
    Llama / Vicuna / Mistral, false for Yi). True when there is no tokenizer.model."""
    path = tokenizer_dir / "tokenizer.model"
    if not path.is_file():
        return True
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; transformers reports an unreadable model
        return True
    return proto.normalizer_spec.add_dummy_prefix


def authors_legacy(tokenizer_dir: Path) -> bool:
    """The `legacy` flag the authors' slow LlamaTokenizer runs with (transformers 4.36: true when unset)."""
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    return cfg.get("legacy") is not False


def prefix_after_specials(ckpt: OriginalCheckpoint) -> bool:
    """Whether the converted tokenizer starts the text after a special token with SentencePiece's "▁".

    The authors' `tokenizer_image_token` tokenizes the text after `<image>` as a fresh string, which gets
    the "▁" prefix; text after other special tokens gets it only with a legacy tokenizer. With `<image>`
    alone in the prompt, "always" reproduces them. With mm_use_im_start_end no text follows `<image>`
    (`<im_end>` does), so a non-legacy tokenizer must not add it (prepend_scheme "first").
    """
    return not ckpt.config.get("mm_use_im_start_end") or authors_legacy(ckpt.tokenizer_dir)


def build_tokenizer(ckpt: OriginalCheckpoint, vocab: Vocab):
    """The original tokenizer, the tokens the authors' builder adds (`<im_patch>`, `<im_start>`, `<im_end>`)
    at the ids it gives them, then `<image>` (the next id) and `<pad>` (the one after)."""
    from tokenizers import AddedToken

    tok = load_tokenizer(ckpt.tokenizer_dir, legacy=prefix_after_specials(ckpt))
    if len(tok) + len(vocab.added) != vocab.image_token_id:
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: the tokenizer has {len(tok)} tokens but model.embed_tokens.weight has "
            f"{vocab.original} rows"
        )
    for t in vocab.added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN))
    if got != (vocab.image_token_id, vocab.pad_token_id):
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: <image>/<pad> got ids {got}, expected {(vocab.image_token_id, vocab.pad_token_id)}"
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


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The LLaVA-1.5 / 1.6 recipe (two-layer MLP projector) on a Llama-family LLM: every release of it (Vicuna
# v1.5, and the Yi / Mistral ones decided before this rule) was trained and evaluated with the v1 conversation.
_V1_PROJECTOR = "mlp2x_gelu"


def tokenizer_has(tokenizer_dir: Path, tokens: tuple[str, ...]) -> bool:
    """Whether the tokenizer files in TOKENIZER_DIR hold every one of TOKENS (as added tokens or vocabulary
    pieces), read without building the tokenizer."""
    found: set[str] = set()
    for name in ("tokenizer_config.json", "tokenizer.json", "added_tokens.json", "special_tokens_map.json"):
        path = tokenizer_dir / name
        if path.is_file():
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            found.update(t for t in tokens if json.dumps(t) in text)
    spm = tokenizer_dir / "tokenizer.model"
    if len(found) < len(tokens) and spm.is_file():
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(spm.read_bytes())
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a SentencePiece model
            return False
        pieces = {p.piece for p in proto.pieces}
        found.update(t for t in tokens if t in pieces)
    return len(found) == len(tokens)


def choose_chat_template(ckpt: OriginalCheckpoint, override: str | None = None) -> TemplateChoice:
    """The authors' conversation mode for CKPT, chosen from what identifies the model, and why.

    In order: `override` (--chat-template); the Hub repo id (SOURCE given as one, or a snapshot folder of the
    HF cache) through the authors' name rule when one of its markers is in the name; the config's own fields
    where they decide it (a Mistral backbone; a ChatML tokenizer, as Yi's; the LLaVA-1.5 / 1.6 MLP projector on
    a Llama backbone); last, as the authors do, the folder name, with a warning when that name is not the name
    of a release.

    Example:
        >>> choose_chat_template(open_original(Path("llava-v1.5-7b"))).name  # doctest: +SKIP
        'llava_v1'
    """
    if override:
        return TemplateChoice(override, "given with --chat-template")
    if ckpt.repo_id:
        repo_name = ckpt.name
        mode, marker = authors_name_rule(repo_name)
        if marker is not None:
            return TemplateChoice(
                mode, f"from the Hub repo id {ckpt.repo_id} ('{marker}' in its name, the authors' run_llava.py rule)"
            )
    if ckpt.backbone == "mistral":
        return TemplateChoice(
            "mistral_instruct", f"config.json model_type {ckpt.config.get('model_type')!r} (a Mistral backbone)"
        )
    if tokenizer_has(ckpt.tokenizer_dir, CHATML_TOKENS):
        return TemplateChoice("chatml_direct", "the tokenizer has the ChatML tokens <|im_start|> / <|im_end|>")
    if ckpt.projector_type == _V1_PROJECTOR:
        return TemplateChoice(
            "llava_v1",
            f"config.json mm_projector_type {_V1_PROJECTOR!r} on a Llama backbone (the LLaVA-1.5 / 1.6 recipe)",
        )
    name = ckpt.name
    mode, marker = authors_name_rule(name)
    rule = f"'{marker}' in it" if marker else "no marker in it, the authors' default"
    where = f"the Hub repo name {name!r}" if ckpt.repo_id else f"the folder name {name!r}"
    choice = f"from {where} ({rule}, the authors' run_llava.py rule)"
    warning = None
    if name.lower() not in RELEASE_NAMES:
        warning = (
            f"chat template {mode!r} chosen {choice}, which does not name a LLaVA release and config.json does not "
            "decide it; pass --chat-template if the model was trained with another conversation mode"
        )
    return TemplateChoice(mode, choice, warning)


def chat_template_name(ckpt: OriginalCheckpoint, override: str | None) -> str:
    return choose_chat_template(ckpt, override).name


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
    # run_llava.py: with mm_use_im_start_end the image goes in as <im_start><image><im_end>.
    image_text = (
        IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN + "\n" if ckpt.config.get("mm_use_im_start_end") else IMAGE_TOKEN + "\n"
    )
    template = template_for(chat_template_name(ckpt, chat_template), image_text=image_text)
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

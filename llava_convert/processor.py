"""Tokenizer and processor for the converted checkpoint: `<image>` and `<pad>` tokens, image processor set up
the way the authors preprocess (pad-to-square, anyres tiling), and the chat template of the checkpoint family.

The LLaVA-NeXT repository's families keep their tokenizer's own pad token: Qwen's embedding is padded (151936 /
152064 rows for 151646 tokens), so `<image>` (and OneVision's `<video>`) take the first unused rows; Llama-3's
(128256 rows, its tokenizer's length) grows by `<image>` and `<pad>`. Their processors are written file by file
(`write_next_processor`): `LlavaOnevisionProcessor` cannot be built without torchvision (its video processor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, pre_tokenizers
from transformers import AutoTokenizer

from .authors.templates import choose_chat_template, template_for
from .authors.tokenizer import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    PromptStyle,
    authors_added_tokens,
    authors_prefix_legacy,
    prompt_style,
    read_spm,
    tokenizer_load_kwargs,
)
from .errors import LlavaConvertError
from .hfconfig import Vocab, plan_vocab
from .logs import quiet
from .original import TOKENIZER_FILES, OriginalCheckpoint, read_json
from .original.tower import VisionTower
from .readers import check_input_file

# Without torchvision, transformers resolves the image processors to their PIL versions and warns once.
with quiet():
    from transformers import (
        LlavaImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaProcessor,
    )

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VIDEO_TOKEN = "<video>"  # LLaVA-OneVision's, right after <image>
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]


def load_tokenizer(path: Path, *, legacy: bool = True):
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
        # legacy: whether a "▁" is prepended to the text after each special token (see PromptStyle).
        kwargs: dict[str, Any] = {"legacy": legacy, **tokenizer_load_kwargs(path)}
        with quiet():  # transformers peeks at config.json, whose original (non-HF) fields it warns about
            return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        raise LlavaConvertError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def _check_spm(path: Path) -> None:
    """A corrupt SentencePiece model makes transformers fall back to tiktoken and blame its absence."""
    try:
        proto = read_spm(path)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise LlavaConvertError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise LlavaConvertError(f"{path}: not a SentencePiece model (no pieces)")


def plan_tokens(ckpt: OriginalCheckpoint, rows: int) -> Vocab:
    """The converted vocabulary: the saved tokenizer, the authors' load-time additions, then `<image>`, `<pad>`.

    The authors' builder resizes the embeddings to the tokenizer's length after its additions, so the
    embedding rows must lie between the saved tokenizer's length and that length.

    Raises:
        LlavaConvertError: the tokenizer and the embedding rows do not fit together.
    """
    tok = load_tokenizer(ckpt.tokenizer_dir)
    if ckpt.family:
        return _plan_next_vocab(ckpt, rows, tok)
    added = authors_added_tokens(ckpt.config, tok)
    n = len(tok) + len(added)
    if not len(tok) <= rows <= n:
        extra = f" (+ {', '.join(added)} added by the authors' loader)" if added else ""
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: the tokenizer has {len(tok)} tokens{extra} but model.embed_tokens.weight has "
            f"{rows} rows"
        )
    return plan_vocab(rows, tokens=n, added=added)


def _plan_next_vocab(ckpt: OriginalCheckpoint, rows: int, tok) -> Vocab:
    """Qwen: `<image>` (and `<video>` for OneVision) take the first unused rows of the padded embedding, the
    tokenizer's own pad token stays. Llama-3: `<image>` and `<pad>` are added and the rows grow."""
    n = len(tok)
    if ckpt.family == "llama3":
        if rows != n:
            raise LlavaConvertError(
                f"{ckpt.tokenizer_dir}: the tokenizer has {n} tokens but model.embed_tokens.weight has {rows} rows"
            )
        return plan_vocab(rows)
    extra = 2 if ckpt.family == "onevision" else 1
    if not n <= rows or tok.pad_token_id is None:
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: the tokenizer has {n} tokens (pad {tok.pad_token!r}) but "
            f"model.embed_tokens.weight has {rows} rows"
        )
    return Vocab(rows, n, tok.pad_token_id, max(rows, n + extra))


def _apply_style(tok, style: PromptStyle) -> None:
    """Set the tokenizer's SentencePiece prefix rule and drop its automatic BOS (the template writes it)."""
    backend = tok.backend_tokenizer
    if style.prepend:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=style.prepend, split=False)
        if style.prepend == "first":
            backend.normalizer = None  # the Metaspace replaces spaces; no extra "▁" before a leading space
    tok.add_bos_token = False


def build_tokenizer(ckpt: OriginalCheckpoint, vocab: Vocab):
    """The original tokenizer, the tokens the authors' builder adds (`<im_patch>`, `<im_start>`, `<im_end>`)
    at the ids it gives them, then `<image>` (the next id) and `<pad>` (the one after); with its `PromptStyle`."""
    tok = load_tokenizer(ckpt.tokenizer_dir, legacy=authors_prefix_legacy(ckpt))
    style = prompt_style(ckpt, tok)
    if len(tok) + len(vocab.added) != vocab.image_token_id:
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: the tokenizer has {len(tok)} tokens but model.embed_tokens.weight has "
            f"{vocab.original} rows"
        )
    for t in vocab.added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False)], special_tokens=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    _finish_tokenizer(ckpt, tok, vocab)
    _apply_style(tok, style)
    return tok, style


def _finish_tokenizer(ckpt: OriginalCheckpoint, tok, vocab: Vocab) -> None:
    """Check that `<image>` and the pad token got the planned ids; the authors' length limit, left padding."""
    got = (tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id)
    if got != (vocab.image_token_id, vocab.pad_token_id):
        raise LlavaConvertError(
            f"{ckpt.tokenizer_dir}: <image>/{tok.pad_token} got ids {got}, expected "
            f"{(vocab.image_token_id, vocab.pad_token_id)}"
        )
    max_len = ckpt.config.get("tokenizer_model_max_length")
    if max_len:
        tok.model_max_length = int(max_len)
    tok.padding_side = "left"  # batched generation


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


def build_processor(
    ckpt: OriginalCheckpoint,
    tower: VisionTower,
    vocab: Vocab,
    hf_config: dict[str, Any],
    *,
    chat_template: str | None = None,
):
    """A `LlavaProcessor` / `LlavaNextProcessor` that reproduces the authors' preprocessing and prompts."""
    tok, style = build_tokenizer(ckpt, vocab)
    # run_llava.py: with mm_use_im_start_end the image goes in as <im_start><image><im_end> (no text follows
    # <image> directly, and the fresh string after it starts with a special token: no "▁").
    if ckpt.config.get("mm_use_im_start_end"):
        image_text = IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN + "\n"
    else:
        image_text = IMAGE_TOKEN + style.fresh + "\n"
    template = template_for(
        choose_chat_template(ckpt, chat_template).name, image_text=image_text, bos=style.bos, start=style.fresh
    )
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


def _token_entry(tok, token_id: int) -> dict[str, Any]:
    t = tok.added_tokens_decoder[token_id]
    return {
        "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
        "single_word": t.single_word, "special": t.special,
    }


def _compat_tokenizer_json(path: Path) -> None:
    """Spell tokenizer.json so that tokenizers 0.15 (transformers 4.36-4.39) reads it too, with the same
    tokens: BPE merges as "a b" strings (the form every version reads), and the Metaspace pre-tokenizer's
    `add_prefix_space` next to `prepend_scheme` (0.15 requires it; newer versions read it as the scheme)."""
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    merges = model.get("merges")
    if merges and all(isinstance(m, list) and not any(" " in part for part in m) for m in merges):
        model["merges"] = [" ".join(m) for m in merges]
    pre = data.get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Metaspace":
            p["add_prefix_space"] = p.get("prepend_scheme") != "never"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer_files(processor, out: Path, tokenizer_dir: Path) -> None:
    """Rewrite the tokenizer and processor files `save_pretrained` left in OUT into the llava-hf set that
    transformers 4.x and 5.x both read.

    - tokenizer_config.json: a class every version knows (`LlamaTokenizer`: 4.x picks its fast twin and
      reads tokenizer.json, 5.x reads tokenizer.json for llava models whatever the class), no automatic BOS
      (the chat template writes it), the special tokens, no save-time fields (`is_local`, `backend`, ...)
      and no `add_prefix_space` (4.x would rebuild the tokenizer from tokenizer.model with it).
    - special_tokens_map.json, tokenizer.model (the original SentencePiece model, when there is one).
    - preprocessor_config.json: the image processor (4.x reads it only from there); processor_config.json
      keeps the processor's own settings.
    - chat_template.json next to chat_template.jinja (4.x before 4.50 read only the JSON form).
    """
    tok = processor.tokenizer
    sp_model = tokenizer_dir / "tokenizer.model"
    if sp_model.is_file():
        shutil.copyfile(sp_model, out / "tokenizer.model")
    specials = {
        k: v for k in ("bos_token", "eos_token", "unk_token", "pad_token") if (v := getattr(tok, k, None)) is not None
    }
    cfg: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _token_entry(tok, i) for i in sorted(tok.added_tokens_decoder)},
        **specials,
        "clean_up_tokenization_spaces": False,
        "legacy": '"first"' not in str(tok.backend_tokenizer.pre_tokenizer.__getstate__()),
        "model_max_length": int(tok.model_max_length),
        "padding_side": "left",
        "processor_class": type(processor).__name__,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer" if sp_model.is_file() else "LlamaTokenizerFast",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    by_content = {t.content: i for i, t in tok.added_tokens_decoder.items()}
    stm = {}
    for k, v in specials.items():
        entry = _token_entry(tok, by_content[v]) if v in by_content else {"content": v}
        entry.pop("special", None)
        stm[k] = entry
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, ensure_ascii=False) + "\n")

    _compat_tokenizer_json(out / "tokenizer.json")

    proc_path = out / "processor_config.json"
    proc_cfg = json.loads(proc_path.read_text())
    image_cfg = proc_cfg.pop("image_processor", None) or processor.image_processor.to_dict()
    image_cfg["processor_class"] = type(processor).__name__
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2, sort_keys=True) + "\n")
    proc_path.write_text(json.dumps(proc_cfg, indent=2, sort_keys=True) + "\n")
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


def build_next_tokenizer(ckpt: OriginalCheckpoint, vocab: Vocab):
    """The original tokenizer with `<image>` (and `<video>`) at the planned ids; Llama-3 also gets `<pad>`.
    No automatic BOS: the Llama-3 template writes it (the authors' double BOS)."""
    tok = load_tokenizer(ckpt.tokenizer_dir)
    added = [IMAGE_TOKEN] + ([VIDEO_TOKEN] if ckpt.family == "onevision" else [])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if ckpt.family == "llama3":
        tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
        tok.add_bos_token = False
    _finish_tokenizer(ckpt, tok, vocab)
    return tok


def build_next_processor(
    ckpt: OriginalCheckpoint, tower: VisionTower, vocab: Vocab, hf_config: dict[str, Any], chat_template: str
):
    """The tokenizer, image processor and processor settings reproducing the authors' image path and prompts
    for a LLaVA-NeXT-repository checkpoint: `(tokenizer, image_processor, processor_class, settings)`."""
    tok = build_next_tokenizer(ckpt, vocab)
    template = template_for(chat_template, bos=ckpt.family == "llama3")
    vision = hf_config["vision_config"]
    pre = tower.preprocessor
    # The authors' SigLipImageProcessor (hard-coded): a square resize, bicubic, 1/255, mean = std = 0.5.
    siglip = dict(
        size={"height": vision["image_size"], "width": vision["image_size"]},
        image_mean=pre.get("image_mean", SIGLIP_MEAN_STD), image_std=pre.get("image_std", SIGLIP_MEAN_STD),
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
    )
    if ckpt.architecture == "llava":  # the pretrain stage's square images: resized whole (no tiles, no pad)
        kw = {**siglip, "do_center_crop": False} if ckpt.siglip else _image_kwargs(tower)
        image_processor = LlavaImageProcessor(do_pad=False, **kw)
    elif ckpt.architecture == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=hf_config["image_grid_pinpoints"], **siglip)
    elif ckpt.siglip:  # Interleave: LlavaNext's tiling with SigLIP's square resize (its outputs are what
        # LlavaNextForConditionalGeneration takes; OneVision's processor adds `batch_num_images`, which it refuses)
        image_processor = LlavaNextImageProcessor(
            image_grid_pinpoints=hf_config["image_grid_pinpoints"], do_center_crop=False,
            crop_size=dict(siglip["size"]), **siglip,
        )
    else:
        image_processor = LlavaNextImageProcessor(
            image_grid_pinpoints=hf_config["image_grid_pinpoints"], **_image_kwargs(tower)
        )
    settings: dict[str, Any] = {
        "vision_feature_select_strategy": hf_config["vision_feature_select_strategy"], "chat_template": template,
        "image_token": IMAGE_TOKEN,
    }
    if ckpt.architecture == "llava_onevision":
        settings.update(num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
                        vision_aspect_ratio=hf_config["vision_aspect_ratio"], video_token=VIDEO_TOKEN)
        return tok, image_processor, "LlavaOnevisionProcessor", settings
    settings.update(patch_size=vision["patch_size"], num_additional_image_tokens=0 if ckpt.siglip else 1)
    return tok, image_processor, "LlavaNextProcessor" if ckpt.architecture == "llava_next" else "LlavaProcessor", settings


def write_next_processor(out: Path, tok, image_processor, processor_class: str, settings: dict[str, Any]) -> None:
    """Save a LLaVA-NeXT-repository processor as `save_pretrained` lays it out (tokenizer files,
    preprocessor_config.json, processor_config.json, chat_template.jinja / .json), by hand: the files load with
    `AutoProcessor` where torchvision is installed and piece by piece where it is not."""
    settings = dict(settings)
    template = settings.pop("chat_template")
    tok.save_pretrained(str(out))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["processor_class"] = processor_class
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    image_cfg = image_processor.to_dict()
    image_cfg["image_processor_type"] = type(image_processor).__name__.removesuffix("Pil")
    image_cfg["processor_class"] = processor_class
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2, sort_keys=True) + "\n")
    if processor_class == "LlavaOnevisionProcessor":
        video = {k: image_cfg[k] for k in ("size", "image_mean", "image_std", "resample", "do_rescale",
                                            "rescale_factor", "do_normalize", "do_convert_rgb") if k in image_cfg}
        video.update(video_processor_type="LlavaOnevisionVideoProcessor", processor_class=processor_class,
                     do_resize=True)
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    proc = {"processor_class": processor_class, **settings}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(template)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")

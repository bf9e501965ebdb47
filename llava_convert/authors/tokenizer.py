"""The authors' tokenizer behaviour (haotian-liu/LLaVA 1.2.2 on transformers 4.36).

Which tokenizer their builder loads (slow or fast) and how it splits text (`legacy`, SentencePiece's dummy
prefix), the tokens it adds at load time, and `tokenizer_image_token`. The converter's tokenizer
(`processor.py`) and the reference (`reference.py`) both take these facts from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..readers import read_json

if TYPE_CHECKING:
    from ..original import OriginalCheckpoint

# llava/constants.py
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
IM_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"


def read_spm(path: Path):
    """The SentencePiece `ModelProto` in PATH (a tokenizer.model); protobuf's DecodeError when it is not one."""
    # lazy: protobuf bindings, needed only for SentencePiece models
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def spm_dummy_prefix(tokenizer_dir: Path) -> bool:
    """Whether the SentencePiece model (tokenizer.model) starts a text with "▁" (`add_dummy_prefix`, true for
    Llama / Vicuna / Mistral, false for Yi). True when there is no tokenizer.model."""
    path = tokenizer_dir / "tokenizer.model"
    if not path.is_file():
        return True
    try:
        proto = read_spm(path)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; transformers reports an unreadable model
        return True
    return proto.normalizer_spec.add_dummy_prefix


def authors_legacy(tokenizer_dir: Path) -> bool:
    """The `legacy` flag the authors' slow LlamaTokenizer runs with (transformers 4.36: true when unset)."""
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    return cfg.get("legacy") is not False


def tokenizer_load_kwargs(tokenizer_dir: Path) -> dict[str, Any]:
    """Settings that make transformers' LlamaTokenizer split text like the authors' slow one (4.36).

    With `legacy` true or unset, the authors' tokenizer runs SentencePiece on each piece of text as it is, so
    the model's own `add_dummy_prefix` decides whether a piece starts with "▁": a model without the dummy
    prefix (Yi, llava-v1.6-34b) starts no text with "▁", neither a chunk nor the text after a special token.
    transformers' LlamaTokenizer ignores the model's flag and needs add_prefix_space=False ("never").
    """
    if authors_legacy(tokenizer_dir) and not spm_dummy_prefix(tokenizer_dir):
        return {"add_prefix_space": False}
    return {}


def authors_added_tokens(config: dict[str, Any], tok) -> tuple[str, ...]:
    """The tokens `load_pretrained_model` adds to the saved tokenizer TOK, in order: `<im_patch>` when
    mm_use_im_patch_token (true when the config lacks it), then `<im_start>`, `<im_end>` when
    mm_use_im_start_end; `add_tokens` skips those the tokenizer already has."""
    wanted = []
    if config.get("mm_use_im_patch_token", True):
        wanted.append(IM_PATCH_TOKEN)
    if config.get("mm_use_im_start_end", False):
        wanted += [IM_START_TOKEN, IM_END_TOKEN]
    have = tok.get_vocab()
    return tuple(t for t in wanted if t not in have)


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
        try:
            proto = read_spm(spm)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a SentencePiece model
            return False
        pieces = {p.piece for p in proto.pieces}
        found.update(t for t in tokens if t in pieces)
    return len(found) == len(tokens)


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


@dataclass(frozen=True)
class PromptStyle:
    """How the converted tokenizer and chat template reproduce the authors' prompt ids.

    The authors' `tokenizer_image_token` tokenizes the text before and after `<image>` as fresh strings: each
    starts with SentencePiece's "▁" (dummy prefix), BOS comes first when their tokenizer adds it. Inside a
    string, a legacy tokenizer starts the text after every special token (`</s>`, `<|im_start|>`) with "▁"
    too, a non-legacy one never does. One tokenizer setting cannot put "▁" after `<image>` and not after
    `</s>`, so with a non-legacy original the tokenizer never adds it after a special token and the template
    writes a space where the authors start a fresh string (after BOS, after `<image>`), which the tokenizer
    turns into that "▁". The template emits BOS (so that tokenizing the rendered prompt without special
    tokens, as vLLM's chat server does, gives it) and the tokenizer does not add one.
    """

    bos: bool  # the authors' ids start with BOS: the template writes it
    prepend: str  # Metaspace prepend_scheme: "always" (legacy), "first" (non-legacy), "never" (no dummy
    # prefix); "" leaves a tokenizer without a Metaspace pre-tokenizer as it is
    fresh: str  # what the template writes where the authors tokenize a fresh string: " " or ""


def authors_fast_tokenizer(ckpt: OriginalCheckpoint) -> bool:
    """Whether the authors' builder loads a fast tokenizer (`builder.py`: `mpt` in the name, or `mistral` in
    the name of a full model); otherwise it loads the slow one."""
    name = ckpt.name.lower()
    return "mpt" in name or ("mistral" in name and ckpt.form not in ("lora", "projector"))


def authors_prefix_legacy(ckpt: OriginalCheckpoint) -> bool:
    """Whether the authors' tokenizer starts the text after every special token with "▁".

    The slow tokenizer does when `legacy` is true or unset. A fast one follows its tokenizer.json, and
    transformers 4.36 builds a missing tokenizer.json the legacy way whatever `legacy` says."""
    if authors_fast_tokenizer(ckpt):
        path = ckpt.tokenizer_dir / "tokenizer.json"
        if path.is_file():
            return '"first"' not in json.dumps(read_json(path).get("pre_tokenizer"))
        return True
    return authors_legacy(ckpt.tokenizer_dir)


def prompt_style(ckpt: OriginalCheckpoint, tok) -> PromptStyle:
    """The `PromptStyle` for the original tokenizer TOK (loaded by `processor.load_tokenizer`)."""
    ids = tok("a").input_ids
    bos = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    if "Metaspace" not in str(tok.backend_tokenizer.pre_tokenizer):  # not a SentencePiece-style tokenizer.json
        return PromptStyle(bos=bos, prepend="", fresh="")
    if not authors_prefix_legacy(ckpt):
        return PromptStyle(bos=bos, prepend="first", fresh=" ")
    return PromptStyle(bos=bos, prepend="always" if spm_dummy_prefix(ckpt.tokenizer_dir) else "never", fresh="")

"""Oracle fixture builder for the LLaVA-NeXT repository's families: tiny ORIGINAL checkpoints + the authors' outputs.

Run with the isolated oracle-next venv (``scripts/envs/25-oracle-next.sh``: ``llavaction==0.0.1``, i.e. the
lmms-lab/LLaVA-NeXT ``llava`` package renamed ``llavaction``, with transformers 4.40.2 and the CPU torch)::

    .venv-oracle-next/bin/python tests/oracle_next/make_reference.py --out ROOT [--cases ov_05b,llama3,...]

It writes::

    ROOT/hf-cache/      a Hugging Face hub cache (HF_HUB_CACHE) holding, under their real Hub ids, the tiny
                        towers and tokenizer the authors' code fetches by name:
                          google/siglip-so400m-patch14-384     SiglipModel (text + vision), 384 px, patch 14
                          openai/clip-vit-large-patch14-336    CLIPModel (text + vision), 336 px, patch 14
                          meta-llama/Meta-Llama-3-8B-Instruct  the tiny Llama-3 tokenizer (conversation.py
                                                               renders ``llava_llama_3`` with its chat template)
    ROOT/<case>/<checkpoint-dir>/   the original checkpoint, laid out as the release it mimics
    ROOT/<case>/reference.pt        the authors' outputs (torch.load(..., weights_only=True) safe)
    ROOT/<case>/reference.json      the same facts without tensors (prompt, ids, sizes, generations)

Why a hub cache: the authors' ``build_vision_tower`` treats ANY existing local path as a CLIP tower, so a
SigLIP tower can only be reached through its Hub id; and ``conversation.py`` loads the Llama-3 tokenizer
``meta-llama/Meta-Llama-3-8B-Instruct`` at import (``safe_load_tokenizer``). Both are served from the cache
(offline), so this script sets ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE=1`` before importing transformers.
Tests that load these checkpoints with other code must point ``HF_HUB_CACHE`` at ROOT/hf-cache too.

How the authors' code is run (and where it had to be bent, each on purpose):
  * The checkpoint is built with the authors' own classes (``LlavaQwenForCausalLM`` / ``LlavaLlamaForCausalLM``
    construct the tower from the hub cache in ``__init__``), every parameter randomised with a seeded
    generator (the authors' ``SigLipPreTrainedModel._init_weights`` is a no-op and ``image_newline`` is
    ``torch.empty``), saved with ``save_pretrained`` in bfloat16 (the releases' dtype) as safetensors shards +
    index; a tied-embedding model therefore has no ``lm_head.weight`` on disk, as the real 0.5b releases.
  * ``load_pretrained_model`` cannot run float32 on CPU (it takes only "float16"/"bfloat16", and with any
    ``device_map`` other than "auto" it moves the tower to CUDA), so ``authors_load`` repeats its steps for
    these models verbatim (tokenizer, model class ``from_pretrained``, the ``<im_patch>``/``<im_start>`` tokens,
    ``resize_token_embeddings(len(tokenizer))``, ``vision_tower.load_model``, the tower's image processor) with
    ``torch_dtype=float32`` and ``attn_implementation="sdpa"`` (the authors default to flash_attention_2,
    which needs CUDA). bfloat16 -> float32 is exact.
  * llavaction's ``prepare_inputs_labels_for_multimodal`` returns 7 values (an added action index) but only
    ``llava_qwen.py`` unpacks 7; ``llava_llama.py`` still unpacks 6. For the Llama case the model instance gets a
    one-line adapter that drops the 7th value (``adapt_llama``); nothing else changes.

Everything is seeded; two runs give identical ``reference.pt`` tensors.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output root directory")
    ap.add_argument("--cases", default=None, help="comma list of cases (default: all)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    _ARGS = _parse_args(None)
    _ROOT = _ARGS.out.resolve()
    _ROOT.mkdir(parents=True, exist_ok=True)
    # Must precede every huggingface_hub / transformers import: both read these at import time.
    os.environ["HF_HUB_CACHE"] = str(_ROOT / "hf-cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from next_images import test_images_next  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    SiglipConfig,
    SiglipModel,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FORMAT_VERSION = 1
QUESTION = "What is shown in this image?"
MAX_NEW_TOKENS = 8
IMAGE_TOKEN_INDEX = -200  # llavaction.constants.IMAGE_TOKEN_INDEX (checked after import)

SIGLIP_ID = "google/siglip-so400m-patch14-384"
CLIP336_ID = "openai/clip-vit-large-patch14-336"
LLAMA3_TOKENIZER_ID = "meta-llama/Meta-Llama-3-8B-Instruct"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ---------------------------------------------------------------------------------------------------
# Tokenizers: tiny byte-level BPEs (the `tokenizers` library) carrying the real special tokens verbatim.
# ---------------------------------------------------------------------------------------------------

# Pre-tokenizer split patterns, verbatim from the released tokenizer.json files.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645 in Qwen1.5/Qwen2
# Llama-3 (Meta-Llama-3-8B-Instruct): 256 special tokens from id 128000, in this order.
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
assert len(LLAMA3_SPECIALS) == 256
# Chat templates shipped in the tokenizer configs (verbatim): Qwen2-*-Instruct / Qwen1.5-*-Chat, and
# Meta-Llama-3-8B-Instruct (the one conversation.py's llava_llama_3 renders through apply_chat_template).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_CORPUS = [
    QUESTION,
    "You are a helpful assistant.",
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.",
    "system user assistant image picture photo shows a cat dog car tree house person street sky water red green "
    "blue white black small large left right top bottom the of and in on with this that there is are was",
    "The image shows a small red house next to a tall green tree under a blue sky.",
    "A person is walking a dog on the street; there are two cars on the left.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024, 3.14 - ( ) [ ] : ; ! ? ' \" / \\ # % & * + = < > @ _ ` { } | ~",
]


def _bpe(split: str, base_vocab: int, *, nfc: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if nfc:
        from tokenizers import normalizers

        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    assert tok.get_vocab_size() == base_vocab, tok.get_vocab_size()
    return tok


def _added_tokens_decoder(first_id: int, names: list[str]) -> dict:
    return {
        str(first_id + i): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
        for i, n in enumerate(names)
    }


def save_qwen_tokenizer(ckpt_dir: Path, base_vocab: int, model_max_length: int) -> int:
    """Qwen1.5/Qwen2 tokenizer files as the lmms-lab repos ship them; returns len(tokenizer).

    Files: tokenizer.json, vocab.json, merges.txt, added_tokens.json, special_tokens_map.json,
    tokenizer_config.json (Qwen2Tokenizer, bos null, eos <|im_end|>, pad <|endoftext|>, padding right).
    """
    tok = _bpe(QWEN2_SPLIT, base_vocab, nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(QWEN_SPECIALS)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", unk_token=None,
                              pad_token="<|endoftext|>")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(ckpt_dir)
    tok.model.save(str(ckpt_dir))  # vocab.json + merges.txt, as the releases carry them
    (ckpt_dir / "added_tokens.json").write_text(
        json.dumps({t: base_vocab + i for i, t in sorted(enumerate(QWEN_SPECIALS), key=lambda x: x[1])}, indent=2)
        + "\n")
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(base_vocab, QWEN_SPECIALS),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (ckpt_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (ckpt_dir / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
    }, indent=2) + "\n")
    return base_vocab + len(QWEN_SPECIALS)


def save_llama3_tokenizer(out_dir: Path, base_vocab: int) -> int:
    """Llama-3 tokenizer files (Meta-Llama-3-8B-Instruct layout); returns len(tokenizer).

    tokenizer.json with the <|begin_of_text|> TemplateProcessing post-processor (a BOS is added to every
    encode), 256 special tokens after the BPE vocab, tokenizer_config.json: PreTrainedTokenizerFast,
    bos <|begin_of_text|>, eos <|eot_id|>, the Llama-3 chat template.
    """
    tok = _bpe(LLAMA3_SPLIT, base_vocab, nfc=False)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos_id = base_vocab
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A:0", pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        ),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    cfg = {
        "added_tokens_decoder": _added_tokens_decoder(base_vocab, LLAMA3_SPECIALS),
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "eos_token": {"content": "<|eot_id|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
    }, indent=2) + "\n")
    return base_vocab + len(LLAMA3_SPECIALS)


# ---------------------------------------------------------------------------------------------------
# Seeded initialisation
# ---------------------------------------------------------------------------------------------------


# Layer gain of the LLaVA models' LLM + projector. With 1.5 (the tower's) the tiny LLMs, the tied ones above all,
# repeat one token for all 8 greedy steps; 3.0 gives varied continuations with top-1/top-2 margins of
# 0.02-1.5 (see ``generated_margins``), far above the 1e-4 logit tolerance of a float32 conversion.
LM_GAIN = 3.0


@torch.no_grad()
def init_params(module: torch.nn.Module, gen: torch.Generator, *, gain: float = 1.5, head_gain: float = 3.0,
                row_spread: float = 0.5, skip: str | None = None) -> None:
    """Seeded, large-ish init so logits are decisive; every parameter is overwritten (none left empty)."""
    for name, p in module.named_parameters():
        if skip and skip in name:
            continue

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32)

        n = name.lower()
        if ("norm" in n or "layrnorm" in n) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * randn(p.shape))
        elif name.endswith("bias"):
            p.copy_(0.05 * randn(p.shape))
        elif "embed_tokens" in n or "embedding" in n or name.endswith("image_newline") or "class_embedding" in n:
            p.copy_(randn(p.shape))
        elif "logit_scale" in n or "logit_bias" in n:
            p.copy_(randn(p.shape))
        elif name.startswith("lm_head"):
            fan_in = p.shape[1]
            row = torch.exp(row_spread * randn(p.shape[0], 1))
            p.copy_((head_gain / math.sqrt(fan_in)) * randn(p.shape) * row)
        elif p.ndim >= 2:
            p.copy_((gain / math.sqrt(p[0].numel())) * randn(p.shape))
        else:
            p.copy_(0.1 * randn(p.shape))


@torch.no_grad()
def perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """'Fine-tune' a module: seeded noise on every parameter (the checkpoint's tower then differs from the cache)."""
    for _, p in module.named_parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


# ---------------------------------------------------------------------------------------------------
# The hub cache: tiny towers and the Llama-3 tokenizer under their real ids
# ---------------------------------------------------------------------------------------------------


def put_in_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay ``src``'s files out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> -> ../../blobs/..."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    blobs = repo / "blobs"
    for d in (snap, blobs, repo / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    return snap


def build_hub_cache(root: Path) -> dict:
    cache = root / "hf-cache"
    if cache.exists():
        shutil.rmtree(cache)
    staging = root / "_staging"
    if staging.exists():
        shutil.rmtree(staging)

    # google/siglip-so400m-patch14-384: a full SiglipModel (text + vision, the MAP head included), config.json in
    # the release's compact form. Sizes shrunk except image_size 384 / patch 14: the authors' SigLIP tower
    # hard-codes them (SigLipVisionConfig() defaults, and it asserts 729 = 27 x 27 patches per crop).
    siglip_cfg = {
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "model_type": "siglip_text_model",
                        "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 64,
                        "max_position_embeddings": 16},
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        "vision_config": {"hidden_size": 32, "image_size": 384, "intermediate_size": 64,
                          "model_type": "siglip_vision_model", "num_attention_heads": 4, "num_hidden_layers": 3,
                          "patch_size": 14},
    }
    torch.manual_seed(7)
    siglip = SiglipModel(SiglipConfig(**{k: v for k, v in siglip_cfg.items() if k.endswith("_config")})).eval()
    init_params(siglip, torch.Generator().manual_seed(7), gain=1.5)
    d = staging / "siglip"
    siglip.save_pretrained(d, safe_serialization=True)
    (d / "config.json").write_text(json.dumps(siglip_cfg, indent=2) + "\n")
    (d / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    }, indent=2) + "\n")
    put_in_hub_cache(cache, SIGLIP_ID, d)

    # openai/clip-vit-large-patch14-336: a full CLIPModel with the full config and the legacy
    # preprocessor_config.json (REFERENCE.md 4); 336 px / patch 14 kept so the released (w, h) pinpoints
    # (multiples of 336) stay verbatim. Weights as model.safetensors, not the release's pytorch_model.bin:
    # transformers 4.40 answers a cached .bin with a Hub request for a safetensors conversion (``has_file``),
    # which fails offline.
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, projection_dim=16, pad_token_id=1, bos_token_id=97, eos_token_id=98)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
                  patch_size=14, projection_dim=16)
    torch.manual_seed(11)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    init_params(clip, torch.Generator().manual_seed(11), gain=1.5)
    d = staging / "clip336"
    clip.save_pretrained(d, safe_serialization=True)
    clip.config.to_json_file(d / "config.json", use_diff=False)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD, "resample": 3, "size": 336,
    }, indent=2) + "\n")
    put_in_hub_cache(cache, CLIP336_ID, d)

    # meta-llama/Meta-Llama-3-8B-Instruct: only the tokenizer (conversation.py's llava_llama_3 template).
    d = staging / "llama3-tok"
    save_llama3_tokenizer(d, LLAMA3_BASE_VOCAB)
    put_in_hub_cache(cache, LLAMA3_TOKENIZER_ID, d)
    shutil.rmtree(staging)
    return {"hf_cache": "hf-cache", "repos": [SIGLIP_ID, CLIP336_ID, LLAMA3_TOKENIZER_ID]}


# ---------------------------------------------------------------------------------------------------
# Case definitions. config.json of each checkpoint: the release's keys and values verbatim, sizes shrunk.
# ---------------------------------------------------------------------------------------------------

QWEN_BASE_VOCAB = 381  # + 3 specials = 384 tokens (len(tokenizer)); config vocab_size padded above it
LLAMA3_BASE_VOCAB = 400  # + 256 specials = 656 = vocab_size (Llama-3: tokenizer length == vocab_size)

OV_PINPOINTS_RANGE = "(1x1),...,(6x6)"
OV_PINPOINTS_LIST = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
NEXT_384_PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
NEXT_336_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Source of every verbatim field (the tiny sizes replace hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, mm_hidden_size, vocab_size and the token ids):
#  * OV_05B: lmms-lab/llava-onevision-qwen2-0.5b-ov config.json (same key set as the 0.5b-si and 7b-ov configs
#    seen in the stored Hub pages: lmms-lab/llava-onevision-qwen2-0.5b-si via 4bit/llava-onevision-qwen2-0.5b-si,
#    and lmms-lab/llava-onevision-qwen2-7b-ov as copied verbatim in PaddleMIX's llava tests); Qwen2-0.5B:
#    tie_word_embeddings true, GQA 14/2, sliding_window 32768. image_grid_pinpoints is kept as the training
#    scripts' range string "(1x1),...,(6x6)" (mm_utils expands it); the released file lists the 36 pairs.
#  * OV_7B: lmms-lab/llava-onevision-qwen2-7b-ov config.json (PaddleMIX copy): untied, GQA 28/4,
#    sliding_window 131072, vocab 152064 (> len(tokenizer) 151646), pinpoints as the 36-pair list.
#  * INTERLEAVE: lmms-lab/llava-next-interleave-qwen-0.5b config.json (stored Hub page, raw form, up to
#    "use_mm_proj"; the remaining keys are Qwen2Config's: use_sliding_window, vocab_size 151936):
#    Qwen1.5-0.5B-Chat (MHA 16/16, tied), anyres (not anyres_max), 5 pinpoints of 384, crop/split 224,
#    mm_tunable_parts without the tower (frozen SigLIP, still saved in model.safetensors: 1.73 GB).
#  * LLAMA3: lmms-lab/llama3-llava-next-8b config.json (stored Hub page up to "pretraining_tp"; the rest is
#    Meta-Llama-3-8B-Instruct's: rms_norm_eps 1e-5, rope_theta 500000, vocab 128256, plus the LLaVA keys the
#    training writes): CLIP-336, anyres, 336 pinpoints, eos 128001, mm_use_im_patch_token false.
#  * NEXT72B: lmms-lab/llava-next-72b config.json (stored Hub page up to "mm_vision_tower_lr"; the rest as
#    the interleave one): Qwen1.5-72B-Chat (MHA 64/64, untied, vocab 152064), CLIP-336, anyres.
_OV_COMMON = {
    "architectures": ["LlavaQwenForCausalLM"],
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "image_aspect_ratio": "anyres_max_9",
    "image_crop_resolution": None,
    "image_split_resolution": None,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "mm_newline_position": "one_token",
    "mm_patch_merge_type": "spatial_unpad",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_spatial_pool_mode": "bilinear",
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": SIGLIP_ID,
    "mm_vision_tower_lr": 2e-06,
    "model_type": "llava",
    "pos_skipping_range": 4096,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "tokenizer_model_max_length": 32768,
    "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "use_mm_proj": True,
    "use_pos_skipping": False,
    "use_sliding_window": False,
    "vision_tower_pretrained": None,
}
_NEXT_QWEN_COMMON = {
    "architectures": ["LlavaQwenForCausalLM"],
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "image_aspect_ratio": "anyres",
    "image_crop_resolution": 224,
    "image_split_resolution": 224,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "mm_patch_merge_type": "spatial_unpad",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "model_type": "llava_qwen",
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tokenizer_model_max_length": 32768,
    "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0",
    "use_cache": True,
    "use_mm_proj": True,
    "use_sliding_window": False,
}
TINY_QWEN = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
# generation_config.json of lmms-lab/llava-onevision-qwen2-{7b,72b}-ov-chat (stored Hub pages, 294 bytes; the
# 7b-ov / llava-next-72b / interleave-7b files have the same size), token ids shrunk. generate() applies it:
# the authors' greedy runs (do_sample=False) still get repetition_penalty 1.05 and stop at either eos id.
QWEN_CHAT_GENERATION_CONFIG = {
    "attn_implementation": "flash_attention_2",
    "bos_token_id": QWEN_BASE_VOCAB,
    "do_sample": True,
    "eos_token_id": [QWEN_BASE_VOCAB + 2, QWEN_BASE_VOCAB],
    "pad_token_id": QWEN_BASE_VOCAB,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "transformers_version": "4.40.0.dev0",
}
QWEN_TOKENS = {"bos_token_id": QWEN_BASE_VOCAB, "eos_token_id": QWEN_BASE_VOCAB + 2}  # <|endoftext|>, <|im_end|>

CASES: dict[str, dict] = {
    # LLaVA-OneVision 0.5b (lmms-lab/llava-onevision-qwen2-{0.5b-si,0.5b-ov}): Qwen2 + SigLIP, tied embeddings,
    # anyres_max_9 with the range grid, the tower trained (inside the checkpoint, differs from the Hub tower).
    "ov_05b": dict(
        seed=301, dir_name="llava-onevision-qwen2-tiny-ov", cls="qwen", conv="qwen_1_5", tokenizer="qwen",
        tower="siglip", train_tower=True, shard=None,
        config={**_OV_COMMON, **TINY_QWEN, **QWEN_TOKENS,
                "_name_or_path": "/mnt/bn/vl-research/checkpoints/onevision/llavanext-google_siglip-so400m-patch14-"
                                 "384-Qwen_Qwen2-0.5B-Instruct-mid_to_final_3m",
                "image_grid_pinpoints": OV_PINPOINTS_RANGE, "max_window_layers": 2, "mm_hidden_size": 32,
                "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 32768,
                "tie_word_embeddings": True, "vocab_size": 448},
    ),
    # LLaVA-OneVision 7b/72b (lmms-lab/llava-onevision-qwen2-7b-ov): untied lm_head, pinpoints as the list.
    "ov_7b": dict(
        seed=302, dir_name="llava-onevision-qwen2-tiny-7b-ov", cls="qwen", conv="qwen_1_5", tokenizer="qwen",
        tower="siglip", train_tower=True, shard="150KB", generation_config=QWEN_CHAT_GENERATION_CONFIG,
        config={**_OV_COMMON, **TINY_QWEN, **QWEN_TOKENS,
                "_name_or_path": "lmms-lab/llava-onevision-qwen2-7b-ov",
                "image_grid_pinpoints": OV_PINPOINTS_LIST, "max_window_layers": 2, "mm_hidden_size": 32,
                "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 131072,
                "tie_word_embeddings": False, "vocab_size": 512},
    ),
    # LLaVA-NeXT-Interleave (lmms-lab/llava-next-interleave-qwen-0.5b): Qwen1.5-0.5B-Chat (MHA, tied), frozen
    # SigLIP (saved as loaded), anyres with five 384-pinpoints, one model.safetensors.
    "interleave": dict(
        seed=303, dir_name="llava-next-interleave-qwen-tiny", cls="qwen", conv="qwen_1_5", tokenizer="qwen",
        tower="siglip", train_tower=False, shard=None,
        config={**_NEXT_QWEN_COMMON, **TINY_QWEN, **QWEN_TOKENS,
                "_name_or_path": "/mnt/bn/vl-research/checkpoints/feng/dist1_llavanext-Qwen_Qwen1.5-0.5B-Chat-"
                                 "mlp2x_gelu-pretrain_blip558k_plain-finetune_la1_6mix_fvis_direct32k",
                "image_grid_pinpoints": NEXT_384_PINPOINTS, "max_window_layers": 2, "mm_hidden_size": 32,
                "mm_tunable_parts": "mm_mlp_adapter,mm_language_model", "mm_vision_tower": SIGLIP_ID,
                "mm_vision_tower_lr": None, "num_attention_heads": 4, "num_key_value_heads": 4,
                "tie_word_embeddings": True, "vocab_size": 448},
    ),
    # llama3-llava-next-8b (lmms-lab/llama3-llava-next-8b): Llama-3-8B-Instruct + CLIP-336 (trained), anyres,
    # llava_llama_3 template (rendered by the Llama-3 tokenizer's chat template).
    "llama3": dict(
        seed=324, dir_name="llama3-llava-next-tiny", cls="llama", conv="llava_llama_3", tokenizer="llama3",
        tower="clip336", train_tower=True, shard="150KB",
        config={
            "_name_or_path": "/mnt/bn/vl-research-boli01-cn/workspace/zzz/projects/zzz/llava_next/project_checkpoints/"
                             "llavanext-openai_clip-vit-large-patch14-336-meta-llama_Meta-Llama-3-8B-Instruct-"
                             "blip558k_pretrain_plain_unmask_special_tokens",
            "architectures": ["LlavaLlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": LLAMA3_BASE_VOCAB, "eos_token_id": LLAMA3_BASE_VOCAB + 1, "hidden_act": "silu",
            "hidden_size": 64, "image_aspect_ratio": "anyres", "image_crop_resolution": 224,
            "image_grid_pinpoints": NEXT_336_PINPOINTS, "image_split_resolution": 224, "initializer_range": 0.02,
            "intermediate_size": 128, "max_position_embeddings": 8192, "mm_hidden_size": 32,
            "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
            "mm_resampler_type": None, "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
            "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2, "mm_vision_tower": CLIP336_ID, "mm_vision_tower_lr": 2e-06,
            "model_type": "llava_llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
            "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True,
            "use_mm_proj": True, "vocab_size": LLAMA3_BASE_VOCAB + 256,
        },
    ),
    # llava-next-72b / -110b (lmms-lab/llava-next-72b): Qwen1.5-72B-Chat (MHA, untied) + CLIP-336 (trained),
    # anyres, qwen_1_5 template, safetensors shards + index.
    "next72b": dict(
        seed=305, dir_name="llava-next-tiny-72b", cls="qwen", conv="qwen_1_5", tokenizer="qwen",
        tower="clip336", train_tower=True, shard="150KB", generation_config=QWEN_CHAT_GENERATION_CONFIG,
        config={**_NEXT_QWEN_COMMON, **TINY_QWEN, **QWEN_TOKENS,
                "_name_or_path": "Qwen/Qwen1.5-72B-Chat", "image_grid_pinpoints": NEXT_336_PINPOINTS,
                "max_window_layers": 2, "mm_hidden_size": 32,
                "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
                "mm_vision_tower": CLIP336_ID, "mm_vision_tower_lr": 2e-06, "num_attention_heads": 4,
                "num_key_value_heads": 4, "tie_word_embeddings": False, "vocab_size": 512},
    ),
}


# ---------------------------------------------------------------------------------------------------
# Build, load like the authors, record
# ---------------------------------------------------------------------------------------------------


def _model_cls(kind: str):
    from llavaction.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llavaction.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

    return (LlavaQwenConfig, LlavaQwenForCausalLM) if kind == "qwen" else (LlavaConfig, LlavaLlamaForCausalLM)


def build_checkpoint(spec: dict, case_dir: Path) -> Path:
    ckpt = case_dir / spec["dir_name"]
    if ckpt.exists():
        shutil.rmtree(ckpt)
    cfg_dict = dict(spec["config"])
    if spec["tokenizer"] == "qwen":
        n_tok = save_qwen_tokenizer(ckpt, QWEN_BASE_VOCAB, cfg_dict["tokenizer_model_max_length"])
    else:
        n_tok = save_llama3_tokenizer(ckpt, LLAMA3_BASE_VOCAB)
    assert cfg_dict["vocab_size"] >= n_tok

    config_cls, model_cls = _model_cls(spec["cls"])
    config = config_cls(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(spec["seed"])
    # The authors' LlavaMetaModel builds the tower in __init__ (delay_load false): it loads the Hub tower from
    # the cache (SigLIP: its last encoder layer deleted, head -> Identity).
    model = model_cls(config).float().eval()
    tower = model.get_model().get_vision_tower()
    assert tower.is_loaded
    gen = torch.Generator().manual_seed(spec["seed"])
    init_params(model, gen, skip=".vision_tower.", gain=LM_GAIN)
    if spec["train_tower"]:
        perturb(tower.vision_tower, torch.Generator().manual_seed(spec["seed"] + 1), scale=0.05)
    model = model.to(torch.bfloat16)
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {"max_shard_size": "10GB"}
    model.save_pretrained(ckpt, safe_serialization=True, **kwargs)
    # config.json: the release's keys and values (not 4.40's full dump of every PretrainedConfig default).
    (ckpt / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    gen_cfg = spec.get("generation_config") or {
        "bos_token_id": cfg_dict["bos_token_id"], "eos_token_id": cfg_dict["eos_token_id"],
        "transformers_version": cfg_dict["transformers_version"],
    }
    (ckpt / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return ckpt


def authors_load(spec: dict, ckpt: Path):
    """``llavaction.model.builder.load_pretrained_model`` for these models, in float32 on CPU (see module doc)."""
    from llavaction.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
    from transformers import AutoTokenizer

    config_cls, model_cls = _model_cls(spec["cls"])
    if spec["cls"] == "llama":  # the builder's "llama" branch: use_fast=False, LlavaConfig.from_pretrained
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt), use_fast=False)
        llava_cfg = config_cls.from_pretrained(str(ckpt))
        model = model_cls.from_pretrained(str(ckpt), low_cpu_mem_usage=True, attn_implementation="sdpa",
                                          config=llava_cfg, torch_dtype=torch.float32)
    else:  # the "qwen" branch (model_name "llava_qwen")
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        model = model_cls.from_pretrained(str(ckpt), low_cpu_mem_usage=True, attn_implementation="sdpa",
                                          torch_dtype=torch.float32)
    mm_use_im_start_end = getattr(model.config, "mm_use_im_start_end", False)
    mm_use_im_patch_token = getattr(model.config, "mm_use_im_patch_token", True)
    if mm_use_im_patch_token:
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if mm_use_im_start_end:
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model(device_map=None)
    image_processor = vision_tower.image_processor
    return tokenizer, model.float().eval(), image_processor


def adapt_llama(model) -> None:
    """llava_llama.py unpacks 6 values from prepare_inputs_labels_for_multimodal, which returns 7 in llavaction
    (the 7th, an action index, is llavaction's own): drop the 7th for this instance, nothing else."""
    from llavaction.model.llava_arch import LlavaMetaForCausalLM

    model.prepare_inputs_labels_for_multimodal = (
        lambda *a, **k: LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal(model, *a, **k)[:6]
    )


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


@torch.inference_mode()
def make_reference(case: str, spec: dict, ckpt: Path) -> dict:
    from llavaction.constants import DEFAULT_IMAGE_TOKEN
    from llavaction.conversation import conv_templates
    from llavaction.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token

    tokenizer, model, image_processor = authors_load(spec, ckpt)
    if spec["cls"] == "llama":
        adapt_llama(model)
    n_vocab = model.get_output_embeddings().weight.shape[0]
    assert n_vocab == len(tokenizer)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    # copy.deepcopy as the LLaVA-NeXT examples do: Conversation.copy() drops the tokenizer that the
    # llava_llama_3 template renders with (its get_prompt then raises).
    conv = copy.deepcopy(conv_templates[spec["conv"]])
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == 1
    image_pos = int((input_ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    tower = model.get_vision_tower()
    tower_size = tower.image_size if hasattr(tower, "image_size") else None

    per_image: dict[str, dict] = {}
    for name, image in test_images_next().items():
        image_sizes = [image.size]
        pixel_values = process_images([image], image_processor, model.config)
        assert isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 5, type(pixel_values)
        ids = input_ids.unsqueeze(0)
        grid_w, grid_h = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower_size)
        crops = pixel_values[0]
        vision_features = tower(crops)
        image_features = model.encode_images(crops)
        out_prep = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixel_values, ["image"],
                                                             image_sizes)
        inputs_embeds = out_prep[4][0]
        n_img = inputs_embeds.shape[0] - (ids.shape[1] - 1)
        merged = inputs_embeds[image_pos : image_pos + n_img]

        out = model(ids, images=pixel_values, image_sizes=image_sizes, return_dict=True, use_cache=False,
                    output_hidden_states=False)
        logits = out.logits[0].float()
        gen = model.generate(ids, images=pixel_values, image_sizes=image_sizes, do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, use_cache=True, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else model.config.eos_token_id)
        raw = gen.sequences[0]
        # transformers 4.40 generates from inputs_embeds only (the authors' generate always does): the output
        # holds just the new tokens.
        assert raw.shape[0] == len(gen.scores), (raw.shape, len(gen.scores))
        scores = torch.stack([s[0] for s in gen.scores], dim=0).float()
        top2 = scores.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        assert logits.shape == (inputs_embeds.shape[0], n_vocab)
        assert torch.allclose(scores[0], logits[-1], atol=1e-4, rtol=1e-4)
        assert int(logits[-1].argmax()) == int(raw[0])

        per_image[name] = {
            "image_size": [int(image.size[0]), int(image.size[1])],
            "grid": [int(grid_w), int(grid_h)],
            "input_ids": input_ids.clone(),
            "image_token_pos": image_pos,
            "pixel_values": _f32(pixel_values),
            "vision_features": _f32(vision_features),
            "image_features": _f32(image_features),
            "merged_image_features": _f32(merged),
            "num_image_tokens": int(n_img),
            "inputs_embeds_len": int(inputs_embeds.shape[0]),
            "logits": _f32(logits),
            "generated": raw.to(torch.long).clone(),
            "generated_scores": _f32(scores),
            "generated_margins": [float(m) for m in margins],
            "generated_text": tokenizer.decode(raw, skip_special_tokens=False),
        }

    return {
        "format_version": FORMAT_VERSION,
        "case": case,
        "checkpoint_dir": ckpt.name,
        "model_class": type(model).__name__,
        "conv_mode": spec["conv"],
        "question": QUESTION,
        "prompt": prompt,
        "max_new_tokens": MAX_NEW_TOKENS,
        "generation_config": json.loads((ckpt / "generation_config.json").read_text()),
        "tokenizer_class": type(tokenizer).__name__,
        "len_tokenizer": len(tokenizer),
        "config_vocab_size": int(spec["config"]["vocab_size"]),
        "logits_vocab": int(n_vocab),
        "tied_embeddings": bool(tied),
        "tower": {"hub_id": spec["config"]["mm_vision_tower"], "trained": spec["train_tower"],
                  "image_size": int(tower_size), "class": type(tower).__name__},
        "image_processor": {"class": type(image_processor).__name__,
                            "image_mean": [float(x) for x in image_processor.image_mean],
                            "image_std": [float(x) for x in image_processor.image_std]},
        "image_names": list(per_image),
        "images": per_image,
    }


def _json_view(ref: dict) -> dict:
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.tolist() if v.dtype == torch.long else {"shape": list(v.shape), "dtype": str(v.dtype)}
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(ref)


def run_case(case: str, out_root: Path) -> None:
    t0 = time.perf_counter()
    spec = CASES[case]
    case_dir = out_root / case
    case_dir.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(spec, case_dir)
    ref = make_reference(case, spec, ckpt)
    torch.save(ref, case_dir / "reference.pt")
    (case_dir / "reference.json").write_text(json.dumps(_json_view(ref), indent=1) + "\n")
    parts = [
        f"{n}: grid={r['grid']} px={tuple(r['pixel_values'].shape)} img_tok={r['num_image_tokens']} "
        f"gen={r['generated'].tolist()} min_margin={min(r['generated_margins']):.2f}"
        for n, r in ref["images"].items()
    ]
    print(f"[{case}] {ref['checkpoint_dir']} {ref['model_class']} conv={ref['conv_mode']} vocab={ref['logits_vocab']}"
          f" | " + " | ".join(parts) + f" | {time.perf_counter() - t0:.1f}s", flush=True)


def main(args: argparse.Namespace) -> int:
    cases = list(CASES) if not args.cases else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"unknown case(s): {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_root = args.out.resolve()
    t0 = time.perf_counter()
    info = build_hub_cache(out_root)
    import llavaction.constants as lc  # after the cache exists: conversation.py reads the Llama-3 tokenizer

    assert lc.IMAGE_TOKEN_INDEX == IMAGE_TOKEN_INDEX
    from llavaction.conversation import conv_templates

    assert conv_templates["llava_llama_3"].tokenizer is not None, "Llama-3 tokenizer not served from the cache"
    (out_root / "hub_cache.json").write_text(json.dumps(info, indent=2) + "\n")
    for case in cases:
        run_case(case, out_root)
    print(f"done: {len(cases)} case(s) in {time.perf_counter() - t0:.1f}s -> {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))

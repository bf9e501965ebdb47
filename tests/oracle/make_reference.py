"""Oracle fixture builder: tiny ORIGINAL-format LLaVA checkpoints + the LLaVA authors' own outputs.

Run with the isolated oracle venv (transformers 4.36.2 + llava-torch 1.2.2.post1, CPU torch):

    .venv-oracle/bin/python tests/oracle/make_reference.py --out ROOT [--cases v15,llama2,...]

For every case it writes ``ROOT/<case>/``::

    <checkpoint-dir>/   original LLaVA checkpoint (its NAME matters: the authors' builder picks the
                        model class from it and run_llava.py picks the conversation template from it)
    clip/               tiny full CLIPModel (text + vision) + legacy openai preprocessor_config.json;
                        its absolute path is the checkpoint config's ``mm_vision_tower``
    reference.pt        the authors' outputs (torch.load(..., weights_only=True) safe)
    <base-dir>/         LoRA / projector-only / delta cases only: the base LLM the checkpoint needs
                        (a plain LlamaForCausalLM with tokenizer); the reference is what the authors'
                        loader makes of the pair (see CASES and ``float32_loads``)

The checkpoint is built with the authors' classes, saved in float16, then loaded back exactly like
users do (``load_pretrained_model(path, None, get_model_name_from_path(path), device="cpu")``), cast
to float32 (fp16 -> fp32 is lossless) and run through ``process_images`` /
``tokenizer_image_token`` / forward / ``generate`` from the authors' code.

Everything is seeded; running twice gives byte-identical ``reference.pt`` files (and checkpoint
weights), independent of ROOT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPM_MODEL = REPO / "tests" / "fixtures" / "spm" / "tiny.model"
SPM_MODEL_YI = REPO / "tests" / "fixtures" / "spm" / "tiny_yi.model"  # make_spm_yi.py
sys.path.insert(0, str(HERE))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import llava  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402
from images import ANYRES_336, test_images  # noqa: E402
from llava.constants import (  # noqa: E402
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token  # noqa: E402
from llava.model import LlavaConfig, LlavaLlamaForCausalLM, LlavaMistralConfig, LlavaMistralForCausalLM  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

FORMAT_VERSION = 1
QUESTION = "What is shown in this image?"
# A 3-turn chat, the image in the first user turn (the authors' ids via Conversation.get_prompt()).
MULTI_TURN = (
    QUESTION,
    "It is a small picture with a few colours.",
    "Which colour covers most of it?",
    "Mostly blue, with some red near the top.",
    "Describe it in one word.",
)
MAX_NEW_TOKENS = 8
HEAD_GAIN = 3.0
ROW_SPREAD = 0.5
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Pinpoints: small multiples of a 28-pixel tower (the released v1.6 ones are the same multiples of 336).
PINPOINTS_28 = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]

# Key set of the released liuhaotian/llava-v1.5-{7,13}b config.json (LLaVA code of Oct 2023,
# transformers 4.31): model_type "llava", no rope_theta / attention_bias / mm_patch_merge_type /
# image_grid_pinpoints / tokenizer_* keys, but "max_length" and "pad_token_id": 0.
V15_RELEASED_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler", "hidden_act", "hidden_size", "image_aspect_ratio", "initializer_range",
    "intermediate_size", "max_length", "max_position_embeddings", "mm_hidden_size", "mm_projector_type",
    "mm_resampler_type", "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature",
    "mm_vision_select_layer", "mm_vision_tower", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "pad_token_id", "pretraining_tp", "rms_norm_eps", "rope_scaling",
    "tie_word_embeddings", "torch_dtype", "transformers_version", "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_cache", "use_mm_proj", "vocab_size",
}
# The llava-llama-2-*-lightning-preview checkpoints come from the July-2023 code (transformers 4.31):
# model_type "llava" too, and no keys that only newer transformers/LLaVA versions write.
LIGHTNING_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "freeze_mm_mlp_adapter",
    "hidden_act", "hidden_size", "image_aspect_ratio", "initializer_range", "intermediate_size",
    "max_position_embeddings", "mm_hidden_size", "mm_projector_type", "mm_use_im_patch_token",
    "mm_use_im_start_end", "mm_vision_select_feature", "mm_vision_select_layer", "mm_vision_tower",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
    "pretraining_tp", "rms_norm_eps", "rope_scaling", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "tune_mm_mlp_adapter", "use_cache", "use_mm_proj", "vocab_size",
}

# ---------------------------------------------------------------------------------------------------
# Case definitions
# ---------------------------------------------------------------------------------------------------

TINY_LM = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    use_cache=True,
)

# Seeds were picked (offline sweep over 100..129) so that, in float32, every greedy step of every
# image wins by a clear top-1/top-2 logit margin (>= ~0.3, see ``generated_margins``) and the three
# images give different, non-degenerate continuations. Changing ANY part of the build (init, sizes,
# images, the order random numbers are drawn in) changes the draws: re-check the printed min margins.
CASES: dict[str, dict] = {
    # LLaVA-1.5 (released liuhaotian/llava-v1.5-7b form): frozen tower -> no vision weights in the
    # checkpoint, mlp2x_gelu, "pad", .bin shards + index.
    "v15": dict(
        seed=127,
        dir_name="llava-v1.5-tiny",
        arch="llama",
        lm=dict(pad_token_id=0, max_length=256),
        tower=dict(image_size=28, patch_size=14),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="pad",
            mm_resampler_type=None,
            freeze_mm_vision_resampler=False,
            tune_mm_vision_resampler=False,
            unfreeze_mm_vision_tower=False,
        ),
        unfreeze=False,
        stray_tower=False,
        safe=False,
        shard="100KB",
        model_type="llava",
        keep_keys=V15_RELEASED_KEYS,
    ),
    # LLaVA-Llama-2 lightning form: linear projector, GQA, image_aspect_ratio "square" (plain CLIP
    # shortest-edge resize + centre crop), llava_llama_2 template, single model.safetensors.
    "llama2": dict(
        seed=113,
        dir_name="llava-llama-2-tiny-chat-lightning-preview",
        arch="llama",
        lm=dict(num_key_value_heads=2, pad_token_id=0),
        tower=dict(image_size=42, patch_size=14),
        mm=dict(mm_projector_type="linear", image_aspect_ratio="square"),
        unfreeze=False,
        stray_tower=False,
        safe=True,
        shard="10GB",
        model_type="llava",
        keep_keys=LIGHTNING_KEYS,
    ),
    # LLaVA-NeXT Mistral form (liuhaotian/llava-v1.6-mistral-7b): llava_mistral, GQA, rope_theta 1e6,
    # sliding_window null, anyres + spatial_unpad, fine-tuned tower inside the checkpoint,
    # safetensors shards + index, mistral_instruct template.
    "v16_mistral": dict(
        seed=127,
        dir_name="llava-v1.6-mistral-tiny",
        arch="mistral",
        lm=dict(num_key_value_heads=2, rope_theta=1000000.0, sliding_window=None),
        tower=dict(image_size=28, patch_size=7),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=PINPOINTS_28,
            mm_patch_merge_type="spatial_unpad",
            image_crop_resolution=224,
            image_split_resolution=224,
            mm_vision_tower_lr=2e-06,
            mm_resampler_type=None,
            freeze_mm_vision_resampler=False,
            tune_mm_vision_resampler=False,
            unfreeze_mm_vision_tower=True,
            tokenizer_model_max_length=4096,
        ),
        unfreeze=True,
        stray_tower=False,
        safe=True,
        shard="150KB",
        model_type=None,
        keep_keys=None,
    ),
    # LLaVA-NeXT vicuna form (liuhaotian/llava-v1.6-vicuna-7b): llava_llama, anyres + spatial_unpad,
    # fine-tuned tower inside the checkpoint, safetensors shards, llava_v1 template.
    "v16_vicuna": dict(
        seed=100,
        dir_name="llava-v1.6-vicuna-tiny",
        arch="llama",
        lm=dict(pad_token_id=0),
        tower=dict(image_size=28, patch_size=7),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=PINPOINTS_28,
            mm_patch_merge_type="spatial_unpad",
            image_crop_resolution=224,
            image_split_resolution=224,
            mm_vision_tower_lr=2e-06,
            mm_resampler_type=None,
            freeze_mm_vision_resampler=False,
            tune_mm_vision_resampler=False,
            unfreeze_mm_vision_tower=True,
            tokenizer_model_max_length=4096,
        ),
        unfreeze=True,
        stray_tower=False,
        safe=True,
        shard="150KB",
        model_type=None,
        keep_keys=None,
    ),
    # LLaVA-NeXT with the released geometry: a 336-pixel tower (patch 28 keeps it small) and the released
    # pinpoints, on images no larger than the tower (ties between grids), the tower's size and larger.
    "v16_anyres_336": dict(
        seed=100,
        dir_name="llava-v1.6-vicuna-336-tiny",
        arch="llama",
        lm=dict(pad_token_id=0, max_position_embeddings=4096),
        tower=dict(image_size=336, patch_size=28),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            mm_patch_merge_type="spatial_unpad",
            image_crop_resolution=224,
            image_split_resolution=224,
            mm_vision_tower_lr=2e-06,
            mm_resampler_type=None,
            freeze_mm_vision_resampler=False,
            tune_mm_vision_resampler=False,
            unfreeze_mm_vision_tower=True,
            tokenizer_model_max_length=4096,
        ),
        unfreeze=True,
        stray_tower=False,
        safe=True,
        shard="150KB",
        model_type=None,
        keep_keys=None,
        images=list(ANYRES_336),
    ),
    # A self-trained LLaVA-1.5 (current training code, DeepSpeed-style save): carries stray
    # model.vision_tower.vision_tower.vision_model.* keys (perturbed values) although the tower was
    # frozen (unfreeze_mm_vision_tower false). The authors' loader drops them and uses clip/.
    "v15_stray": dict(
        seed=109,
        dir_name="llava-v1.5-tiny-task-finetune",
        arch="llama",
        lm=dict(pad_token_id=0),
        tower=dict(image_size=28, patch_size=14),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="pad",
            mm_patch_merge_type="flat",
            unfreeze_mm_vision_tower=False,
        ),
        unfreeze=False,
        stray_tower=True,
        safe=False,
        shard="100KB",
        model_type=None,
        keep_keys=None,
    ),
}

# Fields the authors' training (llava/train/train.py) writes for every run; case "mm" dicts add to /
# override these.
MM_COMMON = dict(
    mm_hidden_size=None,  # filled with the tower hidden size
    mm_vision_tower=None,  # filled with the absolute clip/ path
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_patch_merge_type="flat",
    image_aspect_ratio="pad",
    image_grid_pinpoints=None,
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    unfreeze_mm_vision_tower=False,
    tokenizer_model_max_length=2048,
    tokenizer_padding_side="right",
    use_mm_proj=True,
    tune_mm_mlp_adapter=False,
    freeze_mm_mlp_adapter=False,
    mm_projector_lr=None,
)

IM_TOKENS = (DEFAULT_IMAGE_PATCH_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN)

# The other forms original checkpoints come in (issue #4). Each case directory also holds the base LLM
# the form needs (a plain HF LlamaForCausalLM with its tokenizer, fp16 .bin shards like
# lmsys/vicuna-7b-v1.5), and the reference is what the authors' loader makes of the pair. Seeds picked
# by the same kind of sweep (0..59): min greedy margin >= 0.3 and three different continuations.
CASES.update({
    # liuhaotian/llava-v1.5-7b-lora form, saved the way llava/train/train.py saves a LoRA run: config.json
    # (llava config), adapter_config.json + adapter_model.bin (PEFT, all linear layers of the LLM),
    # non_lora_trainables.bin (the projector, keys base_model.model.model.mm_projector.*), no tokenizer.
    # Reference: load_pretrained_model(lora_dir, base_dir, name) -> the builder's LoRA branch (merge).
    "lora": dict(
        seed=26,
        form="lora",
        dir_name="llava-v1.5-tiny-lora",
        base_name="vicuna-tiny-v1.5",
        lm=dict(pad_token_id=0),
        tower=dict(image_size=28, patch_size=14),
        mm=dict(mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad"),
        lora=dict(r=8, lora_alpha=16),
    ),
    # Pretrain-stage (projector-only) save, llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 form:
    # config.json + mm_projector.bin (bf16, keys model.mm_projector.*); image_aspect_ratio "square"
    # (the pretrain default). Reference: the builder's projector-only branch (model_base given).
    "projector": dict(
        seed=6,
        form="projector",
        dir_name="llava-v1.5-mlp2x-tiny-pretrain",
        base_name="vicuna-tiny-v1.5",
        lm=dict(pad_token_id=0),
        tower=dict(image_size=28, patch_size=14),
        mm=dict(mm_projector_type="mlp2x_gelu", image_aspect_ratio="square", tune_mm_mlp_adapter=True),
    ),
    # LLaVA v0 delta form (liuhaotian/LLaVA-13b-delta-v0): made by the authors' make_delta against a
    # LLaMA base; 3 extra vocab rows (<im_patch>, <im_start>, <im_end>, mm_use_im_start_end), linear
    # projector, v0 config keys (no image_aspect_ratio, no mm_use_im_patch_token: defaults to true).
    # Reference: the authors' apply_delta -> target, loaded by load_pretrained_model(target, None, name).
    "delta": dict(
        seed=58,
        form="delta",
        dir_name="LLaVA-tiny-delta-v0",
        target_name="LLaVA-tiny-v0",
        base_name="llama-tiny",
        lm=dict(pad_token_id=0),
        tower=dict(image_size=28, patch_size=14),
    ),
    # Self-trained full fine-tune, read from a HF Trainer checkpoint-N/ folder (the authors' model name is
    # parent_checkpoint-N), trained with mm_use_im_start_end and mm_use_im_patch_token: the tokenizer was
    # saved with <im_patch>/<im_start>/<im_end> (ids 400-402) and the embeddings hold their trained rows.
    "selftrained": dict(
        seed=3,
        dir_name="llava-v1.5-tiny-imstart/checkpoint-3",
        arch="llama",
        lm=dict(pad_token_id=0, vocab_size=403),
        tower=dict(image_size=28, patch_size=14),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="pad",
            mm_use_im_start_end=True,
            mm_use_im_patch_token=True,
        ),
        unfreeze=False,
        stray_tower=False,
        safe=True,
        shard="150KB",
        model_type=None,
        keep_keys=None,
        added_tokens=IM_TOKENS,
        trainer_files=True,
    ),
    # LLaVA-NeXT 34b form (liuhaotian/llava-v1.6-34b): Yi-34B backbone (Nous-Hermes-2-Yi-34B), i.e. Llama
    # architecture (llava_llama) with GQA and rope_theta 5e6, anyres + spatial_unpad + image_newline,
    # fine-tuned tower inside the checkpoint, chatml_direct template (the name holds "v1.6-34b"), and Yi's
    # tokenizer (tiny_yi.model, see save_yi_tokenizer): BOS <|startoftext|> not added, no dummy prefix.
    "v16_34b": dict(
        seed=128,  # swept 100..129: min greedy margin 0.40, three different continuations
        dir_name="llava-v1.6-34b-tiny",
        arch="llama",
        lm=dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=5000000.0,
                max_position_embeddings=4096, pad_token_id=0),
        tower=dict(image_size=28, patch_size=7),
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            image_aspect_ratio="anyres",
            image_grid_pinpoints=PINPOINTS_28,
            mm_patch_merge_type="spatial_unpad",
            image_crop_resolution=224,
            image_split_resolution=224,
            mm_vision_tower_lr=2e-06,
            mm_resampler_type=None,
            freeze_mm_vision_resampler=False,
            tune_mm_vision_resampler=False,
            unfreeze_mm_vision_tower=True,
            tokenizer_model_max_length=4096,
        ),
        unfreeze=True,
        stray_tower=False,
        safe=True,
        shard="150KB",
        model_type=None,
        keep_keys=None,
        tokenizer="yi",
    ),
})

# Key set of the LLaVA v0 delta configs (July-2023 code, transformers 4.28).
V0_KEYS = {
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "max_sequence_length",
    "mm_hidden_size", "mm_use_im_start_end", "mm_vision_select_layer", "mm_vision_tower", "model_type",
    "num_attention_heads", "num_hidden_layers", "pad_token_id", "rms_norm_eps", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "tune_mm_mlp_adapter", "use_cache", "use_mm_proj", "vocab_size",
}

# ---------------------------------------------------------------------------------------------------
# Seeded initialisation
# ---------------------------------------------------------------------------------------------------


def _is_norm(name: str) -> bool:
    n = name.lower()
    return "norm" in n or "layrnorm" in n  # RMSNorm / LayerNorm / CLIP's pre_layrnorm


@torch.no_grad()
def init_params(module: torch.nn.Module, gen: torch.Generator, *, gain: float = 1.5,
                head_gain: float = 3.0, embed_std: float = 1.0, row_spread: float = 0.0) -> None:
    """Large-ish, seeded init so logits are decisive (std ~ gain/sqrt(fan_in), i.e. ~0.1-0.3 here)."""
    for name, p in module.named_parameters():
        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32)

        if name.endswith("logit_scale"):
            p.fill_(math.log(1 / 0.07))
        elif _is_norm(name) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * randn(p.shape))
        elif name.endswith("bias"):
            p.copy_(0.05 * randn(p.shape))
        elif "embed_tokens" in name or "token_embedding" in name or "position_embedding" in name:
            p.copy_(embed_std * randn(p.shape))
        elif name.endswith("image_newline") or name.endswith("class_embedding"):
            p.copy_(embed_std * randn(p.shape))
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            w = (gain / math.sqrt(fan_in)) * randn(p.shape)
            if name.startswith("lm_head"):  # (the draw above is discarded; kept so the seeds stay valid)
                # Log-normal per-row scale: heavier-tailed logits, so the greedy top-1 usually wins by
                # a clear margin (plain Gaussian rows give near-ties among 400 tokens).
                row = torch.exp(row_spread * randn(p.shape[0], 1))
                w = (head_gain / math.sqrt(fan_in)) * randn(p.shape) * row
            p.copy_(w)
        else:
            p.copy_(0.1 * randn(p.shape))


@torch.no_grad()
def perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """'Fine-tune' a module: add seeded noise to every parameter (makes it differ from clip/)."""
    for _, p in module.named_parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


# ---------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------


def build_clip(clip_dir: Path, tower: dict, seed: int) -> CLIPVisionConfig:
    """Tiny full CLIPModel (like openai/clip-vit-large-patch14-336 ships) + legacy preprocessor config."""
    text = CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
        pad_token_id=1, bos_token_id=97, eos_token_id=98,  # inside the tiny text vocab
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=tower["image_size"], patch_size=tower["patch_size"], projection_dim=16,
    )
    cfg = CLIPConfig.from_text_vision_configs(text, vision, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).float().eval()
    init_params(model, torch.Generator().manual_seed(seed), gain=1.5, embed_std=0.5)
    clip_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(clip_dir, safe_serialization=True)
    # Write the full config (not 4.36's diff-from-defaults) so other transformers versions that may
    # change a CLIP default still read the same architecture (openai's config.json is complete too).
    model.config.to_json_file(clip_dir / "config.json", use_diff=False)
    size = tower["image_size"]
    # Verbatim shape of the openai/clip-vit-large-patch14-336 preprocessor_config.json (legacy
    # CLIPFeatureExtractor form with int size / crop_size), with the tiny size.
    pre = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "resample": 3,
        "size": size,
    }
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return vision


def save_tokenizer(ckpt_dir: Path, added: tuple[str, ...] = ()) -> None:
    """Tiny Llama SentencePiece tokenizer laid out like llava-v1.5-7b ships it.

    ``added``: tokens the authors' training adds (``initialize_vision_tokenizer``: ``<im_patch>``, then
    ``<im_start>``, ``<im_end>``), saved with the tokenizer as the HF Trainer does.
    """
    tok = LlamaTokenizer(vocab_file=str(SPM_MODEL), legacy=False)
    tok.model_max_length = 2048
    tok.padding_side = "right"
    for t in added:
        tok.add_tokens([t], special_tokens=True)
    tok.save_pretrained(ckpt_dir)
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
                "pad_token": None, "padding_side": "right", "legacy": False})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    stm_path = ckpt_dir / "special_tokens_map.json"
    stm = json.loads(stm_path.read_text())
    stm["pad_token"] = "<unk>"  # the released checkpoints' special_tokens_map.json has this
    stm_path.write_text(json.dumps(stm, indent=2, sort_keys=True) + "\n")


def save_yi_tokenizer(ckpt_dir: Path) -> None:
    """Tiny Yi tokenizer laid out like liuhaotian/llava-v1.6-34b ships it (01-ai/Yi-34B's, via Nous-Hermes-2-Yi-34B).

    A slow LlamaTokenizer over tiny_yi.model: ``<|startoftext|>`` BOS (id 1), ``<|endoftext|>`` EOS (id 2),
    ``<|im_start|>`` / ``<|im_end|>`` SentencePiece user-defined pieces (ids 6 / 7, not transformers added
    tokens), ``add_bos_token`` false (Yi's tokenizer_config.json; an automatic BOS confuses Yi), and a model
    without SentencePiece's dummy prefix. ``legacy`` true: with it the authors' per-chunk tokenization
    (``tokenizer_image_token``) gives the same ids as tokenizing the whole prompt, which is what the
    transformers LLaVA-NeXT conversion of llava-v1.6-34b checked against the authors' input ids.
    """
    tok = LlamaTokenizer(
        vocab_file=str(SPM_MODEL_YI), unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<unk>", add_bos_token=False, add_eos_token=False, legacy=True,
    )
    tok.save_pretrained(ckpt_dir)
    cfg_path = ckpt_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update({"add_bos_token": False, "add_eos_token": False, "model_max_length": 4096, "pad_token": "<unk>",
                "padding_side": "right", "legacy": True})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_checkpoint(case: str, spec: dict, case_dir: Path) -> Path:
    seed = spec["seed"]
    clip_dir = (case_dir / "clip").resolve()
    vision_cfg = build_clip(clip_dir, spec["tower"], seed + 7)

    ckpt_dir = case_dir / spec["dir_name"]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if spec.get("tokenizer") == "yi":
        save_yi_tokenizer(ckpt_dir)
    else:
        save_tokenizer(ckpt_dir, spec.get("added_tokens", ()))

    lm = {**TINY_LM, **spec["lm"]}
    mm = {**MM_COMMON, **spec["mm"]}
    mm["mm_hidden_size"] = vision_cfg.hidden_size
    mm["mm_vision_tower"] = str(clip_dir)
    if spec["arch"] == "mistral":
        lm.pop("pad_token_id", None)
        config = LlavaMistralConfig(**lm, **mm)
        model_cls = LlavaMistralForCausalLM
    else:
        config = LlavaConfig(**lm, **mm)
        model_cls = LlavaLlamaForCausalLM
    config._name_or_path = f"./checkpoints/{spec['dir_name']}"
    config.architectures = [model_cls.__name__]

    torch.manual_seed(seed)
    # With unfreeze_mm_vision_tower the authors' CLIPVisionTower loads clip/ right in __init__, so the
    # tower's weights become part of the LLaVA model (and of its state dict).
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    lm_params = {n for n, _ in model.named_parameters() if ".vision_tower." not in n}
    init_params(model, gen, gain=1.5, head_gain=HEAD_GAIN, embed_std=1.0, row_spread=ROW_SPREAD)
    if spec["unfreeze"]:
        tower = model.get_model().get_vision_tower()
        assert tower.is_loaded
        # Undo init_params on the tower: start from clip/'s weights, then "fine-tune" them.
        fresh = transformers.CLIPVisionModel.from_pretrained(clip_dir).float()
        tower.vision_tower.load_state_dict(fresh.state_dict())
        perturb(tower.vision_tower, torch.Generator().manual_seed(seed + 1), scale=0.05)
    else:
        assert not any(".vision_tower." in n for n, _ in model.named_parameters())
    assert lm_params  # sanity

    model = model.half()
    state_dict = model.state_dict()
    if spec["stray_tower"]:
        # DeepSpeed-style self-trained save with stray (frozen, never used) tower weights.
        stray = transformers.CLIPVisionModel.from_pretrained(clip_dir).float()
        perturb(stray, torch.Generator().manual_seed(seed + 2), scale=0.05)
        for k, v in stray.state_dict().items():
            state_dict[f"model.vision_tower.vision_tower.{k}"] = v.half()
    model.save_pretrained(
        ckpt_dir, state_dict=state_dict, safe_serialization=spec["safe"], max_shard_size=spec["shard"]
    )

    # Post-process config.json to look like the release it mimics.
    cfg_path = ckpt_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if spec["model_type"]:
        cfg["model_type"] = spec["model_type"]
    if spec["keep_keys"] is not None:
        cfg = {k: v for k, v in cfg.items() if k in spec["keep_keys"]}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if spec.get("trainer_files"):
        write_trainer_files(ckpt_dir)
    return ckpt_dir


def write_trainer_files(ckpt_dir: Path) -> None:
    """What a HF Trainer checkpoint-N/ folder holds besides the model (the converter must ignore them)."""
    (ckpt_dir / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}, indent=2) + "\n")
    torch.save({"learning_rate": 2e-5}, ckpt_dir / "training_args.bin")
    torch.save({"python": 0}, ckpt_dir / "rng_state.pth")


def build_base_llm(base_dir: Path, lm: dict, seed: int) -> dict[str, torch.Tensor]:
    """A plain Llama LLM (the lmsys/vicuna-7b-v1.5 form): LlamaForCausalLM, fp16 .bin shards + index, tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**lm)).float().eval()
    init_params(model, torch.Generator().manual_seed(seed), gain=1.5, head_gain=HEAD_GAIN, embed_std=1.0,
                row_spread=ROW_SPREAD)
    model = model.half()
    base_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base_dir, safe_serialization=False, max_shard_size="100KB")
    save_tokenizer(base_dir)
    return {k: v.float() for k, v in model.state_dict().items()}


def _llava_on_base(spec: dict, case_dir: Path) -> tuple[LlavaLlamaForCausalLM, Path]:
    """clip/ + the base LLM, and a float32 LLaVA model holding the base's weights and a seeded projector."""
    seed = spec["seed"]
    clip_dir = (case_dir / "clip").resolve()
    vision_cfg = build_clip(clip_dir, spec["tower"], seed + 7)
    lm = {**TINY_LM, **spec["lm"]}
    base_dir = case_dir / spec["base_name"]
    base_sd = build_base_llm(base_dir, lm, seed + 3)
    mm = {**MM_COMMON, **spec["mm"], "mm_hidden_size": vision_cfg.hidden_size, "mm_vision_tower": str(clip_dir)}
    config = LlavaConfig(**lm, **mm)
    config._name_or_path = str(base_dir)  # training starts from_pretrained(model_name_or_path)
    config.architectures = ["LlavaLlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all("mm_projector" in k for k in missing), (missing, unexpected)
    init_params(model.get_model().mm_projector, torch.Generator().manual_seed(seed), gain=1.5)
    return model, base_dir


@contextlib.contextmanager
def no_deepspeed():
    """The authors' ``maybe_zero_3`` imports deepspeed unconditionally; without ZeRO (no ``ds_id`` on any
    parameter) it only detaches and clones. Stand in for the two names it imports, for the call only."""
    import types

    names = ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.zero.partition_parameters"]
    assert not any(n in sys.modules for n in names)
    mods = {n: types.ModuleType(n) for n in names}
    mods["deepspeed"].zero = None
    mods["deepspeed.runtime.zero.partition_parameters"].ZeroParamStatus = None
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)


def build_lora(spec: dict, case_dir: Path) -> tuple[Path, Path]:
    """A LoRA fine-tune saved exactly as llava/train/train.py saves one (lora_enable, bits 16, fp16)."""
    from llava.train.train import (
        find_all_linear_names,
        get_peft_state_maybe_zero_3,
        get_peft_state_non_lora_maybe_zero_3,
    )
    from peft import LoraConfig, get_peft_model

    model, base_dir = _llava_on_base(spec, case_dir)
    lora = spec["lora"]
    lora_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=sorted(find_all_linear_names(model)),
        lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    for p in model.get_model().mm_projector.parameters():  # initialize_vision_modules makes it trainable
        p.requires_grad = True
    gen = torch.Generator().manual_seed(spec["seed"] + 5)
    with torch.no_grad():  # "training": seeded LoRA factors (PEFT starts B at zero, i.e. no change)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model = model.half()
    ckpt_dir = case_dir / spec["dir_name"]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with no_deepspeed():
        state_dict = get_peft_state_maybe_zero_3(model.named_parameters(), "none")
        non_lora_state_dict = get_peft_state_non_lora_maybe_zero_3(model.named_parameters())
    assert sorted(non_lora_state_dict) == sorted(
        f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    ), sorted(non_lora_state_dict)
    model.config.save_pretrained(ckpt_dir)
    # The released LoRA repos ship adapter_model.bin (PEFT 0.4, the authors' pin, wrote .bin).
    model.save_pretrained(ckpt_dir, state_dict=state_dict, safe_serialization=False)
    torch.save(non_lora_state_dict, ckpt_dir / "non_lora_trainables.bin")
    return ckpt_dir, base_dir


def build_projector(spec: dict, case_dir: Path) -> tuple[Path, Path]:
    """A pretrain-stage save (tune_mm_mlp_adapter): config.json + mm_projector.bin, as safe_save_model_for_hf_trainer."""
    from llava.train.train import get_mm_adapter_state_maybe_zero_3

    model, base_dir = _llava_on_base(spec, case_dir)
    model = model.to(torch.bfloat16)  # pretraining runs in bf16
    with no_deepspeed():
        weights = get_mm_adapter_state_maybe_zero_3(model.named_parameters(), ["mm_projector"])
    ckpt_dir = case_dir / spec["dir_name"]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(ckpt_dir)
    torch.save(weights, ckpt_dir / "mm_projector.bin")
    return ckpt_dir, base_dir


def build_delta(spec: dict, case_dir: Path) -> tuple[Path, Path]:
    """A v0-style LLaVA fine-tuned from a LLaMA base, turned into a delta by the authors' make_delta."""
    from llava.model.make_delta import make_delta

    seed = spec["seed"]
    clip_dir = (case_dir / "clip").resolve()
    vision_cfg = build_clip(clip_dir, spec["tower"], seed + 7)
    lm = {**TINY_LM, **spec["lm"]}
    base_dir = case_dir / spec["base_name"]
    base_sd = build_base_llm(base_dir, lm, seed + 3)

    target_dir = case_dir / "_make_delta_input" / spec["target_name"]
    target_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(target_dir, IM_TOKENS)
    config = LlavaConfig(
        **{**lm, "vocab_size": lm["vocab_size"] + len(IM_TOKENS)},
        mm_vision_tower=str(clip_dir), mm_hidden_size=vision_cfg.hidden_size, mm_vision_select_layer=-2,
        mm_use_im_start_end=True, tune_mm_mlp_adapter=False, use_mm_proj=True,
    )
    config.architectures = ["LlavaLlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    init_params(model, gen, gain=1.5, head_gain=HEAD_GAIN, embed_std=1.0, row_spread=ROW_SPREAD)
    with torch.no_grad():  # "fine-tuned from the base": base values plus small seeded changes
        for name, p in model.named_parameters():
            if name in base_sd:
                b = base_sd[name]
                p[tuple(slice(0, n) for n in b.shape)] = b + 0.05 * torch.randn(b.shape, generator=gen)
    model.half().save_pretrained(target_dir, safe_serialization=False)

    delta_dir = case_dir / spec["dir_name"]
    make_delta(str(base_dir), str(target_dir), str(delta_dir), None)
    cfg_path = delta_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "llava"
    cfg = {k: v for k, v in cfg.items() if k in V0_KEYS}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # The v0 delta tokenizers predate transformers' `legacy` flag (so 4.36 runs them with legacy=True) and
    # ship only the SentencePiece files.
    tok_cfg_path = delta_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.pop("legacy", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    (delta_dir / "tokenizer.json").unlink()
    import shutil

    shutil.rmtree(target_dir.parent)
    return delta_dir, base_dir


def apply_delta_float32(base_dir: Path, delta_dir: Path, target_dir: Path) -> Path:
    """The authors' apply_delta (base + delta, extra vocab rows from the delta), in float32."""
    from llava.model.apply_delta import apply_delta

    with float32_loads():
        apply_delta(str(base_dir), str(target_dir), str(delta_dir))
    return target_dir


# ---------------------------------------------------------------------------------------------------
# Reference outputs (the authors' code path)
# ---------------------------------------------------------------------------------------------------


def conv_mode_for(model_name: str) -> str:
    """Same rule as llava/eval/run_llava.py::eval_model."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


@contextlib.contextmanager
def float32_loads():
    """Load in float32 where the authors' builder and apply_delta hard-code ``torch_dtype=float16``.

    Only for the LoRA / projector-only / delta cases: there the authors' code computes new weights
    (LoRA merge, base + delta) in the dtype it loads in, and a float16 merge rounds every merged weight.
    Loading the same fp16 files in float32 runs the same code paths with float32-precise results, which
    is what the converter computes with ``--dtype float32``. The other cases never need it (their
    weights are stored values, and fp16 -> fp32 is exact).
    """
    from transformers import modeling_utils

    orig = modeling_utils.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("torch_dtype") is torch.float16:
            kwargs["torch_dtype"] = torch.float32
        return orig(cls, *args, **kwargs)

    modeling_utils.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        modeling_utils.PreTrainedModel.from_pretrained = classmethod(orig)


@torch.inference_mode()
def make_reference(case: str, ckpt_dir: Path, *, model_base: Path | None = None, float32: bool = False) -> dict:
    model_name = get_model_name_from_path(str(ckpt_dir))
    with float32_loads() if float32 else contextlib.nullcontext():
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            str(ckpt_dir), str(model_base) if model_base else None, model_name, device="cpu"
        )
    tower = model.get_vision_tower()
    loaded = {
        "language_model": str(model.dtype),
        "vision_tower": str(tower.dtype),
        "mm_projector": str(next(model.get_model().mm_projector.parameters()).dtype),
    }
    # fp16 -> fp32 is exact; run the authors' graph in float32 so the reference is precise.
    model = model.float().eval()
    # The rotary cos/sin caches were built while the builder's torch_dtype=float16 was the default
    # dtype, so they hold fp16-rounded values that .float() cannot restore (~1e-2 logit error).
    # Rebuild them in float32, as a float32 load of the same checkpoint would have them.
    for module in model.modules():
        if hasattr(module, "_set_cos_sin_cache") and hasattr(module, "max_seq_len_cached"):
            module._set_cos_sin_cache(module.max_seq_len_cached, module.inv_freq.device, torch.float32)
    assert model.lm_head.weight.shape[0] == len(tokenizer), "unexpected vocab resize"

    conv_mode = conv_mode_for(model_name)
    if getattr(model.config, "mm_use_im_start_end", False):  # llava/eval/run_llava.py
        qs = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + QUESTION
    else:
        qs = DEFAULT_IMAGE_TOKEN + "\n" + QUESTION
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == 1
    image_pos = int((input_ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])

    # Multi-turn: user (image + question), assistant, user, assistant, user, then the generation prompt.
    mt = conv_templates[conv_mode].copy()
    for i, text in enumerate(MULTI_TURN):
        mt.append_message(mt.roles[i % 2], qs.replace(QUESTION, text) if i == 0 else text)
    mt.append_message(mt.roles[1], None)
    mt_prompt = mt.get_prompt()
    mt_ids = tokenizer_image_token(mt_prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert int((mt_ids == IMAGE_TOKEN_INDEX).sum()) == 1

    per_image: dict[str, dict] = {}
    for img_name, image in test_images(CASES[case].get("images")).items():
        image_sizes = [image.size]
        pixel_values = process_images([image], image_processor, model.config)
        assert isinstance(pixel_values, torch.Tensor)
        images_arg = pixel_values.to(dtype=torch.float32)
        ids = input_ids.unsqueeze(0)

        # Stage: tower features and projector output, per crop, before any merging.
        concat = images_arg.flatten(0, 1) if images_arg.ndim == 5 else images_arg
        vision_features = tower(concat)
        image_features = model.encode_images(concat)

        # Stage: spliced input embeddings (prompt text + image features [+ newline], authors' code).
        _, _, _, _, inputs_embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, images_arg, image_sizes
        )
        inputs_embeds = inputs_embeds[0]
        n_img = inputs_embeds.shape[0] - (ids.shape[1] - 1)
        merged = inputs_embeds[image_pos : image_pos + n_img]

        out = model(ids, images=images_arg, image_sizes=image_sizes, output_hidden_states=True,
                    return_dict=True, use_cache=False)
        logits = out.logits[0]
        hidden = torch.stack([h[0] for h in out.hidden_states], dim=0)

        gen = model.generate(
            ids, images=images_arg, image_sizes=image_sizes, do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS, use_cache=True,
            output_scores=True, return_dict_in_generate=True,
        )
        # transformers 4.36 generate() from inputs_embeds (which the authors' generate() always uses)
        # seeds the output with a dummy [bos] (``_maybe_initialize_input_ids_for_generation``), so the
        # authors' output_ids are [bos] + new tokens; run_llava hides it via skip_special_tokens.
        raw = gen.sequences[0]
        assert int(raw[0]) == tokenizer.bos_token_id and raw.shape[0] == len(gen.scores) + 1
        generated = raw[1:]
        scores = torch.stack([s[0] for s in gen.scores], dim=0)
        top2 = scores.float().topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()

        # Self-consistency of the authors' paths.
        assert logits.shape[0] == inputs_embeds.shape[0]
        assert torch.allclose(scores[0], logits[-1], atol=1e-4, rtol=1e-4)
        assert int(logits[-1].argmax()) == int(generated[0])

        per_image[img_name] = {
            "image_size": [int(image.size[0]), int(image.size[1])],
            "input_ids": input_ids.clone(),
            "pixel_values": _f32(pixel_values),
            "vision_features": _f32(vision_features),
            "image_features": _f32(image_features),
            "merged_image_features": _f32(merged),
            "num_image_tokens": int(n_img),
            "image_token_pos": image_pos,
            "inputs_embeds": _f32(inputs_embeds),
            "inputs_embeds_len": int(inputs_embeds.shape[0]),
            "hidden_states": _f32(hidden),
            "logits": _f32(logits),
            "generated": generated.to(torch.long).clone(),
            "generated_raw": raw.to(torch.long).clone(),
            "generated_scores": _f32(scores),
            "generated_margins": [float(m) for m in margins],
            "generated_text": tokenizer.decode(generated, skip_special_tokens=True),
        }

    return {
        "format_version": FORMAT_VERSION,
        "case": case,
        "checkpoint_dir": ckpt_dir.name,
        "model_name": model_name,
        "conv_mode": conv_mode,
        "question": QUESTION,
        "prompt": prompt,
        "max_new_tokens": MAX_NEW_TOKENS,
        "multi_turn": {"turns": list(MULTI_TURN), "prompt": mt_prompt, "input_ids": mt_ids.clone()},
        "tokenizer_class": type(tokenizer).__name__,
        "context_len": int(context_len),
        "loaded_dtypes": loaded,
        "image_names": list(per_image),
        "images": per_image,
    }


def run_case(case: str, out_root: Path) -> None:
    t0 = time.perf_counter()
    spec = CASES[case]
    case_dir = out_root / case
    case_dir.mkdir(parents=True, exist_ok=True)
    form = spec.get("form", "full")
    if form == "lora":
        ckpt_dir, base_dir = build_lora(spec, case_dir)
        ref = make_reference(case, ckpt_dir, model_base=base_dir, float32=True)
    elif form == "projector":
        ckpt_dir, base_dir = build_projector(spec, case_dir)
        ref = make_reference(case, ckpt_dir, model_base=base_dir, float32=True)
    elif form == "delta":
        delta_dir, base_dir = build_delta(spec, case_dir)
        target = apply_delta_float32(base_dir, delta_dir, case_dir / "authors-apply-delta" / spec["target_name"])
        ref = make_reference(case, target, float32=True)
    else:
        ckpt_dir = build_checkpoint(case, spec, case_dir)
        ref = make_reference(case, ckpt_dir)
    torch.save(ref, case_dir / "reference.pt")
    dt = time.perf_counter() - t0
    parts = []
    for name, r in ref["images"].items():
        parts.append(
            f"{name}: ids={r['input_ids'].numel()} px={tuple(r['pixel_values'].shape)} "
            f"logits={tuple(r['logits'].shape)} gen={r['generated'].tolist()} "
            f"min_margin={min(r['generated_margins']):.2f}"
        )
    print(f"[{case}] {ref['checkpoint_dir']} conv={ref['conv_mode']} tok={ref['tokenizer_class']} "
          f"| " + " | ".join(parts) + f" | {dt:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output root directory")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s): {unknown}; known: {list(CASES)}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    out_root = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for case in cases:
        run_case(case, out_root)
    print(f"done: {len(cases)} case(s) in {time.perf_counter() - t0:.1f}s -> {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

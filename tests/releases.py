"""Tiny checkpoints laid out exactly as the real liuhaotian releases ship (REFERENCE.md §4).

Each release keeps its config.json, tokenizer and generation configs, file names, shard layout, dtypes and
the Hugging Face cache layout (`models--org--name/{blobs,refs,snapshots}`, snapshot files relative symlinks
into `blobs/`) verbatim; only sizes shrink (hidden sizes, layer counts, vocabulary, shard count where a
release has many). The CLIP towers keep their 336 / 224 px geometry, so anyres pinpoints stay the released
ones. The LLM's vocabulary is the tiny SentencePiece model's (400; Yi's for the 34b).

`build_hub_cache(root)` writes every release, the two openai towers and the base LLM into one cache and
returns its folder (point `HF_HUB_CACHE` at it, offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from builders import LORA_TARGETS, SPM, VOCAB, clip_preprocessor
from safetensors.torch import save_file

SPM_YI = Path(__file__).parent / "fixtures" / "spm" / "tiny_yi.model"
YI_VOCAB = 400

# Shrunk sizes; everything else in the configs is as released.
HIDDEN, INTER, LAYERS, HEADS = 64, 128, 2, 4
V_HIDDEN, V_INTER, V_LAYERS, V_HEADS = 32, 64, 3, 4
T_HIDDEN, T_INTER, T_LAYERS, T_HEADS, T_VOCAB = 16, 32, 1, 2, 100

CLIP_336 = "openai/clip-vit-large-patch14-336"
CLIP_224 = "openai/clip-vit-large-patch14"
VICUNA = "lmsys/vicuna-7b-v1.5"
V15 = "liuhaotian/llava-v1.5-7b"
V15_LORA = "liuhaotian/llava-v1.5-7b-lora"
V15_PROJECTOR = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"
V16_VICUNA = "liuhaotian/llava-v1.6-vicuna-7b"
V16_MISTRAL = "liuhaotian/llava-v1.6-mistral-7b"
V16_34B = "liuhaotian/llava-v1.6-34b"
LIGHTNING = "liuhaotian/llava-llama-2-13b-chat-lightning-preview"
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Commit ids of the snapshots (llava-v1.5-7b's is the one the Hub serves; the others are placeholders).
COMMITS = {
    V15: "4481d270cc22fd5c4d1bb5df129622006ccd9234",
    CLIP_336: "ce19dc912ca5cd21c8a653c79e251e7d2c7cd7bd",
    CLIP_224: "32bd64288804d66eefd0ccbe215aa642df71cc41",
}


def _commit(repo_id: str) -> str:
    return COMMITS.get(repo_id) or hashlib.sha1(repo_id.encode()).hexdigest()


# --- the Hugging Face cache ------------------------------------------------------------------------------


def cache_repo(cache: Path, repo_id: str, staged: Path) -> Path:
    """Move the files of STAGED into CACHE as huggingface_hub lays out a downloaded repo; the snapshot folder.

    Blobs are named by content hash (sha256 for weights, git's sha1 for the rest, as the Hub does), and each
    snapshot file is a relative symlink to its blob."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = _commit(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for src in sorted(p for p in staged.rglob("*") if p.is_file()):
        data = src.read_bytes()
        if src.suffix in (".bin", ".safetensors", ".model"):
            blob_id = hashlib.sha256(data).hexdigest()
        else:
            blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.write_bytes(data)
        link = snapshot / src.relative_to(staged)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.rmtree(staged)
    return snapshot


def snapshot_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / _commit(repo_id)


# --- tensors ---------------------------------------------------------------------------------------------


def _rand(gen: torch.Generator, *shape: int, std: float = 0.2, dtype=torch.float16) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


def _norm(gen: torch.Generator, n: int, dtype=torch.float16) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


def clip_layer(gen: torch.Generator, prefix: str, hidden: int, inter: int, dtype) -> dict[str, torch.Tensor]:
    sd = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        sd[f"{prefix}self_attn.{proj}.weight"] = _rand(gen, hidden, hidden, dtype=dtype)
        sd[f"{prefix}self_attn.{proj}.bias"] = _rand(gen, hidden, dtype=dtype)
    sd[f"{prefix}layer_norm1.weight"] = _norm(gen, hidden, dtype)
    sd[f"{prefix}layer_norm1.bias"] = _rand(gen, hidden, dtype=dtype)
    sd[f"{prefix}mlp.fc1.weight"] = _rand(gen, inter, hidden, dtype=dtype)
    sd[f"{prefix}mlp.fc1.bias"] = _rand(gen, inter, dtype=dtype)
    sd[f"{prefix}mlp.fc2.weight"] = _rand(gen, hidden, inter, dtype=dtype)
    sd[f"{prefix}mlp.fc2.bias"] = _rand(gen, hidden, dtype=dtype)
    sd[f"{prefix}layer_norm2.weight"] = _norm(gen, hidden, dtype)
    sd[f"{prefix}layer_norm2.bias"] = _rand(gen, hidden, dtype=dtype)
    return sd


def clip_vision_weights(gen: torch.Generator, image_size: int, dtype=torch.float32, *, position_ids: bool):
    """`vision_model.*` of a CLIP tower (with the persistent position_ids buffer transformers < 4.31 saved)."""
    n_pos = (image_size // 14) ** 2 + 1
    p = "vision_model."
    sd = {
        p + "embeddings.class_embedding": _rand(gen, V_HIDDEN, dtype=dtype),
        p + "embeddings.patch_embedding.weight": _rand(gen, V_HIDDEN, 3, 14, 14, std=0.05, dtype=dtype),
        p + "embeddings.position_embedding.weight": _rand(gen, n_pos, V_HIDDEN, dtype=dtype),
        p + "pre_layrnorm.weight": _norm(gen, V_HIDDEN, dtype),
        p + "pre_layrnorm.bias": _rand(gen, V_HIDDEN, dtype=dtype),
    }
    if position_ids:
        sd[p + "embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
    for i in range(V_LAYERS):
        sd.update(clip_layer(gen, f"{p}encoder.layers.{i}.", V_HIDDEN, V_INTER, dtype))
    sd[p + "post_layernorm.weight"] = _norm(gen, V_HIDDEN, dtype)
    sd[p + "post_layernorm.bias"] = _rand(gen, V_HIDDEN, dtype=dtype)
    return sd


def clip_model_weights(gen: torch.Generator, image_size: int) -> dict[str, torch.Tensor]:
    """A full CLIPModel state dict as transformers 4.21 saved the openai towers: float32, text half, heads,
    and both position_ids buffers."""
    p = "text_model."
    sd = {
        p + "embeddings.token_embedding.weight": _rand(gen, T_VOCAB, T_HIDDEN, dtype=torch.float32),
        p + "embeddings.position_embedding.weight": _rand(gen, 77, T_HIDDEN, dtype=torch.float32),
        p + "embeddings.position_ids": torch.arange(77).unsqueeze(0),
    }
    for i in range(T_LAYERS):
        sd.update(clip_layer(gen, f"{p}encoder.layers.{i}.", T_HIDDEN, T_INTER, torch.float32))
    sd[p + "final_layer_norm.weight"] = _norm(gen, T_HIDDEN, torch.float32)
    sd[p + "final_layer_norm.bias"] = _rand(gen, T_HIDDEN, dtype=torch.float32)
    sd.update(clip_vision_weights(gen, image_size, position_ids=True))
    sd["visual_projection.weight"] = _rand(gen, 12, V_HIDDEN, dtype=torch.float32)
    sd["text_projection.weight"] = _rand(gen, 12, T_HIDDEN, dtype=torch.float32)
    sd["logit_scale"] = torch.tensor(2.6592)
    return sd


def llm_weights(gen: torch.Generator, *, vocab: int, kv_heads: int, dtype, inv_freq: bool = False):
    head_dim = HIDDEN // HEADS
    sd = {"model.embed_tokens.weight": _rand(gen, vocab, HIDDEN, dtype=dtype)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _rand(gen, HIDDEN, HIDDEN, dtype=dtype)
        sd[p + "self_attn.k_proj.weight"] = _rand(gen, kv_heads * head_dim, HIDDEN, dtype=dtype)
        sd[p + "self_attn.v_proj.weight"] = _rand(gen, kv_heads * head_dim, HIDDEN, dtype=dtype)
        sd[p + "self_attn.o_proj.weight"] = _rand(gen, HIDDEN, HIDDEN, dtype=dtype)
        if inv_freq:  # a buffer transformers < 4.31 saved
            sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        sd[p + "mlp.gate_proj.weight"] = _rand(gen, INTER, HIDDEN, dtype=dtype)
        sd[p + "mlp.up_proj.weight"] = _rand(gen, INTER, HIDDEN, dtype=dtype)
        sd[p + "mlp.down_proj.weight"] = _rand(gen, HIDDEN, INTER, dtype=dtype)
        sd[p + "input_layernorm.weight"] = _norm(gen, HIDDEN, dtype)
        sd[p + "post_attention_layernorm.weight"] = _norm(gen, HIDDEN, dtype)
    sd["model.norm.weight"] = _norm(gen, HIDDEN, dtype)
    sd["lm_head.weight"] = _rand(gen, vocab, HIDDEN, dtype=dtype)
    return sd


def projector_weights(gen: torch.Generator, kind: str, dtype, prefix: str = "model.mm_projector.") -> dict:
    if kind == "linear":
        return {prefix + "weight": _rand(gen, HIDDEN, V_HIDDEN, dtype=dtype), prefix + "bias": _rand(gen, HIDDEN, dtype=dtype)}
    return {
        prefix + "0.weight": _rand(gen, HIDDEN, V_HIDDEN, dtype=dtype),
        prefix + "0.bias": _rand(gen, HIDDEN, dtype=dtype),
        prefix + "2.weight": _rand(gen, HIDDEN, HIDDEN, dtype=dtype),
        prefix + "2.bias": _rand(gen, HIDDEN, dtype=dtype),
    }


def save_shards(path: Path, sd: dict[str, torch.Tensor], *, fmt: str, shards: int) -> None:
    """Shards named and indexed as transformers' save_pretrained names them, keys in order, split evenly."""
    names = list(sd)
    per = -(-len(names) // shards)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k].contiguous() for k in names[i * per : (i + 1) * per]}
        if fmt == "safetensors":
            save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- configs, as released (sizes shrunk) ---------------------------------------------------------------


def _clip_sub(kind: str, **fields) -> dict:
    """A sub-config of the openai CLIPModel config.json: transformers 4.21 wrote every PretrainedConfig default."""
    cfg = {
        "_name_or_path": "", "add_cross_attention": False, "architectures": None, "attention_dropout": 0.0,
        "bad_words_ids": None, "bos_token_id": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
        "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
        "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "eos_token_id": None,
        "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
        "forced_eos_token_id": None, "hidden_act": "quick_gelu", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-05, "length_penalty": 1.0, "max_length": 20,
        "min_length": 0, "model_type": kind, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
        "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
        "pad_token_id": None, "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
        "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
        "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
        "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
        "torchscript": False, "transformers_version": "4.21.3", "typical_p": 1.0, "use_bfloat16": False,
    }
    cfg.update(fields)
    return cfg


def clip_config(repo_id: str, image_size: int) -> dict:
    text = {"hidden_size": T_HIDDEN, "intermediate_size": T_INTER, "num_attention_heads": T_HEADS,
            "num_hidden_layers": T_LAYERS, "projection_dim": 12}
    vision = {"hidden_size": V_HIDDEN, "image_size": image_size, "intermediate_size": V_INTER,
              "num_attention_heads": V_HEADS, "num_hidden_layers": V_LAYERS, "patch_size": 14, "projection_dim": 12}
    return {
        "_name_or_path": repo_id,
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 12,
        "text_config": _clip_sub("clip_text_model", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                 max_position_embeddings=77, vocab_size=T_VOCAB, **text),
        "text_config_dict": text,
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": _clip_sub("clip_vision_model", num_channels=3, **vision),
        "vision_config_dict": vision,
    }


def llama_config(**fields) -> dict:
    """The LLM fields a LlavaLlamaForCausalLM saved by transformers 4.31 writes (vicuna-7b-v1.5 shapes shrunk)."""
    cfg = {
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": INTER, "max_position_embeddings": 4096, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": HEADS, "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "use_cache": True, "vocab_size": VOCAB,
    }
    cfg.update(fields)
    return cfg


def v15_config(**fields) -> dict:
    """liuhaotian/llava-v1.5-7b config.json (LLaVA code of Oct 2023)."""
    cfg = llama_config(
        _name_or_path="./checkpoints/vicuna-7b-v1.5", architectures=["LlavaLlamaForCausalLM"],
        freeze_mm_mlp_adapter=False, freeze_mm_vision_resampler=False, image_aspect_ratio="pad", max_length=4096,
        mm_hidden_size=V_HIDDEN, mm_projector_type="mlp2x_gelu", mm_resampler_type=None,
        mm_use_im_patch_token=False, mm_use_im_start_end=False, mm_vision_select_feature="patch",
        mm_vision_select_layer=-2, mm_vision_tower=CLIP_336, model_type="llava", tune_mm_mlp_adapter=False,
        tune_mm_vision_resampler=False, unfreeze_mm_vision_tower=False, use_mm_proj=True,
    )
    cfg.update(fields)
    return cfg


def v16_config(**fields) -> dict:
    """liuhaotian/llava-v1.6-vicuna-7b config.json (LLaVA code of Jan 2024, transformers 4.36.2)."""
    cfg = llama_config(
        _name_or_path="lmsys/vicuna-7b-v1.5", architectures=["LlavaLlamaForCausalLM"], attention_bias=False,
        attention_dropout=0.0, freeze_mm_mlp_adapter=False, freeze_mm_vision_resampler=False,
        image_aspect_ratio="anyres", image_crop_resolution=224, image_grid_pinpoints=PINPOINTS,
        image_split_resolution=224, mm_hidden_size=V_HIDDEN, mm_patch_merge_type="spatial_unpad",
        mm_projector_lr=None, mm_projector_type="mlp2x_gelu", mm_resampler_type=None, mm_use_im_patch_token=False,
        mm_use_im_start_end=False, mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=CLIP_336, mm_vision_tower_lr=2e-06, model_type="llava", rope_theta=10000.0,
        tokenizer_model_max_length=4096, tokenizer_padding_side="right", torch_dtype="bfloat16",
        transformers_version="4.36.2", tune_mm_mlp_adapter=False, tune_mm_vision_resampler=False,
        unfreeze_mm_vision_tower=True, use_mm_proj=True,
    )
    cfg.update(fields)
    return cfg


_ADDED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def write_llama_tokenizer(path: Path, *, model_max_length: int = 2048, padding_side: str = "right") -> None:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json as the LLaVA-1.5 releases ship them."""
    shutil.copy(SPM, path / "tokenizer.model")

    def tok(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    _json(path / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": tok("<s>"), "clean_up_tokenization_spaces": False,
        "eos_token": tok("</s>"), "legacy": False, "model_max_length": model_max_length, "pad_token": None,
        "padding_side": padding_side, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": tok("<unk>"),
    })
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _json(path / "special_tokens_map.json", {
        "bos_token": {"content": "<s>", **plain}, "eos_token": {"content": "</s>", **plain}, "pad_token": "<unk>",
        "unk_token": {"content": "<unk>", **plain},
    })


def write_yi_tokenizer(path: Path) -> None:
    """liuhaotian/llava-v1.6-34b's tokenizer (Nous-Hermes-2-Yi-34B's): Yi's SentencePiece model, no BOS added."""
    shutil.copy(SPM_YI, path / "tokenizer.model")
    _json(path / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": True,
        "model_max_length": 4096, "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
    })
    _json(path / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<unk>", "unk_token": "<unk>",
    })


# --- the releases ----------------------------------------------------------------------------------------


def stage(root: Path, repo_id: str) -> Path:
    path = root / "staging" / repo_id.replace("/", "--")
    path.mkdir(parents=True)
    return path


def build_tower(root: Path, cache: Path, repo_id: str, image_size: int, seed: int) -> Path:
    """openai/clip-vit-large-patch14(-336): config.json, preprocessor_config.json, a 4.21 CLIPModel .bin."""
    path = stage(root, repo_id)
    _json(path / "config.json", clip_config(repo_id, image_size))
    _json(path / "preprocessor_config.json", clip_preprocessor(image_size))
    torch.save(clip_model_weights(torch.Generator().manual_seed(seed), image_size), path / "pytorch_model.bin")
    return cache_repo(cache, repo_id, path)


def build_vicuna(root: Path, cache: Path) -> Path:
    """lmsys/vicuna-7b-v1.5: the base LLM of the LoRA and projector-only releases."""
    path = stage(root, VICUNA)
    _json(path / "config.json", llama_config(_name_or_path="vicuna-7b-v1.5", architectures=["LlamaForCausalLM"],
                                             model_type="llama"))
    _json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                            "pad_token_id": 0, "temperature": 0.9, "top_p": 0.6,
                                            "transformers_version": "4.31.0"})
    write_llama_tokenizer(path, model_max_length=4096)
    sd = llm_weights(torch.Generator().manual_seed(21), vocab=VOCAB, kv_heads=HEADS, dtype=torch.float16)
    save_shards(path, sd, fmt="bin", shards=2)
    return cache_repo(cache, VICUNA, path)


def build_v15(root: Path, cache: Path) -> Path:
    """liuhaotian/llava-v1.5-7b: two .bin shards + index, no tower weights (mm_vision_tower is the Hub id)."""
    path = stage(root, V15)
    _json(path / "config.json", v15_config())
    _json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                            "pad_token_id": 0, "transformers_version": "4.31.0"})
    write_llama_tokenizer(path)
    gen = torch.Generator().manual_seed(22)
    sd = llm_weights(gen, vocab=VOCAB, kv_heads=HEADS, dtype=torch.float16)
    sd.update(projector_weights(gen, "mlp2x_gelu", torch.float16))
    save_shards(path, sd, fmt="bin", shards=2)
    return cache_repo(cache, V15, path)


def build_v15_lora(root: Path, cache: Path) -> Path:
    """liuhaotian/llava-v1.5-7b-lora: PEFT adapter (r 128, alpha 256, base recorded as the training machine's
    ./checkpoints/vicuna-7b-v1-5), non_lora_trainables.bin (the projector), config.json."""
    path = stage(root, V15_LORA)
    _json(path / "config.json", v15_config(_name_or_path="./checkpoints/vicuna-7b-v1-5"))
    _json(path / "adapter_config.json", {
        "auto_mapping": None, "base_model_name_or_path": "./checkpoints/vicuna-7b-v1-5", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": 256, "lora_dropout": 0.05, "modules_to_save": None,
        "peft_type": "LORA", "r": 128, "revision": None,
        "target_modules": ["gate_proj", "k_proj", "down_proj", "o_proj", "v_proj", "up_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
    })
    gen = torch.Generator().manual_seed(23)
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
              "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
              "down_proj": (HIDDEN, INTER)}
    factors = {}
    for i in range(LAYERS):
        for t in LORA_TARGETS:
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out_f, in_f = shapes[t]
            p = f"base_model.model.model.layers.{i}.{part}.{t}"
            factors[p + ".lora_A.weight"] = _rand(gen, 128, in_f, std=0.02)
            factors[p + ".lora_B.weight"] = _rand(gen, out_f, 128, std=0.02)
    torch.save(factors, path / "adapter_model.bin")
    non_lora = projector_weights(gen, "mlp2x_gelu", torch.float16, "base_model.model.model.mm_projector.")
    torch.save(non_lora, path / "non_lora_trainables.bin")
    return cache_repo(cache, V15_LORA, path)


def build_v15_projector(root: Path, cache: Path) -> Path:
    """liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5: config.json + mm_projector.bin (bf16)."""
    path = stage(root, V15_PROJECTOR)
    _json(path / "config.json", v15_config(_name_or_path="./checkpoints/vicuna-7b-v1-5", tune_mm_mlp_adapter=True,
                                           use_cache=False))
    sd = projector_weights(torch.Generator().manual_seed(24), "mlp2x_gelu", torch.bfloat16)
    torch.save(sd, path / "mm_projector.bin")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 2181, "log_history": []}) + "\n")
    return cache_repo(cache, V15_PROJECTOR, path)


def _tower_in_checkpoint(gen: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """The fine-tuned tower v1.6 saves (transformers 4.36: no position_ids buffer)."""
    tower = clip_vision_weights(gen, 336, dtype=dtype, position_ids=False)
    return {"model.vision_tower.vision_tower." + k: v for k, v in tower.items()}


def build_v16(root: Path, cache: Path, repo_id: str) -> Path:
    """liuhaotian/llava-v1.6-{vicuna-7b,mistral-7b,34b}: bf16 safetensors shards + index, tower inside."""
    path = stage(root, repo_id)
    dtype = torch.bfloat16
    if repo_id == V16_MISTRAL:
        cfg = v16_config(
            _name_or_path="mistralai/Mistral-7B-Instruct-v0.2", architectures=["LlavaMistralForCausalLM"],
            model_type="llava_mistral", max_position_embeddings=32768, num_key_value_heads=2,
            rope_theta=1000000.0, sliding_window=None,
        )
        for k in ("pad_token_id", "pretraining_tp", "rope_scaling"):
            cfg.pop(k)
        kv, vocab, shards, gen_cfg = 2, VOCAB, 4, {"bos_token_id": 1, "eos_token_id": 2}
        write_llama_tokenizer(path, model_max_length=4096)
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc.update(legacy=True, use_default_system_prompt=False)
        _json(path / "tokenizer_config.json", tc)
    elif repo_id == V16_34B:
        cfg = v16_config(
            _name_or_path="NousResearch/Nous-Hermes-2-Yi-34B", eos_token_id=7, num_key_value_heads=2,
            rope_theta=5000000.0, vocab_size=YI_VOCAB,
        )
        kv, vocab, shards, gen_cfg = 2, YI_VOCAB, 15, {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}
        write_yi_tokenizer(path)
    else:
        cfg = v16_config()
        kv, vocab, shards, gen_cfg = HEADS, VOCAB, 3, {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                                       "pad_token_id": 0}
        write_llama_tokenizer(path, model_max_length=4096)
    _json(path / "config.json", cfg)
    _json(path / "generation_config.json", {**gen_cfg, "transformers_version": "4.36.2"})
    gen = torch.Generator().manual_seed(sum(map(ord, repo_id)))
    sd = llm_weights(gen, vocab=vocab, kv_heads=kv, dtype=dtype)
    sd.update(projector_weights(gen, "mlp2x_gelu", dtype))
    sd["model.image_newline"] = _rand(gen, HIDDEN, std=0.5, dtype=dtype)
    sd.update(_tower_in_checkpoint(gen, dtype))
    save_shards(path, sd, fmt="safetensors", shards=shards)
    return cache_repo(cache, repo_id, path)


def build_lightning(root: Path, cache: Path) -> Path:
    """liuhaotian/llava-llama-2-13b-chat-lightning-preview: LLaVA code of July 2023, 224 px tower, linear
    projector, rotary inv_freq buffers in the weights, three .bin shards."""
    path = stage(root, LIGHTNING)
    _json(path / "config.json", llama_config(
        _name_or_path="./checkpoints/llama-2-13b-chat", architectures=["LlavaLlamaForCausalLM"],
        freeze_mm_mlp_adapter=False, image_aspect_ratio="square", mm_hidden_size=V_HIDDEN,
        mm_projector_type="linear", mm_use_im_patch_token=False, mm_use_im_start_end=False,
        mm_vision_select_feature="patch", mm_vision_select_layer=-2, mm_vision_tower=CLIP_224, model_type="llava",
        tune_mm_mlp_adapter=False, use_mm_proj=True,
    ))
    _json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                            "transformers_version": "4.31.0"})
    write_llama_tokenizer(path)
    gen = torch.Generator().manual_seed(25)
    sd = llm_weights(gen, vocab=VOCAB, kv_heads=HEADS, dtype=torch.float16, inv_freq=True)
    sd.update(projector_weights(gen, "linear", torch.float16))
    save_shards(path, sd, fmt="bin", shards=3)
    return cache_repo(cache, LIGHTNING, path)


RELEASES = (V15, V15_LORA, V15_PROJECTOR, V16_VICUNA, V16_MISTRAL, V16_34B, LIGHTNING)


def build_hub_cache(root: Path) -> Path:
    """Every release above, the two openai towers and lmsys/vicuna-7b-v1.5 in one HF cache folder (returned)."""
    cache = root / "hub"
    build_tower(root, cache, CLIP_336, 336, seed=31)
    build_tower(root, cache, CLIP_224, 224, seed=32)
    build_vicuna(root, cache)
    build_v15(root, cache)
    build_v15_lora(root, cache)
    build_v15_projector(root, cache)
    for repo in (V16_VICUNA, V16_MISTRAL, V16_34B):
        build_v16(root, cache, repo)
    build_lightning(root, cache)
    shutil.rmtree(root / "staging")
    return cache

"""Seeded tiny original-format LLaVA checkpoints, written directly (no authors' code needed).

Used by the fast tests (readers, mapping strictness, writer, CLI errors). The oracle tier builds its
checkpoints with the authors' own code instead (tests/oracle/make_reference.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SPM = Path(__file__).parent / "fixtures" / "spm" / "tiny.model"
VOCAB = 400
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTER = 128
V_HIDDEN = 32
V_LAYERS = 3
V_INTER = 64
IMAGE = 28
PATCH = 14


def _rand(gen: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(torch.float16)


def clip_preprocessor(image_size: int) -> dict:
    """The openai CLIP towers' preprocessor_config.json, at IMAGE_SIZE."""
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": image_size,
    }


def clip_vision_state(gen: torch.Generator, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    n_pos = (IMAGE // PATCH) ** 2 + 1
    sd = {
        "embeddings.class_embedding": _rand(gen, V_HIDDEN),
        "embeddings.patch_embedding.weight": _rand(gen, V_HIDDEN, 3, PATCH, PATCH),
        "embeddings.position_embedding.weight": _rand(gen, n_pos, V_HIDDEN),
        "pre_layrnorm.weight": torch.ones(V_HIDDEN, dtype=torch.float16),
        "pre_layrnorm.bias": _rand(gen, V_HIDDEN),
        "post_layernorm.weight": torch.ones(V_HIDDEN, dtype=torch.float16),
        "post_layernorm.bias": _rand(gen, V_HIDDEN),
    }
    for i in range(V_LAYERS):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = _rand(gen, V_HIDDEN, V_HIDDEN)
            sd[p + f"self_attn.{proj}.bias"] = _rand(gen, V_HIDDEN)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"] = torch.ones(V_HIDDEN, dtype=torch.float16)
            sd[p + f"{ln}.bias"] = _rand(gen, V_HIDDEN)
        sd[p + "mlp.fc1.weight"] = _rand(gen, V_INTER, V_HIDDEN)
        sd[p + "mlp.fc1.bias"] = _rand(gen, V_INTER)
        sd[p + "mlp.fc2.weight"] = _rand(gen, V_HIDDEN, V_INTER)
        sd[p + "mlp.fc2.bias"] = _rand(gen, V_HIDDEN)
    return {prefix + k: v for k, v in sd.items()}


def write_clip(path: Path, seed: int = 1) -> Path:
    """A tiny CLIP vision tower directory: config, preprocessor config, safetensors weights."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    cfg = {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_size": V_HIDDEN,
        "intermediate_size": V_INTER,
        "num_hidden_layers": V_LAYERS,
        "num_attention_heads": 4,
        "image_size": IMAGE,
        "patch_size": PATCH,
        "projection_dim": 16,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor(IMAGE), indent=2))
    save_file(clip_vision_state(gen), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def llm_state(gen: torch.Generator, *, vocab: int = VOCAB, projector: str = "mlp2x_gelu") -> dict[str, torch.Tensor]:
    head_dim = HIDDEN // HEADS
    sd = {"model.embed_tokens.weight": _rand(gen, vocab, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _rand(gen, HIDDEN, HIDDEN)
        sd[p + "self_attn.k_proj.weight"] = _rand(gen, KV_HEADS * head_dim, HIDDEN)
        sd[p + "self_attn.v_proj.weight"] = _rand(gen, KV_HEADS * head_dim, HIDDEN)
        sd[p + "self_attn.o_proj.weight"] = _rand(gen, HIDDEN, HIDDEN)
        sd[p + "mlp.gate_proj.weight"] = _rand(gen, INTER, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = _rand(gen, INTER, HIDDEN)
        sd[p + "mlp.down_proj.weight"] = _rand(gen, HIDDEN, INTER)
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
    sd["lm_head.weight"] = _rand(gen, vocab, HIDDEN)
    if projector == "mlp2x_gelu":
        sd["model.mm_projector.0.weight"] = _rand(gen, HIDDEN, V_HIDDEN)
        sd["model.mm_projector.0.bias"] = _rand(gen, HIDDEN)
        sd["model.mm_projector.2.weight"] = _rand(gen, HIDDEN, HIDDEN)
        sd["model.mm_projector.2.bias"] = _rand(gen, HIDDEN)
    elif projector == "linear":
        sd["model.mm_projector.weight"] = _rand(gen, HIDDEN, V_HIDDEN)
        sd["model.mm_projector.bias"] = _rand(gen, HIDDEN)
    return sd


def original_config(clip: Path, *, projector: str = "mlp2x_gelu", **overrides) -> dict:
    """config.json of an original LLaVA checkpoint: the base LLM's fields plus the authors' mm_* fields."""
    cfg = base_config(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        rope_scaling=None,
        use_cache=True,
        image_aspect_ratio="pad",
        mm_hidden_size=V_HIDDEN,
        mm_projector_type=projector,
        mm_use_im_patch_token=False,
        mm_use_im_start_end=False,
        mm_vision_select_feature="patch",
        mm_vision_select_layer=-2,
        mm_vision_tower=str(clip),
        tune_mm_mlp_adapter=False,
        unfreeze_mm_vision_tower=False,
        use_mm_proj=True,
    )
    cfg.update(overrides)
    return cfg


def write_tokenizer(path: Path) -> None:
    shutil.copy(SPM, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
                "legacy": False,
                "model_max_length": 2048,
                "padding_side": "right",
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"})
    )


def write_original(
    root: Path,
    name: str = "llava-v1.5-tiny",
    *,
    fmt: str = "bin",
    shards: int = 2,
    projector: str = "mlp2x_gelu",
    state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a tiny original checkpoint (and its CLIP tower at ROOT/clip) and return its directory."""
    clip = root / "clip"
    if not clip.exists():
        write_clip(clip)
    ckpt = root / name
    ckpt.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    sd = state if state is not None else llm_state(gen, projector=projector)
    (ckpt / "config.json").write_text(json.dumps(original_config(clip, projector=projector, **config_overrides), indent=2))
    write_tokenizer(ckpt)
    write_state(ckpt, sd, fmt=fmt, shards=shards)
    return ckpt


def write_state(ckpt: Path, sd: dict[str, torch.Tensor], *, fmt: str, shards: int) -> None:
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1 else f"{stem}.{ext}"
        part = {k: sd[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(ckpt / fname), metadata={"format": "pt"})
        else:
            torch.save(part, ckpt / fname)
        weight_map.update({k: fname for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": weight_map}
        (ckpt / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


# --- other forms (issue #4): base LLM, LoRA adapter, projector-only, delta --------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_config(**overrides) -> dict:
    """config.json of a plain Llama LLM (lmsys/vicuna-7b-v1.5 form)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    return cfg


def write_base(
    root: Path, name: str = "vicuna-tiny-v1.5", *, seed: int = 5, fmt: str = "safetensors", shards: int = 1,
    state: dict[str, torch.Tensor] | None = None, **config_overrides,
) -> Path:
    """A tiny base LLM directory: config.json, generation_config.json, tokenizer, weights (no projector)."""
    path = root / name
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    sd = state if state is not None else llm_state(gen, projector="none")
    (path / "config.json").write_text(json.dumps(base_config(**config_overrides), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096}))
    write_tokenizer(path)
    write_state(path, sd, fmt=fmt, shards=shards)
    return path


def projector_state(gen: torch.Generator, prefix: str = "model.mm_projector.") -> dict[str, torch.Tensor]:
    return {
        prefix + "0.weight": _rand(gen, HIDDEN, V_HIDDEN),
        prefix + "0.bias": _rand(gen, HIDDEN),
        prefix + "2.weight": _rand(gen, HIDDEN, HIDDEN),
        prefix + "2.bias": _rand(gen, HIDDEN),
    }


def lora_factors(
    gen: torch.Generator, *, r: int = 4, targets=LORA_TARGETS, layers: int = LAYERS, std: float = 0.3,
) -> dict[str, torch.Tensor]:
    """PEFT-saved LoRA factors (`base_model.model.<module>.lora_{A,B}.weight`) for the tiny Llama."""
    shapes = {
        "q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_HEADS * HIDDEN // HEADS, HIDDEN),
        "v_proj": (KV_HEADS * HIDDEN // HEADS, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER),
    }
    sd = {}
    for i in range(layers):
        for t in targets:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_f, in_f = shapes[t]
            p = f"base_model.model.model.layers.{i}.{part}.{t}"
            sd[p + ".lora_A.weight"] = _rand(gen, r, in_f, std=std)
            sd[p + ".lora_B.weight"] = _rand(gen, out_f, r, std=std)
    return sd


def write_lora(
    root: Path,
    name: str = "llava-v1.5-tiny-lora",
    *,
    r: int = 4,
    alpha: int = 8,
    targets=LORA_TARGETS,
    factors: dict[str, torch.Tensor] | None = None,
    non_lora: dict[str, torch.Tensor] | None = None,
    adapter_format: str = "safetensors",
    base_model_name_or_path: str | None = "lmsys/vicuna-7b-v1.5",
    adapter_overrides: dict | None = None,
    seed: int = 7,
    **config_overrides,
) -> Path:
    """A LoRA run saved like llava/train/train.py: config.json, adapter_config.json + adapter_model.*,
    non_lora_trainables.bin (projector, keys `base_model.model.model.mm_projector.*`), no tokenizer."""
    clip = root / "clip"
    if not clip.exists():
        write_clip(clip)
    path = root / name
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    (path / "config.json").write_text(
        json.dumps(original_config(clip, model_type="llava_llama", **config_overrides), indent=2)
    )
    acfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": list(targets),
        "modules_to_save": None,
        "inference_mode": True,
    }
    acfg.update(adapter_overrides or {})
    (path / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    sd = factors if factors is not None else lora_factors(gen, r=r, targets=targets)
    if adapter_format == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "adapter_model.safetensors"))
    else:
        torch.save(sd, path / "adapter_model.bin")
    nl = non_lora if non_lora is not None else projector_state(gen, "base_model.model.model.mm_projector.")
    torch.save(nl, path / "non_lora_trainables.bin")
    return path


def write_projector(
    root: Path, name: str = "llava-v1.5-mlp2x-tiny-pretrain", *, seed: int = 8, state=None, **config_overrides
) -> Path:
    """A pretrain-stage save: config.json + mm_projector.bin (keys `model.mm_projector.*`)."""
    clip = root / "clip"
    if not clip.exists():
        write_clip(clip)
    path = root / name
    path.mkdir(parents=True)
    cfg = original_config(clip, model_type="llava_llama", tune_mm_mlp_adapter=True, _name_or_path="lmsys/vicuna-7b-v1.5")
    cfg.update(config_overrides)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = state if state is not None else projector_state(torch.Generator().manual_seed(seed))
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path / "mm_projector.bin")
    return path


def write_delta(
    root: Path, base_state: dict[str, torch.Tensor], name: str = "llava-tiny-delta-v1", *, extra_rows: int = 0,
    seed: int = 9, state: dict[str, torch.Tensor] | None = None, **config_overrides,
) -> Path:
    """Delta weights (target - base, small values), `extra_rows` new vocab rows in embed / lm_head,
    linear projector only in the delta (the authors' make_delta form), tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    if state is None:
        state = {}
        for k, v in base_state.items():
            shape = list(v.shape)
            if k in ("model.embed_tokens.weight", "lm_head.weight"):
                shape[0] += extra_rows
            state[k] = _rand(gen, *shape, std=0.01)
        state["model.mm_projector.weight"] = _rand(gen, HIDDEN, V_HIDDEN)
        state["model.mm_projector.bias"] = _rand(gen, HIDDEN)
    overrides = {"vocab_size": VOCAB + extra_rows, "mm_projector_type": "linear", **config_overrides}
    return write_original(root, name, fmt="safetensors", shards=1, projector="linear", state=state, **overrides)


# --- The LLaVA-NeXT repository's layout (LLaVA-OneVision: Qwen2 + SigLIP, anyres_max_9, a pinpoint range) ------

SIGLIP_ID = "google/siglip-so400m-patch14-384"
SIGLIP_IMAGE, SIGLIP_PATCH = 384, 14  # the authors' SigLipVisionTower runs 384 px / patch 14 whatever the size
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def cache_repo(cache: Path, repo_id: str, src: Path) -> Path:
    """Copy SRC into huggingface_hub's cache layout (models--org--name/{refs/main, snapshots/<commit>})."""
    import hashlib

    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(src, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


def write_qwen_tokenizer(path: Path) -> int:
    """A small byte-level BPE tokenizer with Qwen's special tokens and file settings; returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a picture of a cat on a mat", "What is shown in this image?"] * 5, trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIALS))
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", unk_token=None,
                              pad_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return len(fast)


def siglip_vision_state(
    gen: torch.Generator, *, hidden: int = V_HIDDEN, layers: int = V_LAYERS, inter: int = V_INTER,
    prefix: str = "vision_model.", std: float = 0.2,
) -> dict[str, torch.Tensor]:
    """A SigLIP vision tower's tensors (384 px, patch 14: 729 positions), LAYERS encoder layers, no head."""
    sd = {
        prefix + "embeddings.patch_embedding.weight": _rand(gen, hidden, 3, SIGLIP_PATCH, SIGLIP_PATCH, std=std),
        prefix + "embeddings.patch_embedding.bias": _rand(gen, hidden, std=std),
        prefix + "embeddings.position_embedding.weight": _rand(gen, (SIGLIP_IMAGE // SIGLIP_PATCH) ** 2, hidden,
                                                               std=std),
        prefix + "post_layernorm.weight": _rand(gen, hidden, std=std),
        prefix + "post_layernorm.bias": _rand(gen, hidden, std=std),
    }
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{n}_proj.weight"] = _rand(gen, hidden, hidden, std=std)
            sd[p + f"self_attn.{n}_proj.bias"] = _rand(gen, hidden, std=std)
        for n in ("layer_norm1", "layer_norm2"):
            sd[p + f"{n}.weight"] = _rand(gen, hidden, std=std)
            sd[p + f"{n}.bias"] = _rand(gen, hidden, std=std)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _rand(gen, inter, hidden, std=std), _rand(gen, inter, std=std)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _rand(gen, hidden, inter, std=std), _rand(gen, hidden, std=std)
    return sd


def write_siglip(path: Path, *, hidden: int = V_HIDDEN, layers: int = V_LAYERS, weights: bool = True,
                 seed: int = 11) -> Path:
    """A SigLIP tower directory as google/siglip-so400m-patch14-384 ships it (a SiglipModel save: its vision
    half with the attention-pooling head, a text half, logit scale / bias), sizes shrunk."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["SiglipModel"], "model_type": "siglip",
        "text_config": {"model_type": "siglip_text_model", "hidden_size": hidden, "intermediate_size": V_INTER,
                        "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 32},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": V_INTER,
                          "num_attention_heads": 4, "num_hidden_layers": layers, "image_size": SIGLIP_IMAGE,
                          "patch_size": SIGLIP_PATCH},
    }))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "resample": 3, "rescale_factor": 1 / 255, "size": {"height": SIGLIP_IMAGE, "width": SIGLIP_IMAGE},
    }))
    if weights:
        gen = torch.Generator().manual_seed(seed)
        sd = siglip_vision_state(gen, hidden=hidden, layers=layers)
        sd.update({
            "vision_model.head.probe": _rand(gen, 1, 1, hidden),
            "vision_model.head.mlp.fc1.weight": _rand(gen, V_INTER, hidden),
            "text_model.embeddings.token_embedding.weight": _rand(gen, 32, hidden),
            "logit_scale": _rand(gen, 1), "logit_bias": _rand(gen, 1),
        })
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def qwen_state(gen: torch.Generator, *, hidden: int = HIDDEN, inter: int = INTER, layers: int = LAYERS,
               vocab: int = VOCAB, tied: bool = True, std: float = 0.2) -> dict[str, torch.Tensor]:
    """A Qwen2 language model's tensors (q/k/v biases); no lm_head when TIED (as Qwen2-0.5B saves)."""
    kv = KV_HEADS * hidden // HEADS
    sd = {"model.embed_tokens.weight": _rand(gen, vocab, hidden, std=std), "model.norm.weight": _rand(gen, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, out_f in (("q", hidden), ("k", kv), ("v", kv)):
            sd[p + f"self_attn.{n}_proj.weight"] = _rand(gen, out_f, hidden, std=std)
            sd[p + f"self_attn.{n}_proj.bias"] = _rand(gen, out_f, std=std)
        sd[p + "self_attn.o_proj.weight"] = _rand(gen, hidden, hidden, std=std)
        for n, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            sd[p + f"mlp.{n}_proj.weight"] = _rand(gen, *shape, std=std)
        sd[p + "input_layernorm.weight"] = _rand(gen, hidden)
        sd[p + "post_attention_layernorm.weight"] = _rand(gen, hidden)
    if not tied:
        sd["lm_head.weight"] = _rand(gen, vocab, hidden, std=std)
    return sd


def qwen_config(*, hidden: int = HIDDEN, inter: int = INTER, layers: int = LAYERS, vocab: int = VOCAB,
                tied: bool = True, **overrides) -> dict:
    """config.json of a Qwen2 LLM (Qwen/Qwen2-0.5B-Instruct's fields, sizes shrunk)."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": layers,
        "tie_word_embeddings": tied, "vocab_size": vocab, "bos_token_id": 300, "eos_token_id": 302,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def onevision_config(**overrides) -> dict:
    """config.json of a LLaVA-OneVision checkpoint (lmms-lab/llava-onevision-qwen2-0.5b-ov's fields)."""
    cfg = qwen_config(
        architectures=["LlavaQwenForCausalLM"], model_type="llava", image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints="(1x1),...,(6x6)", mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
        mm_hidden_size=V_HIDDEN, mm_vision_tower=SIGLIP_ID, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model",
        mm_use_im_patch_token=False, mm_use_im_start_end=False, tokenizer_model_max_length=32768,
    )
    cfg.update(overrides)
    return cfg


def onevision_state(gen: torch.Generator, *, hidden: int = HIDDEN, inter: int = INTER, layers: int = LAYERS,
                    vocab: int = VOCAB, tied: bool = True, v_hidden: int = V_HIDDEN, v_layers: int = V_LAYERS,
                    std: float = 0.2) -> dict[str, torch.Tensor]:
    """A OneVision checkpoint's tensors: Qwen2, projector, image_newline, the SigLIP tower minus its last layer."""
    sd = qwen_state(gen, hidden=hidden, inter=inter, layers=layers, vocab=vocab, tied=tied, std=std)
    sd.update({
        "model.mm_projector.0.weight": _rand(gen, hidden, v_hidden, std=std),
        "model.mm_projector.0.bias": _rand(gen, hidden, std=std),
        "model.mm_projector.2.weight": _rand(gen, hidden, hidden, std=std),
        "model.mm_projector.2.bias": _rand(gen, hidden, std=std),
        "model.image_newline": _rand(gen, hidden, std=std),
    })
    sd.update(siglip_vision_state(gen, hidden=v_hidden, layers=v_layers - 1,
                                  prefix="model.vision_tower.vision_tower.vision_model.", std=std))
    return sd


def write_onevision(root: Path, name: str = "llava-onevision-qwen2-tiny-ov", *, cache: Path, shards: int = 1,
                    state: dict[str, torch.Tensor] | None = None, seed: int = 0, v_hidden: int = V_HIDDEN,
                    **config_overrides) -> Path:
    """A tiny OneVision checkpoint (its trained tower inside); the SigLIP tower's config served from CACHE under
    its Hub id, as `mm_vision_tower` names it."""
    if not (cache / ("models--" + SIGLIP_ID.replace("/", "--"))).exists():
        cache_repo(cache, SIGLIP_ID, write_siglip(root / "siglip-hub", hidden=v_hidden, weights=True))
    ckpt = root / name
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(onevision_config(mm_hidden_size=v_hidden, **config_overrides), indent=2))
    assert write_qwen_tokenizer(ckpt) + 2 <= VOCAB
    write_state(ckpt, state if state is not None else onevision_state(torch.Generator().manual_seed(seed)),
                fmt="safetensors", shards=shards)
    return ckpt

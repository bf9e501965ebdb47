"""Synthetic original-format LLaVA-v1.5 checkpoints with real 7B widths, for the benchmarks.

    .venv/bin/python bench/make_checkpoint.py --size 1 --layout bin --out bench/out/src

Shapes are LLaMA-7B's (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with fewer decoder layers,
so that the checkpoint folder is about SIZE GB; the projector is v1.5's mlp2x_gelu (1024 -> 4096 -> 4096).
The CLIP tower is a CLIP-L/14-336 vision model (hidden 1024, 24 layers, 577 positions) in its own folder
(config.json, preprocessor_config.json, model.safetensors), shared by every checkpoint and referenced by
`mm_vision_tower`, with `unfreeze_mm_vision_tower: false` as on liuhaotian/llava-v1.5-7b.

Layouts: `bin` (`pytorch_model-0000i-of-0000n.bin` + index, written by `torch.save` with one storage per
tensor, like a `save_pretrained` of transformers 4.31) and `safetensors` (`model-0000i-of-0000n.safetensors`).
Weights are float16, N(0, 0.02) (norm weights 1), drawn once from a seeded pool and sliced, so building
4 GB takes seconds; every tensor is cloned so `torch.save` writes only its own bytes.

The tokenizer is a 32000-piece Llama-style SentencePiece BPE model (byte fallback, dummy prefix), made
deterministically from the project's 400-piece test fixture by appending letter n-grams (every n-gram's
prefix is in the vocabulary, so BPE can reach each piece), with v1.5's tokenizer_config.json. Its length
matches the embedding rows, which the converter checks.

Everything is deterministic; a `bench_manifest.json` records the spec, and an existing folder with the same
spec is reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: `run.py` imports this module without it
    import torch

ROOT = Path(__file__).resolve().parent.parent
SPM_FIXTURE = ROOT / "tests" / "fixtures" / "spm" / "tiny.model"

VOCAB = 32000
HIDDEN = 4096
INTER = 11008
HEADS = 32
V_HIDDEN = 1024
V_INTER = 4096
V_LAYERS = 24
V_HEADS = 16
PATCH = 14
IMAGE = 336
GB = 10**9
SPEC_VERSION = 1

_POOL_NUMEL = 1 << 26  # 64M float16 values (128 MB), sliced at varying offsets


def layer_bytes() -> int:
    return 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)


def fixed_bytes() -> int:
    """Embeddings, LM head, final norm, projector: everything but the decoder layers."""
    return 2 * (2 * VOCAB * HIDDEN + HIDDEN + V_HIDDEN * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN)


def layers_for_size(size_gb: float) -> int:
    """Decoder layers whose checkpoint size is closest to SIZE_GB (at least one)."""
    target = size_gb * GB
    n = round((target - fixed_bytes()) / layer_bytes())
    return max(1, n)


class _Pool:
    """Deterministic N(0, std) float16 values, handed out as fresh tensors (each owns its storage)."""

    def __init__(self, seed: int, std: float = 0.02):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.data = (torch.randn(_POOL_NUMEL, generator=g) * std).to(torch.float16)
        self.pos = 0

    def take(self, *shape: int) -> torch.Tensor:
        import torch

        n = 1
        for s in shape:
            n *= s
        out = torch.empty(n, dtype=torch.float16)
        done = 0
        while done < n:
            start = self.pos % _POOL_NUMEL
            k = min(n - done, _POOL_NUMEL - start)
            out[done : done + k] = self.data[start : start + k]
            done += k
            self.pos += k + 7919  # a prime stride: consecutive tensors do not share contents
        return out.view(*shape)


def _ones(n: int) -> torch.Tensor:
    import torch

    return torch.ones(n, dtype=torch.float16)


def llm_tensors(layers: int, pool: _Pool):
    """(name, tensor) in the order LlavaLlamaForCausalLM.state_dict() lists them, one at a time."""
    yield "model.embed_tokens.weight", pool.take(VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            yield p + f"self_attn.{proj}_proj.weight", pool.take(HIDDEN, HIDDEN)
        yield p + "mlp.gate_proj.weight", pool.take(INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", pool.take(INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", pool.take(HIDDEN, INTER)
        yield p + "input_layernorm.weight", _ones(HIDDEN)
        yield p + "post_attention_layernorm.weight", _ones(HIDDEN)
    yield "model.norm.weight", _ones(HIDDEN)
    yield "model.mm_projector.0.weight", pool.take(HIDDEN, V_HIDDEN)
    yield "model.mm_projector.0.bias", pool.take(HIDDEN)
    yield "model.mm_projector.2.weight", pool.take(HIDDEN, HIDDEN)
    yield "model.mm_projector.2.bias", pool.take(HIDDEN)
    yield "lm_head.weight", pool.take(VOCAB, HIDDEN)


def clip_tensors(pool: _Pool):
    n_pos = (IMAGE // PATCH) ** 2 + 1
    p = "vision_model."
    yield p + "embeddings.class_embedding", pool.take(V_HIDDEN)
    yield p + "embeddings.patch_embedding.weight", pool.take(V_HIDDEN, 3, PATCH, PATCH)
    yield p + "embeddings.position_embedding.weight", pool.take(n_pos, V_HIDDEN)
    yield p + "pre_layrnorm.weight", _ones(V_HIDDEN)
    yield p + "pre_layrnorm.bias", pool.take(V_HIDDEN)
    for i in range(V_LAYERS):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield q + f"self_attn.{proj}.weight", pool.take(V_HIDDEN, V_HIDDEN)
            yield q + f"self_attn.{proj}.bias", pool.take(V_HIDDEN)
        yield q + "layer_norm1.weight", _ones(V_HIDDEN)
        yield q + "layer_norm1.bias", pool.take(V_HIDDEN)
        yield q + "mlp.fc1.weight", pool.take(V_INTER, V_HIDDEN)
        yield q + "mlp.fc1.bias", pool.take(V_INTER)
        yield q + "mlp.fc2.weight", pool.take(V_HIDDEN, V_INTER)
        yield q + "mlp.fc2.bias", pool.take(V_HIDDEN)
        yield q + "layer_norm2.weight", _ones(V_HIDDEN)
        yield q + "layer_norm2.bias", pool.take(V_HIDDEN)
    yield p + "post_layernorm.weight", _ones(V_HIDDEN)
    yield p + "post_layernorm.bias", pool.take(V_HIDDEN)


def _write_shards(folder: Path, tensors, *, layout: str, max_shard_bytes: int) -> dict:
    """Group tensors into shards in order (at most MAX_SHARD_BYTES each) and write them; return the index."""
    import torch
    from safetensors.torch import save_file

    groups: list[dict] = [{}]
    size = 0
    for name, t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += t.nbytes
    n = len(groups)
    stem, ext = ("model", "safetensors") if layout == "safetensors" else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" if n > 1 else f"{stem}.{ext}"
        if layout == "safetensors":
            save_file(group, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(group, folder / fname)
        weight_map.update({k: fname for k in group})
        total += sum(t.nbytes for t in group.values())
        groups[i] = {}  # release the shard's tensors before building the next
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": n, "tensor_bytes": total}


def original_config(clip: Path, layers: int) -> dict:
    """config.json as liuhaotian/llava-v1.5-7b has it, with this checkpoint's layer count and tower path."""
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_length": 4096,
        "max_position_embeddings": 4096,
        "mm_hidden_size": V_HIDDEN,
        "mm_projector_lr": 2e-05,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip),
        "model_type": "llava",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": HEADS,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": VOCAB,
    }


def spm_model_bytes(vocab: int = VOCAB) -> bytes:
    """The 400-piece fixture grown to VOCAB pieces with letter n-grams (lowest scores, merge-reachable)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(SPM_FIXTURE.read_bytes())
    have = {p.piece for p in m.pieces}
    score = min(p.score for p in m.pieces)

    def candidates():
        for n in range(1, 5):
            for letters in itertools.product(string.ascii_lowercase, repeat=n):
                s = "".join(letters)
                yield "\u2581" + s
                yield s

    for s in candidates():
        if len(m.pieces) >= vocab:
            break
        if s in have:
            continue
        piece = m.pieces.add()
        piece.piece, piece.type = s, pb.ModelProto.SentencePiece.NORMAL
        score -= 1.0
        piece.score = score
        have.add(s)
    m.trainer_spec.vocab_size = vocab
    return m.SerializeToString()


def write_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(spm_model_bytes())
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "clean_up_tokenization_spaces": False,
        "eos_token": {
            "__type": "AddedToken",
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {
            "__type": "AddedToken",
            "content": "<unk>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _manifest_matches(folder: Path, spec: dict) -> bool:
    m = folder / "bench_manifest.json"
    return m.is_file() and json.loads(m.read_text()).get("spec") == spec


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_clip(out: Path) -> Path:
    """The shared CLIP-L/14-336 vision tower folder (reused when present with the same spec)."""
    folder = out / "clip-vit-large-patch14-336"
    spec = {"version": SPEC_VERSION, "kind": "clip", "hidden": V_HIDDEN, "layers": V_LAYERS, "image": IMAGE}
    if _manifest_matches(folder, spec):
        return folder
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": V_HIDDEN,
        "image_size": IMAGE,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": V_INTER,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": V_HEADS,
        "num_channels": 3,
        "num_hidden_layers": V_LAYERS,
        "patch_size": PATCH,
        "projection_dim": 768,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    pre = {
        "crop_size": IMAGE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": IMAGE,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_file(dict(clip_tensors(_Pool(seed=1))), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "bench_manifest.json").write_text(
        json.dumps({"spec": spec, "bytes": _bytes_under(folder)}, indent=2)
    )
    return folder


def make_checkpoint(
    out: Path, size_gb: float, layout: str, *, max_shard_gb: float = 2.0, clip: Path | None = None
) -> Path:
    """An original LLaVA-v1.5-style checkpoint of about SIZE_GB in OUT (reused when already built)."""
    if layout not in ("bin", "safetensors"):
        raise ValueError(f"layout must be bin or safetensors, not {layout!r}")
    clip = clip or make_clip(out)
    layers = layers_for_size(size_gb)
    folder = out / f"llava-v1.5-{size_gb:g}gb-{layout}"
    spec = {
        "version": SPEC_VERSION,
        "layers": layers,
        "layout": layout,
        "max_shard_gb": max_shard_gb,
        "clip": str(clip),
    }
    if _manifest_matches(folder, spec):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t = time.perf_counter()
    (folder / "config.json").write_text(json.dumps(original_config(clip, layers), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0}, indent=2)
    )
    write_tokenizer(folder)
    info = _write_shards(
        folder, llm_tensors(layers, _Pool(seed=0)), layout=layout, max_shard_bytes=int(max_shard_gb * GB)
    )
    manifest = {
        "spec": spec,
        "bytes": _bytes_under(folder),
        "build_s": round(time.perf_counter() - t, 1),
        **info,
    }
    (folder / "bench_manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=1.0, help="target checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--layout", choices=["bin", "safetensors"], default="bin")
    ap.add_argument("--max-shard-gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "src")
    ap.add_argument(
        "--tiny", action="store_true", help="the test suite's tiny checkpoint instead (tests/builders.py)"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        print(make_tiny(args.out))
        return
    folder = make_checkpoint(args.out, args.size, args.layout, max_shard_gb=args.max_shard_gb)
    print(json.dumps(json.loads((folder / "bench_manifest.json").read_text()), indent=2))
    print(folder)


def make_tiny(out: Path) -> Path:
    """The test suite's seeded tiny checkpoint (2 layers, hidden 64, vocab 400) and its tiny CLIP tower."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from builders import write_original

    ckpt = out / "llava-v1.5-tiny"
    if not ckpt.exists():
        shutil.rmtree(out / "clip", ignore_errors=True)
        write_original(out)
    return ckpt


if __name__ == "__main__":
    main()

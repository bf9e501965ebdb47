"""The in-memory conversion approach of transformers' `convert_llava_weights_to_hf.py`, on transformers 5.

    .venv/bin/python bench/upstream_inmemory.py SOURCE OUTPUT [--vision-tower CLIP_DIR]

A benchmark baseline, not a converter: it reproduces the upstream script's steps and costs, in its order,
with only the changes transformers 5 forces (the upstream script no longer runs there):

1. `torch.set_default_dtype(float16)`; tokenizer from the checkpoint plus `<image>` and `<pad>`;
   image processor from the CLIP folder; `LlavaProcessor`.
2. `LlavaConfig(text_config, vision_config)` with pad 32001 / image 32000; the model built on the meta device.
3. The whole original state dict loaded into RAM: `torch.load(map_location="cpu", weights_only=True)` for
   `.bin` shards (upstream loads its hand-made `model_state_dict.bin` this way), `safe_open(...).get_tensor`
   for safetensors shards (upstream's `load_original_state_dict`). Upstream's hand-made file holds the CLIP
   tower too (`model.vision_tower.vision_tower.vision_model.*`), so the CLIP weights are loaded into the same
   dict under those names.
4. Keys renamed by ordered substring replacement (upstream's `KEYS_TO_MODIFY_MAPPING` style), with targets
   spelled as transformers 5 names parameters in memory (`model.language_model.*`, `model.vision_tower.*`,
   `model.multi_modal_projector.*`, `lm_head.*`); `load_state_dict(strict=True, assign=True)`.
5. Embedding statistics (mean, covariance over all rows) and a `MultivariateNormal`;
   `resize_token_embeddings(vocab + 2, pad_to_multiple_of=64)`; new rows of embed_tokens and lm_head sampled
   one `dist.sample()` at a time, as upstream does.
6. `save_pretrained` (upstream: `push_to_hub`, which saves the same files first) for model and processor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Ordered substring replacements, applied in turn to every key (upstream style), with transformers 5 targets.
KEYS_TO_MODIFY = {
    "model.vision_tower.vision_tower.vision_model.": "model.vision_tower.",
    "model.mm_projector.0": "model.multi_modal_projector.linear_1",
    "model.mm_projector.2": "model.multi_modal_projector.linear_2",
    "model.embed_tokens": "model.language_model.embed_tokens",
    "model.layers": "model.language_model.layers",
    "model.norm": "model.language_model.norm",
}
CLIP_PREFIX = "model.vision_tower.vision_tower."


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def load_file(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[prefix + key] = f.get_tensor(key)
        return out
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {prefix + k: v for k, v in sd.items()}


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    new = {}
    for key, value in state_dict.items():
        if key.endswith(".inv_freq"):
            continue
        for old, repl in KEYS_TO_MODIFY.items():
            if old in key:
                key = key.replace(old, repl)
        new[key] = value
    return new


def text_config_from_original(cfg: dict):
    """Upstream reads the base LLM's own config (`AutoConfig.from_pretrained(text_model_id)`); an original
    LLaVA config.json says `model_type: llava`, so build the LlamaConfig from its LLM fields instead."""
    import inspect

    from transformers import LlamaConfig

    allowed = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self"}
    return LlamaConfig(**{k: v for k, v in cfg.items() if k in allowed and not k.startswith("mm_")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--vision-tower", type=Path, default=None)
    args = ap.parse_args()
    phases: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 2)
        t = now

    from transformers import (
        AddedToken,
        AutoImageProcessor,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    mark("imports")
    orig = json.loads((args.source / "config.json").read_text())
    clip = args.vision_tower or Path(orig["mm_vision_tower"])
    torch.set_default_dtype(torch.float16)
    text_config = text_config_from_original(orig)

    tokenizer = AutoTokenizer.from_pretrained(str(args.source), legacy=True)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = AutoImageProcessor.from_pretrained(str(clip))
    processor = LlavaProcessor(tokenizer=tokenizer, image_processor=image_processor)
    mark("tokenizer+processor")

    vision_config = CLIPVisionConfig.from_pretrained(str(clip)).to_dict()
    config = LlavaConfig(text_config=text_config, vision_config=vision_config)
    config.pad_token_id = 32001
    config.image_token_index = 32000
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    mark("meta model")

    state_dict: dict[str, torch.Tensor] = {}
    for f in _weight_files(args.source):
        state_dict.update(load_file(f))
    for f in _weight_files(clip):
        state_dict.update(load_file(f, CLIP_PREFIX))
    mark("load state dict")

    state_dict = convert_state_dict(state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    mark("rename+assign")

    emb = model.get_input_embeddings().weight.data
    mu = torch.mean(emb, dim=0).float()
    n = emb.size()[0]
    sigma = ((emb - mu).T @ (emb - mu)) / n
    dist = torch.distributions.multivariate_normal.MultivariateNormal(mu, covariance_matrix=1e-5 * sigma)
    mark("embedding stats")

    vocab_size = config.text_config.vocab_size
    model.resize_token_embeddings(vocab_size + 2, 64)
    mark("resize")
    emb = model.get_input_embeddings().weight.data
    emb[vocab_size:] = torch.stack(tuple(dist.sample() for _ in range(emb[vocab_size:].shape[0])), dim=0)
    head = model.get_output_embeddings().weight.data
    head[vocab_size:] = torch.stack(tuple(dist.sample() for _ in range(head[vocab_size:].shape[0])), dim=0)
    mark("sample new rows")

    model.save_pretrained(str(args.output))
    processor.save_pretrained(str(args.output))
    mark("save")
    phases["total"] = round(time.perf_counter() - t0, 2)
    print(json.dumps({"phases": phases}))


if __name__ == "__main__":
    main()

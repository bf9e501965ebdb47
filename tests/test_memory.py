"""Streaming: conversion memory is bounded by the largest tensor, not by the shard or the model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from builders import write_state
from memwatch import convert_growth

MB = 1 << 20


def _big_checkpoint(root, fmt):
    """~200 MB in ONE shard, largest tensor 4 MB: a whole-shard load would far exceed the bound."""
    from builders import original_config, write_clip, write_tokenizer

    clip = write_clip(root / "clip")
    hidden, inter, layers, vocab = 1024, 2048, 10, 400
    gen = torch.Generator().manual_seed(0)

    def r(*s):
        return (torch.randn(*s, generator=gen) * 0.02).half()

    sd = {"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden), "model.norm.weight": r(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = r(hidden, hidden)
        for n, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            sd[p + f"mlp.{n}_proj.weight"] = r(*shape)
        sd[p + "input_layernorm.weight"] = r(hidden)
        sd[p + "post_attention_layernorm.weight"] = r(hidden)
    sd["model.mm_projector.0.weight"] = r(hidden, 32)
    sd["model.mm_projector.0.bias"] = r(hidden)
    sd["model.mm_projector.2.weight"] = r(hidden, hidden)
    sd["model.mm_projector.2.bias"] = r(hidden)
    ckpt = root / "llava-v1.5-big"
    ckpt.mkdir()
    cfg = original_config(clip, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=8)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(ckpt)
    write_state(ckpt, sd, fmt=fmt, shards=1)
    total = sum(t.nbytes for t in sd.values())
    largest = max(t.nbytes for t in sd.values())
    return ckpt, total, largest


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "dtype"), [("bin", "auto"), ("safetensors", "float32")])
def test_peak_anonymous_memory_bounded_by_largest_tensor(tmp_path, fmt, dtype):
    ckpt, total, largest = _big_checkpoint(tmp_path, fmt)
    assert total > 180 * MB and largest == 4 * MB
    out = tmp_path / "out"
    growth = convert_growth(ckpt, out, dtype=dtype)
    itemsize_ratio = 2 if dtype == "float32" else 1
    bound = 3 * largest * itemsize_ratio + 64 * MB
    print(f"growth {growth / MB:.1f} MB")
    assert growth < bound, f"anonymous memory grew {growth / MB:.1f} MB (bound {bound / MB:.1f} MB, model {total / MB:.0f} MB)"
    assert growth < total / 2  # a whole-shard load could not pass


@pytest.mark.slow
def test_peak_memory_bounded_for_onevision_checkpoint(tmp_path):
    """The LLaVA-NeXT repository's layout (OneVision: Qwen2 with q/k/v biases, tied embeddings without lm_head,
    the trained SigLIP tower minus its last layer inside, its config from `mm_vision_tower`'s Hub id in the HF
    cache, anyres_max_9, a pinpoint range) streams too: ~200 MB in ONE shard, peak bounded by the largest tensor."""
    from builders import onevision_state, write_onevision

    hidden, inter, layers, vocab = 1024, 2048, 10, 448
    sd = onevision_state(torch.Generator().manual_seed(0), hidden=hidden, inter=inter, layers=layers, vocab=vocab,
                         v_hidden=64, std=0.02)
    total, largest = sum(t.nbytes for t in sd.values()), max(t.nbytes for t in sd.values())
    assert total > 180 * MB and largest == 4 * MB
    cache = tmp_path / "hf-cache"
    ckpt = write_onevision(tmp_path, "llava-onevision-qwen2-big-ov", cache=cache, state=sd, hidden_size=hidden,
                           intermediate_size=inter, num_hidden_layers=layers, max_window_layers=layers,
                           vocab_size=vocab, v_hidden=64)
    out = tmp_path / "out"
    growth = convert_growth(ckpt, out, env=dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    bound = 3 * largest + 64 * MB
    print(f"growth {growth / MB:.1f} MB")
    assert growth < bound, f"anonymous memory grew {growth / MB:.1f} MB (bound {bound / MB:.1f} MB, model {total / MB:.0f} MB)"
    assert growth < total / 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"], cfg
    assert cfg["vision_config"]["num_hidden_layers"] == 2 and cfg["vision_aspect_ratio"] == "anyres_max_9"
    assert len(cfg["image_grid_pinpoints"]) == 36

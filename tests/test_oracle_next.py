"""Oracle tier for LLaVA-NeXT (v1.6): anyres tiling, image_newline, the checkpoint's fine-tuned tower."""

from __future__ import annotations

import json

import pytest
import torch
from parity import assert_parity
from safetensors import safe_open

from llava_convert.convert import convert

pytestmark = [pytest.mark.oracle, pytest.mark.slow]


def _checkpoint(case_dir):
    (ckpt,) = [p for p in case_dir.iterdir() if p.is_dir() and p.name.startswith("llava")]
    return ckpt


@pytest.mark.parametrize(
    ("case", "template"),
    [("v16_mistral", "mistral_instruct"), ("v16_vicuna", "llava_v1"), ("v16_34b", "chatml_direct")],
)
def test_next_matches_authors(oracle_case, tmp_path, case, template):
    case_dir = oracle_case(case)
    out = tmp_path / "hf"
    plan = convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    assert plan.chat_template == template
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["model_type"] == "llava_next"
    # The authors read each pair as (width, height), transformers as (height, width): written swapped, in order.
    assert cfg["image_grid_pinpoints"] == [[56, 28], [28, 56], [56, 56], [84, 28], [28, 84]]
    assert _image_processor_config(out)["image_grid_pinpoints"] == cfg["image_grid_pinpoints"]
    report = assert_parity(out, case_dir)
    # The three aspect ratios pick three different grids.
    assert len({r["num_image_tokens"] for r in report.values()}) == 3


def test_next_grid_matches_authors_for_every_image_size(oracle_case, tmp_path):
    """The released 336-pixel geometry and pinpoints: images no larger than the tower (ties between grids),
    the tower's size and larger ones get the authors' grid, pixels, logits and greedy tokens."""
    from images import ANYRES_336

    case_dir = oracle_case("v16_anyres_336")
    ref = torch.load(case_dir / "reference.pt", weights_only=True)
    assert ref["image_names"] == list(ANYRES_336)
    out = tmp_path / "hf"
    convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    report = assert_parity(out, case_dir)
    for name, r in report.items():
        print(f"v16_anyres_336 {name}: {r['num_image_tokens']} image tokens, pixels max diff "
              f"{r['pixel_max_diff']}, logits max diff {r['logits_max_diff']:.2e}, generated {r['generated']}")
    # 300x180 upscales equally into 1x2 and 2x1 tiles; the first candidate wins: the authors' (336 wide, 672
    # tall). The converted pinpoints make transformers pick the same; copied as written it picks the other.
    from transformers.image_processing_utils import select_best_resolution

    authors = json.loads((_checkpoint(case_dir) / "config.json").read_text())["image_grid_pinpoints"]
    converted = json.loads((out / "config.json").read_text())["image_grid_pinpoints"]
    assert select_best_resolution((180, 300), converted) == (672, 336)  # (height, width)
    assert select_best_resolution((180, 300), authors) == (336, 672)
    assert _image_processor_config(out)["image_grid_pinpoints"] == converted
    assert ref["images"]["large_1000x600"]["pixel_values"].shape[1] == 5  # 2x2 tiles + the base image


def _image_processor_config(out):
    """The image processor's saved settings (preprocessor_config.json, or nested in processor_config.json)."""
    if (out / "preprocessor_config.json").is_file():
        return json.loads((out / "preprocessor_config.json").read_text())
    return json.loads((out / "processor_config.json").read_text())["image_processor"]


def test_next_uses_checkpoint_tower_not_stock_clip(oracle_case, tmp_path):
    """v1.6 fine-tunes the tower: the converted weights are the checkpoint's, not clip/'s."""
    case_dir = oracle_case("v16_mistral")
    ckpt = _checkpoint(case_dir)
    out = tmp_path / "hf"
    convert(ckpt, out, progress=False)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    src_key = "model.vision_tower.vision_tower." + key
    with safe_open(str(ckpt / index[src_key]), "pt") as f:
        tuned = f.get_tensor(src_key)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor("vision_tower." + key)
    assert (got == tuned).all()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["model_type"] == "mistral"
    assert cfg["text_config"]["sliding_window"] is None
    assert cfg["text_config"]["num_key_value_heads"] < cfg["text_config"]["num_attention_heads"]


def test_next_34b_yi_form(oracle_case, tmp_path):
    """llava-v1.6-34b: Yi backbone (Llama, GQA, rope_theta 5e6), chatml_direct, Yi's tokenizer (no BOS added,
    no SentencePiece dummy prefix: no "▁" at the start or after `<|im_start|>` / `<image>`)."""
    from transformers import AutoProcessor

    case_dir = oracle_case("v16_34b")
    ckpt = _checkpoint(case_dir)
    assert "llava-v1.6-34b" in ckpt.name
    out = tmp_path / "hf"
    plan = convert(ckpt, out, dtype="float32", progress=False)
    assert plan.chat_template == "chatml_direct"
    original = json.loads((ckpt / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_token_index"] == original["vocab_size"]
    text = cfg["text_config"]
    assert text["model_type"] == "llama"
    assert text["num_key_value_heads"] < text["num_attention_heads"]
    assert (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta")) == 5000000.0
    processor = AutoProcessor.from_pretrained(str(out))
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == original["vocab_size"]
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|startoftext|>", 1, "<|endoftext|>", 2,
    )
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [6, 7]
    ref = torch.load(case_dir / "reference.pt", weights_only=True)
    want = ref["images"]["landscape"]["input_ids"].tolist()
    assert want[0] == 6  # <|im_start|>: the authors' prompt has no BOS (add_bos_token false)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ref["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ref["prompt"]
    ids = tok(prompt).input_ids
    assert ids == [cfg["image_token_index"] if t == -200 else t for t in want]
    assert tok.decode(ids[-6:]) == "<|im_end|><|im_start|>assistant\n"

"""Oracle tier for `check`: the project's reference (llava_convert/reference.py) reproduces the authors' own
recorded outputs, and the checker accepts the converter's output for every oracle case.

Per image: identical prompt and input_ids (tokenizer_image_token), identical pixel_values, every intermediate
stage and the float32 logits within 1e-4, identical greedy generation.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from images import test_images
from safetensors.torch import load_file, save_file

from llava_convert.check import CheckOptions, check
from llava_convert.convert import convert
from llava_convert.reference import ReferenceModel

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

CASES = ["v15", "llama2", "v15_stray", "v16_mistral", "v16_vicuna", "v16_34b", "v16_anyres_336"]
ATOL = 1e-4


def _checkpoint(case_dir):
    (ckpt,) = [p for p in case_dir.iterdir() if p.is_dir() and p.name.startswith("llava")]
    return ckpt


def _close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = float((got.float() - want.float()).abs().max())
    assert diff <= ATOL, f"{what}: max diff {diff}"
    return diff


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_authors(oracle_case, case):
    case_dir = oracle_case(case)
    ref_out = torch.load(case_dir / "reference.pt", weights_only=True)
    ref = ReferenceModel(_checkpoint(case_dir))
    assert ref.conv_mode == ref_out["conv_mode"]
    prompt = ref.prompt(ref_out["question"])
    assert prompt == ref_out["prompt"]
    ids = ref.input_ids(prompt)
    images = test_images(ref_out["image_names"])
    worst = 0.0
    for name in ref_out["image_names"]:
        r = ref_out["images"][name]
        assert ids == r["input_ids"].tolist(), f"{name}: tokenizer_image_token ids differ"
        stages = ref.encode(images[name])
        assert torch.equal(stages.pixel_values, r["pixel_values"]), f"{name}: pixel_values differ"
        _close(stages.vision_features, r["vision_features"], f"{name} vision_features")
        _close(stages.image_features, r["image_features"], f"{name} image_features")
        _close(stages.merged, r["merged_image_features"], f"{name} merged_image_features")
        embeds = ref.embed(ids, stages.merged)
        _close(embeds, r["inputs_embeds"], f"{name} inputs_embeds")
        fw = ref.forward(embeds)
        # transformers 4.36's hidden_states: embeddings, layers 0..L-2, then the final norm's output.
        _close(
            torch.stack([fw.inputs_embeds, *fw.layers[:-1], fw.norm]),
            r["hidden_states"],
            f"{name} hidden_states",
        )
        worst = max(worst, _close(fw.logits, r["logits"], f"{name} logits"))
        assert ref.generate(embeds, ref_out["max_new_tokens"]) == r["generated"].tolist(), (
            f"{name}: generation"
        )
    print(f"{case}: reference vs authors, logits max abs diff {worst:.2e}")


@pytest.mark.parametrize("case", CASES)
def test_good_conversion_passes(oracle_case, tmp_path, case):
    case_dir = oracle_case(case)
    out = tmp_path / "hf"
    convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    images = test_images(torch.load(case_dir / "reference.pt", weights_only=True)["image_names"])
    report = check(_checkpoint(case_dir), out, CheckOptions(images=list(images.values())))
    assert report.passed, report.summary()
    f = report.figures()
    assert f["logits_max_abs_diff"] <= ATOL and f["generation_match"] and f["prompt_ids_match"]
    assert f["pixel_values_max_diff"] == 0.0
    print(f"{case}: {f}")


@pytest.mark.parametrize("case", ["v15", "v16_mistral"])
def test_low_memory_matches_in_memory(oracle_case, tmp_path, case):
    case_dir = oracle_case(case)
    out = tmp_path / "hf"
    convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    image = test_images()["landscape"]
    full = check(_checkpoint(case_dir), out, CheckOptions(images=[image]))
    low = check(_checkpoint(case_dir), out, CheckOptions(images=[image], low_memory=True))
    assert full.passed and low.passed
    assert low.figures() == full.figures()
    assert [(s.stage, s.max_abs, s.nmse) for s in low.images[0].stages] == [
        (s.stage, s.max_abs, s.nmse) for s in full.images[0].stages
    ]


def _replace_tower(hf_dir, tower_state):
    path = hf_dir / "model.safetensors"
    sd = load_file(str(path))
    for k, v in tower_state.items():
        sd["vision_tower." + k] = v.to(sd["vision_tower." + k].dtype)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_stock_clip_in_v16_is_detected(oracle_case, tmp_path):
    case_dir = oracle_case("v16_mistral")
    out = tmp_path / "hf"
    convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    stock = load_file(str(case_dir / "clip" / "model.safetensors"))
    _replace_tower(bad, {k: v for k, v in stock.items() if k.startswith("vision_model.")})
    report = check(_checkpoint(case_dir), bad, CheckOptions(max_new_tokens=2))
    assert not report.passed
    assert report.first_divergence == (
        "vision tower (features)",
        "stock CLIP instead of the checkpoint's fine-tuned tower?",
    )


def test_stray_tower_weights_are_detected(oracle_case, tmp_path):
    """v15_stray: the checkpoint's unused (perturbed) tower weights in place of clip/'s."""
    case_dir = oracle_case("v15_stray")
    ckpt = _checkpoint(case_dir)
    out = tmp_path / "hf"
    convert(ckpt, out, dtype="float32", progress=False)
    ref = ReferenceModel(ckpt)
    stray = {k: r.load().float() for k, r in ref.stray_tower_refs().items()}
    _replace_tower(out, stray)
    report = check(ckpt, out, CheckOptions(max_new_tokens=2))
    assert report.first_divergence == (
        "vision tower (features)",
        "the checkpoint's unused vision_tower.* weights instead of the tower directory's?",
    )


FORM_CASES = {
    "lora": ("llava-v1.5-tiny-lora", "vicuna-tiny-v1.5"),
    "projector": ("llava-v1.5-mlp2x-tiny-pretrain", "vicuna-tiny-v1.5"),
    "delta": ("LLaVA-tiny-delta-v0", "llama-tiny"),
    "selftrained": ("llava-v1.5-tiny-imstart/checkpoint-3", None),
}


@pytest.mark.parametrize("case", list(FORM_CASES))
def test_check_covers_forms_needing_a_base(oracle_case, tmp_path, case):
    """The reference side merges LoRA / adds projectors / applies deltas as the authors' loader does."""
    case_dir = oracle_case(case)
    src, base = FORM_CASES[case]
    out = tmp_path / "hf"
    base = case_dir / base if base else None
    convert(case_dir / src, out, base=base, dtype="float32", progress=False)
    report = check(case_dir / src, out, CheckOptions(base=base, max_new_tokens=4))
    assert report.passed, report.summary()
    assert report.figures()["logits_max_abs_diff"] <= 1e-4

"""The liuhaotian releases as they ship (tests/releases.py: configs, file names and the HF cache layout verbatim,
sizes shrunk): each converts from an offline Hugging Face cache with no --vision-tower and passes `check`;
the chat template follows what identifies the model (repo id, cache snapshot path, config), not a folder name."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import releases
import torch
from click.testing import CliRunner
from releases import (
    CLIP_224,
    CLIP_336,
    LIGHTNING,
    V15,
    V15_LORA,
    V15_PROJECTOR,
    V16_34B,
    V16_MISTRAL,
    V16_VICUNA,
    VICUNA,
    snapshot_dir,
)
from safetensors import safe_open

from llava_convert.check import CheckOptions, check
from llava_convert.cli import main
from llava_convert.convert import convert, plan_conversion

pytestmark = pytest.mark.slow


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    return releases.build_hub_cache(tmp_path_factory.mktemp("releases"))


@pytest.fixture(autouse=True)
def offline_cache(hub_cache, monkeypatch):
    """HF_HUB_CACHE -> the tiny releases; HF_HUB_OFFLINE is set for the whole suite (conftest.py)."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


RELEASE_CASES = [
    # (repo id, --base, chat template, target class)
    (V15, None, "llava_v1", "LlavaForConditionalGeneration"),
    (V15_LORA, VICUNA, "llava_v1", "LlavaForConditionalGeneration"),
    (V15_PROJECTOR, VICUNA, "llava_v1", "LlavaForConditionalGeneration"),
    (V16_VICUNA, None, "llava_v1", "LlavaNextForConditionalGeneration"),
    (V16_MISTRAL, None, "mistral_instruct", "LlavaNextForConditionalGeneration"),
    (V16_34B, None, "chatml_direct", "LlavaNextForConditionalGeneration"),
    (LIGHTNING, None, "llava_llama_2", "LlavaForConditionalGeneration"),
]


@pytest.mark.parametrize(("repo", "base", "template", "target"), RELEASE_CASES, ids=[c[0] for c in RELEASE_CASES])
def test_release_converts_from_the_cache_and_passes_check(hub_cache, tmp_path, repo, base, template, target):
    out = tmp_path / "hf"
    plan = convert(repo, out, base=base, dtype="float32", progress=False)
    assert plan.config["architectures"] == [target]
    assert plan.chat_template == template
    assert f"from the Hub repo id {repo}" in plan.chat_template_reason
    assert plan.warnings == []
    cfg = json.loads((snapshot_dir(hub_cache, repo) / "config.json").read_text())
    # Without --vision-tower: the tower the config names, found in the cache by its Hub id.
    assert plan.tower.path == snapshot_dir(hub_cache, cfg["mm_vision_tower"])
    if not cfg.get("unfreeze_mm_vision_tower"):
        # The released CLIPModel .bin: its buffers and text half are dropped, its vision weights converted.
        dropped = {k for k, _ in plan.dropped}
        assert {"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids", "logit_scale"} <= dropped
    report = check(snapshot_dir(hub_cache, repo), out, CheckOptions(base=base, max_new_tokens=4))
    assert report.passed, report.summary()
    (im,) = report.images
    assert im.pixel_max_diff == 0.0 and im.logits_max_abs <= 1e-4 and im.generation_match
    print(f"\n{repo}: {im.name} {im.size}, logits max diff {im.logits_max_abs:.3g}, pixels {im.pixel_max_diff}")


def test_lightning_keeps_its_224_tower_and_drops_inv_freq(hub_cache, tmp_path):
    plan = plan_conversion(LIGHTNING)
    assert plan.tower.path == snapshot_dir(hub_cache, CLIP_224)
    assert plan.config["vision_config"]["image_size"] == 224
    assert plan.config["projector_hidden_act"] == "linear"
    assert any(k.endswith("rotary_emb.inv_freq") for k, _ in plan.dropped)


def test_v16_pinpoints_are_written_as_transformers_reads_them(tmp_path):
    out = tmp_path / "hf"
    convert(V16_VICUNA, out, progress=False)
    want = [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]  # (height, width), the authors' order
    assert json.loads((out / "config.json").read_text())["image_grid_pinpoints"] == want
    pre = out / "preprocessor_config.json"
    saved = json.loads(pre.read_text()) if pre.is_file() else json.loads((out / "processor_config.json").read_text())[
        "image_processor"]
    assert saved["image_grid_pinpoints"] == want


def test_inspect_reads_the_released_tower(hub_cache):
    r = run("inspect", V15)
    assert r.exit_code == 0, r.output
    assert f"vision tower: {snapshot_dir(hub_cache, CLIP_336)}" in r.output
    assert "chat template llava_v1: from the Hub repo id liuhaotian/llava-v1.5-7b" in r.output
    r = run("inspect", V15_LORA)
    assert r.exit_code == 0, r.output
    assert "pass --base lmsys/vicuna-7b-v1.5 (the base LLM the authors' MODEL_ZOO pairs with it)" in r.output
    assert "./checkpoints" not in r.output


# --- chat template: from what identifies the model ------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "template"),
    [(V15, "llava_v1"), (LIGHTNING, "llava_llama_2"), (V16_34B, "chatml_direct")],
)
def test_template_from_a_cache_snapshot_path(hub_cache, repo, template):
    """The snapshot folder is named by a commit id; the repo id is in the cache layout around it."""
    plan = plan_conversion(snapshot_dir(hub_cache, repo))
    assert plan.chat_template == template
    assert plan.chat_template_reason.startswith(f"from the Hub repo id {repo} (")
    assert plan.warnings == []


def _renamed(hub_cache, tmp_path, repo, name="my-model"):
    dst = tmp_path / name
    shutil.copytree(snapshot_dir(hub_cache, repo), dst)  # follows the blob symlinks
    return dst


@pytest.mark.parametrize(
    ("repo", "template", "why"),
    [
        (V15, "llava_v1", "config.json mm_projector_type 'mlp2x_gelu' on a Llama backbone"),
        (V16_MISTRAL, "mistral_instruct", "config.json model_type 'llava_mistral'"),
        (V16_34B, "chatml_direct", "the tokenizer has the ChatML tokens"),
    ],
)
def test_template_of_a_renamed_directory_from_its_config(hub_cache, tmp_path, repo, template, why):
    plan = plan_conversion(_renamed(hub_cache, tmp_path, repo))
    assert plan.chat_template == template
    assert plan.chat_template_reason.startswith(why)
    assert plan.warnings == []


def test_renamed_directory_the_config_cannot_place_says_so(hub_cache, tmp_path):
    """A Llama-2 lightning model renamed: only the name told llava_llama_2 apart; the choice is said out loud."""
    src = _renamed(hub_cache, tmp_path, LIGHTNING)
    r = run("convert", src, tmp_path / "out", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "chat template llava_v0: from the folder name 'my-model' (no marker in it, the authors' default" in r.output
    assert ("Warning: chat template 'llava_v0' chosen from the folder name 'my-model'" in r.output
            and "pass --chat-template" in r.output)
    r = run("convert", src, tmp_path / "out", "--dry-run", "--chat-template", "llava_llama_2")
    assert r.exit_code == 0 and "Warning" not in r.output
    assert "chat template llava_llama_2: given with --chat-template" in r.output
    # Under its release name the folder identifies the release: no warning.
    plan = plan_conversion(_renamed(hub_cache, tmp_path, LIGHTNING, "llava-llama-2-13b-chat-lightning-preview"))
    assert plan.chat_template == "llava_llama_2" and plan.warnings == []


# --- towers in every layout transformers loads -------------------------------------------------------------


def _released_tower_vision(hub_cache) -> dict[str, torch.Tensor]:
    sd = torch.load(snapshot_dir(hub_cache, CLIP_336) / "pytorch_model.bin", weights_only=True)
    return {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.") and "position_ids" not in k}


def test_tower_saved_by_transformers_5_converts_and_checks(hub_cache, tmp_path):
    """CLIPVisionModel.save_pretrained in transformers 5: safetensors, keys without `vision_model.`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((snapshot_dir(hub_cache, CLIP_336) / "config.json").read_text())["vision_config_dict"]
    model = CLIPVisionModel(CLIPVisionConfig(**cfg))
    assert model.load_state_dict(_released_tower_vision(hub_cache), strict=False).missing_keys == []
    tower = tmp_path / "clip-v5"
    model.save_pretrained(tower)
    shutil.copy(snapshot_dir(hub_cache, CLIP_336) / "preprocessor_config.json", tower)
    with safe_open(str(tower / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embeddings.patch_embedding.weight" in keys and not any(k.startswith("vision_model.") for k in keys)

    out = tmp_path / "hf"
    plan = convert(V15, out, vision_tower=tower, dtype="float32", progress=False)
    assert plan.tower.path == tower
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = f.get_tensor("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")
    assert torch.equal(got, model.state_dict()["encoder.layers.0.self_attn.q_proj.weight"])
    r = run("inspect", V15, "--vision-tower", tower)
    assert r.exit_code == 0, r.output
    report = check(snapshot_dir(hub_cache, V15), out, CheckOptions(vision_tower=tower, max_new_tokens=2))
    assert report.passed, report.summary()


def test_check_reads_the_same_towers_as_convert(hub_cache, tmp_path):
    """A tower convert refuses is refused by check too, with the same mapping problem."""
    tower = tmp_path / "clip-bad"
    shutil.copytree(snapshot_dir(hub_cache, CLIP_336), tower)
    sd = torch.load(tower / "pytorch_model.bin", weights_only=True)
    sd["adapter.weight"] = torch.zeros(2)
    (tower / "pytorch_model.bin").unlink()
    torch.save(sd, tower / "pytorch_model.bin")
    out = tmp_path / "hf"
    convert(V15, out, dtype="float32", progress=False)
    for args in (("convert", V15, tmp_path / "o", "--vision-tower", tower), ("check", V15, out, "--vision-tower", tower)):
        r = run(*args)
        assert r.exit_code == 2, r.output
        assert "adapter.weight: no rule in mappings/clip.toml matches this key" in r.output, r.output

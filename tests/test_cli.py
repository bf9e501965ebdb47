"""The command line: exit codes, one-line messages naming the file or key at fault, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import llm_state, write_original
from click.testing import CliRunner
from safetensors import safe_open

from llava_convert.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("convert", "inspect"):
        assert cmd in r.output


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_convert_writes_loadable_checkpoint(tmp_path, fmt):
    ckpt = write_original(tmp_path, fmt=fmt, shards=3)
    out = tmp_path / "out"
    r = run("convert", ckpt, out, "--max-shard-size", "200KB", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"Wrote {out}" in r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    names = set()
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names |= set(f.keys())
    assert names == set(index["weight_map"])
    assert "language_model.model.embed_tokens.weight" in names
    assert "vision_tower.vision_model.post_layernorm.weight" in names
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    model, info = model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    proc = AutoProcessor.from_pretrained(str(out))
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == 400
    assert proc.tokenizer.pad_token_id == 401
    assert model.config.text_config.vocab_size == 448  # 402 rounded up to a multiple of 64


def test_passthrough_tensors_are_byte_identical(tmp_path):
    ckpt = write_original(tmp_path, fmt="safetensors", shards=1)
    out = tmp_path / "out"
    assert run("convert", ckpt, out, "--quiet").exit_code == 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            assert torch.equal(src.get_tensor(name), dst.get_tensor("language_model." + name))
        emb = src.get_tensor("model.embed_tokens.weight")
        padded = dst.get_tensor("language_model.model.embed_tokens.weight")
        assert torch.equal(padded[:400], emb)
        assert torch.allclose(padded[400:].float(), emb.float().mean(0).expand(48, -1), atol=1e-3)


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    ckpt = write_original(tmp_path)
    out = tmp_path / "out"
    r = run("convert", ckpt, out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "model.mm_projector.0.weight -> multi_modal_projector.linear_1.weight" in r.output
    assert "model.embed_tokens.weight -> language_model.model.embed_tokens.weight [pad_vocab] float16 (448, 64)" in r.output
    assert not out.exists()


def test_inspect_json(tmp_path):
    ckpt = write_original(tmp_path)
    r = run("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["target"] == "LlavaForConditionalGeneration"
    assert info["facts"] == {"architecture": "llava", "projector": "mlp2x_gelu", "vision_from": "tower"}
    assert info["chat_template"] == "llava_v1"
    assert info["config"]["text_config"]["num_key_value_heads"] == 2


def test_existing_output_refused_without_force(tmp_path):
    ckpt = write_original(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = run("convert", ckpt, out, "--quiet")
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: Cannot write to {out}: it already exists. Pass --force to replace it."
    assert (out / "keep").exists()
    r = run("convert", ckpt, out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert not (out / "keep").exists() and (out / "config.json").exists()


def _error(tmp_path, ckpt, *extra):
    out = tmp_path / "out"
    r = run("convert", ckpt, out, "--quiet", *extra)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    _no_output(tmp_path, out)
    return lines[0]


def test_missing_shard(tmp_path):
    ckpt = write_original(tmp_path, shards=2)
    (ckpt / "pytorch_model-00002-of-00002.bin").unlink()
    msg = _error(tmp_path, ckpt)
    assert "pytorch_model.bin.index.json" in msg and "pytorch_model-00002-of-00002.bin is listed but missing" in msg


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard(tmp_path, fmt):
    ckpt = write_original(tmp_path, shards=2, fmt=fmt)
    stem = "pytorch_model" if fmt == "bin" else "model"
    shard = ckpt / f"{stem}-00001-of-00002.{fmt}"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _error(tmp_path, ckpt)
    assert shard.name in msg and ("truncated" in msg or "corrupt" in msg)


def test_index_shard_outside_directory(tmp_path):
    ckpt = write_original(tmp_path, shards=2)
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../evil.bin"
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    msg = _error(tmp_path, ckpt)
    assert "'../evil.bin' must be a file name inside" in msg


def test_pickle_with_arbitrary_object_refused(tmp_path):
    ckpt = write_original(tmp_path, shards=1)
    sd = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    sd["args"] = shutil  # a module: torch pickles it as a global reference
    import pickle

    try:
        torch.save(sd, ckpt / "pytorch_model.bin")
    except (pickle.PicklingError, TypeError):
        sd["args"] = {"lr": torch.tensor(1.0)}
        torch.save(sd, ckpt / "pytorch_model.bin")
    msg = _error(tmp_path, ckpt)
    assert "pytorch_model.bin" in msg


@pytest.mark.parametrize(
    ("ptype", "needle"),
    [
        ("mlp3x_gelu", "has 3 linear layers"),
        ("identity", "'identity' feeds vision features straight"),
        ("resampler", "unknown mm_projector_type 'resampler'"),
    ],
)
def test_unsupported_projector(tmp_path, ptype, needle):
    ckpt = write_original(tmp_path, mm_projector_type=ptype)
    msg = _error(tmp_path, ckpt)
    assert "config.json" in msg and needle in msg


def test_no_vision_tower(tmp_path):
    ckpt = write_original(tmp_path, mm_vision_tower="openai/clip-vit-large-patch14-336")
    msg = _error(tmp_path, ckpt)
    assert "vision tower 'openai/clip-vit-large-patch14-336' is not a local directory; pass --vision-tower" in msg


def test_already_hf_format(tmp_path):
    ckpt = write_original(tmp_path)
    out = tmp_path / "hf"
    assert run("convert", ckpt, out, "--quiet").exit_code == 0
    r = run("convert", out, tmp_path / "again", "--quiet")
    assert r.exit_code == 2
    assert "already a Hugging Face checkpoint" in r.output and "llava-convert quantize" in r.output


def test_weights_disagree_with_config(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = llm_state(gen)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64, dtype=torch.float16)
    ckpt = write_original(tmp_path, state=sd)
    msg = _error(tmp_path, ckpt)
    assert "language_model.model.layers.1.mlp.up_proj.weight" in msg
    assert "(96, 64)" in msg and "(128, 64)" in msg


def test_vocab_size_disagrees_with_embeddings(tmp_path):
    ckpt = write_original(tmp_path, vocab_size=512)
    msg = _error(tmp_path, ckpt)
    assert "vocab_size 512 disagrees with model.embed_tokens.weight" in msg


def test_unknown_key_is_reported_with_table(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = llm_state(gen)
    sd["model.mm_resampler.weight"] = torch.zeros(2, dtype=torch.float16)
    ckpt = write_original(tmp_path, state=sd)
    msg = _error(tmp_path, ckpt)
    assert "model.mm_resampler.weight: no rule in mappings/llava.toml matches this key" in msg


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    from llava_convert import convert as conv

    ckpt = write_original(tmp_path)
    out = tmp_path / "out"
    calls = {"n": 0}
    real = conv.compute_entry

    def failing(e, ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(e, ctx)

    monkeypatch.setattr(conv, "compute_entry", failing)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(ckpt, out, progress=False)
    _no_output(tmp_path, out)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type 'flat' is not supported"),
        ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type 'spatial' is not supported"),
        ({"image_grid_pinpoints": [[28, 56], [30, 60]]}, "image_grid_pinpoints [[30, 60]] are not multiples"),
    ],
)
def test_next_combinations_hf_cannot_express(tmp_path, overrides, needle):
    cfg = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[28, 56], [56, 28]]}
    cfg.update(overrides)
    ckpt = write_original(tmp_path, name="llava-v1.6-vicuna-tiny", **cfg)
    msg = _error(tmp_path, ckpt)
    assert needle in msg


def test_readme_example_converts(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "llava-tiny-hf"
    r = run("convert", repo / "examples" / "llava-v1.5-tiny", out, "--vision-tower", repo / "examples" / "clip-tiny", "--quiet")
    assert r.exit_code == 0, r.output
    assert "LlavaForConditionalGeneration" in r.output and "chat template llava_v1" in r.output


@pytest.mark.parametrize(("given", "expected"), [({"sliding_window": None}, None), ({}, 4096), ({"sliding_window": 2048}, 2048)])
def test_mistral_sliding_window_as_trained(tmp_path, given, expected):
    ckpt = write_original(tmp_path, name="llava-v1.6-mistral-tiny", model_type="llava_mistral",
                          architectures=["LlavaMistralForCausalLM"], rope_theta=1e6, **given)
    r = run("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.output
    text = json.loads(r.output)["config"]["text_config"]
    assert text["model_type"] == "mistral" and text["sliding_window"] == expected
    assert text["rope_theta"] == 1e6


def test_unknown_chat_template_refused_by_the_dry_run_too(tmp_path):
    """--dry-run validates what the real run does: an unknown --chat-template is exit 2 in both."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        r = run("convert", repo / "examples" / "llava-v1.5-tiny", out, "--vision-tower", repo / "examples" / "clip-tiny",
                "--quiet", "--chat-template", "bogus", *extra)
        assert r.exit_code == 2, r.output
        assert "unknown chat template 'bogus'" in r.output
        assert not out.exists()

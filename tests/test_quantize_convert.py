"""Quantized output: loads in transformers with exactly the chosen modules quantized, bytes equal
bitsandbytes' own, quality within thresholds that a wrong quantization fails, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from builders import write_original
from click.testing import CliRunner
from images import test_images
from safetensors import safe_open

import llava_convert.plan as plan_mod
from llava_convert.cli import main
from llava_convert.convert import convert
from llava_convert.quantize import QuantSpec

# Thresholds against the unquantized conversion (float32 logits, tiny seeded model); measured values are
# about 0.003 / 0.29 / 0.48 KL and a transposed-weight bug gives about 2.4 (bench/quant_quality.py).
QUALITY = {"int8": (0.02, 0.85), "nf4": (0.7, 0.3), "fp4": (1.0, 0.2)}
Q_MODULE = "model.language_model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import builders

    root = tmp_path_factory.mktemp("q")
    old = builders.V_HIDDEN, builders.V_INTER
    builders.V_HIDDEN, builders.V_INTER = 64, 128  # bnb's CPU 4-bit matmul wants in_features % 64 == 0
    try:
        ckpt = write_original(root)
    finally:
        builders.V_HIDDEN, builders.V_INTER = old
    convert(ckpt, root / "fp16", progress=False)
    return root, ckpt


def _run_logits(model_dir, quantized):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), **({} if quantized else {"dtype": torch.float32}))
    proc = AutoProcessor.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture in detail."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    out = []
    for img in test_images().values():
        inputs = proc(images=img, text=prompt, return_tensors="pt")
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            out.append(model(**inputs).logits[0, :, :400].float())
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return model, torch.cat(out), gen


def _figures(ref, got):
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item(), (ref.argmax(-1) == got.argmax(-1)).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("qt", ["int8", "nf4", "fp4"])
def test_round_trip_load_generate_and_quality(tiny, tmp_path, qt):
    root, ckpt = tiny
    out = tmp_path / qt
    convert(ckpt, out, progress=False, quantize=QuantSpec(qt))
    model, got, gen = _run_logits(out, quantized=True)
    _, ref, _ = _run_logits(root / "fp16", quantized=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    expected = "Linear8bitLt" if qt == "int8" else "Linear4bit"
    assert kinds[Q_MODULE] == expected and kinds["model.language_model.layers.1.mlp.down_proj"] == expected
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.multi_modal_projector.linear_1"] == "Linear"
    assert kinds["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "Linear"
    assert gen.shape[1] > 0
    kl, top1 = _figures(ref, got)
    max_kl, min_top1 = QUALITY[qt]
    assert kl < max_kl and top1 > min_top1, (kl, top1)


@pytest.mark.slow
def test_transposed_quantization_fails_quality(tiny, tmp_path, monkeypatch):
    root, ckpt = tiny
    real = plan_mod.quantize_tensor
    monkeypatch.setattr(plan_mod, "quantize_tensor", lambda n, w, s: real(n, w.t().contiguous().reshape(w.shape), s))
    convert(ckpt, tmp_path / "bad", progress=False, quantize=QuantSpec("nf4"))
    _, got, _ = _run_logits(tmp_path / "bad", quantized=True)
    _, ref, _ = _run_logits(root / "fp16", quantized=False)
    kl, top1 = _figures(ref, got)
    assert kl > QUALITY["nf4"][0]


@pytest.mark.slow
@pytest.mark.parametrize("qt,dtype", [("nf4", "float16"), ("int8", "float16"), ("nf4", "bfloat16"), ("int8", "bfloat16")])
def test_check_runs_half_precision_quantized(tiny, tmp_path, qt, dtype):
    """`check` loads a float16 / bfloat16 quantized conversion in its stored dtype and judges its figures."""
    _, ckpt = tiny
    out = tmp_path / qt
    convert(ckpt, out, progress=False, dtype=dtype, quantize=QuantSpec(qt))
    r = CliRunner().invoke(main, ["check", str(ckpt), str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code in (0, 1), r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["quantization"] == qt
    assert [im["error"] for im in report["images"]] == [None]
    fig = report["figures"]
    assert fig["kl"] is not None and fig["top1_agreement"] is not None and fig["logits_nmse"] is not None
    assert f"converted model runs in {dtype}" in " ".join(report["notes"])
    assert (r.exit_code == 0) == (report["verdict"] == "pass")


@pytest.mark.parametrize("qt", ["nf4", "fp4", "int8"])
def test_bytes_equal_bitsandbytes(tiny, tmp_path, qt):
    import bitsandbytes.functional as F

    root, ckpt = tiny
    out = tmp_path / qt
    convert(ckpt, out, progress=False, quantize=QuantSpec(qt, double_quant=True))
    with safe_open(str(root / "fp16" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("language_model.model.layers.1.mlp.up_proj.weight")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys() if k.startswith("language_model.model.layers.1.mlp.up_proj.")}
    p = "language_model.model.layers.1.mlp.up_proj."
    if qt == "int8":
        q, scb, _ = F.int8_vectorwise_quant(w.half())
        assert torch.equal(got[p + "weight"], q) and torch.equal(got[p + "SCB"], scb)
        return
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt)
    assert torch.equal(got[p + "weight"], packed)
    for k, v in state.as_dict(packed=True).items():
        assert torch.equal(got[p + "weight." + k], v), k


def test_skip_modules_empty_quantizes_everything(tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration

    root, ckpt = tiny
    out = tmp_path / "all"
    convert(ckpt, out, progress=False, quantize=QuantSpec("nf4", skip_modules=()))
    model, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear4bit"
    assert kinds["model.vision_tower.encoder.layers.0.mlp.fc1"] == "Linear4bit"
    assert kinds["model.language_model.embed_tokens"] == "Embedding"  # embeddings are never Linear


def test_quantize_command_matches_convert(tiny, tmp_path):
    root, ckpt = tiny
    r = CliRunner().invoke(main, ["quantize", str(root / "fp16"), str(tmp_path / "q"), "--quantize", "nf4", "--quiet"])
    assert r.exit_code == 0, r.output
    convert(ckpt, tmp_path / "c", progress=False, quantize=QuantSpec("nf4"))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "chat_template.jinja").is_file()
    # Quantizing it again is refused.
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "q"), str(tmp_path / "qq"), "--quantize", "int8"])
    assert r.exit_code == 2 and "already quantized (bitsandbytes, 4-bit)" in r.output
    assert not (tmp_path / "qq").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--quantize", "nf4", "--blocksize", "48"], "--blocksize 48: bitsandbytes supports"),
        (["--quantize", "q3"], "Invalid value for '--quantize'"),
    ]
    + ([] if torch.cuda.is_available() else [(["--quantize", "nf4", "--device", "cuda"], "--device cuda: no CUDA device")]),
)
def test_bad_quant_options(tiny, tmp_path, args, needle):
    root, ckpt = tiny
    r = CliRunner().invoke(main, ["convert", str(ckpt), str(tmp_path / "o"), "--quiet", *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_dry_run_shows_quantized_tensors(tiny, tmp_path):
    root, ckpt = tiny
    r = CliRunner().invoke(main, ["convert", str(ckpt), str(tmp_path / "o"), "--dry-run", "--json", "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    q = {t["target"]: t["quantize"] for t in plan["tensors"]}
    assert q["language_model.model.layers.0.mlp.up_proj.weight"] == "int8"
    assert q["language_model.lm_head.weight"] is None
    assert q["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny, tmp_path):
    root, ckpt = tiny
    convert(ckpt, tmp_path / "cpu", progress=False, quantize=QuantSpec("nf4"))
    convert(ckpt, tmp_path / "gpu", progress=False, quantize=QuantSpec("nf4", device="cuda"))
    with safe_open(str(tmp_path / "cpu" / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "gpu" / "model.safetensors"), "pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_cli_default_skip_list_is_the_policy_default():
    from llava_convert import cli, quantize

    assert cli.DEFAULT_SKIP == quantize.DEFAULT_SKIP

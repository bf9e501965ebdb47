"""Every form original checkpoints come in (issue #4): detection, merging, tokens, inspect, errors, Hub ids."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import (
    HIDDEN,
    V_LAYERS,
    VOCAB,
    cache_repo,
    llm_state,
    lora_factors,
    write_base,
    write_delta,
    write_lora,
    write_onevision,
    write_original,
    write_projector,
)
from click.testing import CliRunner
from memwatch import convert_growth
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llava_convert import card, hub
from llava_convert.cli import main
from llava_convert.convert import convert, plan_conversion
from llava_convert.errors import LlavaConvertError
from llava_convert.original import open_original
from llava_convert.original.merge import authors_non_lora_keys
from llava_convert.plan import Composite
from llava_convert.readers import read_safetensors

LORA_HINT = (
    "LoRA adapter: pass --base lmsys/vicuna-7b-v1.5 (the base LLM the authors' MODEL_ZOO pairs with it)"
)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(tmp_path, source, *extra) -> str:
    """convert must exit 2 with one line naming the problem and write nothing."""
    out = tmp_path / "out"
    r = run("convert", source, out, "--quiet", *extra)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    return lines[0]


def _tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _base_state(base) -> dict[str, torch.Tensor]:
    return load_file(str(base / "model.safetensors"))


# --- detection ----------------------------------------------------------------------------------


def _form(path, **kw) -> str:
    return open_original(path, require_base=False, **kw).form


def test_detect_form(tmp_path):
    full = write_original(tmp_path)
    lora = write_lora(tmp_path)
    proj = write_projector(tmp_path)
    base = write_base(tmp_path)
    delta = write_delta(tmp_path, _base_state(base), name="LLaVA-tiny-delta-v0")
    assert _form(full) == "full"
    assert _form(lora) == "lora"
    assert _form(proj) == "projector"
    assert _form(delta) == "delta"  # by its name
    assert _form(delta, delta=False) == "full"  # --no-delta
    assert _form(full, delta=True) == "delta"  # --delta
    # "delta" must be a word of the name, not any substring
    for name, form in (("llava-v1.5-deltanet", "full"), ("llava_delta", "delta")):
        shutil.copytree(full, tmp_path / name)
        assert _form(tmp_path / name) == form
    with pytest.raises(LlavaConvertError, match="--delta: .* is a LoRA adapter"):
        _form(lora, delta=True)
    hf = tmp_path / "hf"
    convert(full, hf, progress=False)
    with pytest.raises(LlavaConvertError, match="already a Hugging Face checkpoint"):
        _form(hf)
    with pytest.raises(LlavaConvertError, match="--delta: .* is a Hugging Face checkpoint"):
        _form(hf, delta=True)


def test_authors_model_name_for_trainer_checkpoints(tmp_path):
    ckpt = write_original(tmp_path, "llava-v1.5-tiny-run/checkpoint-5", shards=1)
    # What a HF Trainer checkpoint folder holds besides the model.
    (ckpt / "trainer_state.json").write_text("{}")
    torch.save({"lr": 1.0}, ckpt / "training_args.bin")
    torch.save({"x": torch.zeros(2)}, ckpt / "optimizer.pt")
    torch.save({"python": 0}, ckpt / "rng_state.pth")
    assert open_original(ckpt).name == "llava-v1.5-tiny-run_checkpoint-5"
    plan = plan_conversion(ckpt)
    assert plan.source.form == "full" and plan.source.name == "llava-v1.5-tiny-run_checkpoint-5"
    assert plan.chat_template == "llava_v1"
    assert [p.name for p in plan.source.weights] == ["pytorch_model.bin"]


def test_open_original_names_every_file_and_provenance_and_card_list_them(tmp_path):
    base = write_base(tmp_path)
    lora = write_lora(tmp_path)
    alone = open_original(lora, require_base=False)
    assert (alone.base, alone.base_weights, alone.tokenizer_dir) == (None, (), lora)
    ckpt = open_original(lora, base=base)
    assert ckpt.form == "lora" and ckpt.weights == () and ckpt.projector is None
    assert ckpt.adapter == lora / "adapter_model.safetensors"
    assert ckpt.non_lora_trainables == lora / "non_lora_trainables.bin"
    assert ckpt.adapter_config["r"] == 4
    assert ckpt.base == base and ckpt.tokenizer_dir == base  # the authors' builder takes the base's tokenizer
    assert [p.name for p in ckpt.base_weights] == ["model.safetensors"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.base = None
    roles = {(f.role, f.path) for f in ckpt.input_files()}
    assert {("weights", ckpt.adapter), ("weights", ckpt.non_lora_trainables), ("config", lora / "config.json"),
            ("weights", base / "model.safetensors"), ("tokenizer", base / "tokenizer.model")} <= roles
    assert not {p for r_, p in roles if r_ == "tokenizer" and p.parent == lora}
    proj = open_original(write_projector(tmp_path), base=base)
    assert proj.projector.name == "mm_projector.bin" and proj.own_files == (proj.projector,)

    out = tmp_path / "hf"
    r = run("convert", lora, out, "--base", base, "--quiet")
    assert r.exit_code == 0, r.output
    prov = json.loads((out / "provenance.json").read_text())
    weights = {Path(f["path"]) for f in prov["files"] if f["role"] == "weights"}
    assert {ckpt.adapter, ckpt.non_lora_trainables, *ckpt.base_weights} <= weights
    facts = card.read_facts(out / "README.md")
    assert {"adapter_model.safetensors", "non_lora_trainables.bin"} <= {f["name"] for f in facts["source"]["files"]}
    assert "model.safetensors" in {f["name"] for f in facts["base"]["files"]}


# --- LoRA -------------------------------------------------------------------------------------


def _merged(base_sd, factors, module, scale, *, fifo=False):
    w = base_sd[f"{module}.weight"].float()
    a = factors[f"base_model.model.{module}.lora_A.weight"].float()
    b = factors[f"base_model.model.{module}.lora_B.weight"].float()
    delta = b @ a
    return w + (delta.t() if fifo else delta) * scale


@pytest.mark.parametrize("adapter_format", ["safetensors", "bin"])
def test_lora_merged_tensor_by_tensor(tmp_path, adapter_format):
    base = write_base(tmp_path)
    factors = lora_factors(torch.Generator().manual_seed(3), r=4)
    lora = write_lora(tmp_path, r=4, alpha=8, factors=factors, adapter_format=adapter_format)
    out = tmp_path / "hf"
    r = run("convert", lora, out, "--base", base, "--dtype", "float32", "--quiet")
    assert r.exit_code == 0, r.output
    got = _tensors(out)
    base_sd = _base_state(base)
    for i in range(2):
        for module in (f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"):
            torch.testing.assert_close(got["language_model." + module + ".weight"], _merged(base_sd, factors, module, 2.0),
                                       rtol=0, atol=1e-6)
    # untouched base tensors, the projector from non_lora_trainables.bin
    assert torch.equal(got["language_model.model.norm.weight"], base_sd["model.norm.weight"].float())
    non_lora = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    assert torch.equal(got["multi_modal_projector.linear_1.weight"],
                       non_lora["base_model.model.model.mm_projector.0.weight"].float())
    # tokenizer and generation config come from the base, as the authors' builder takes them
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": VOCAB + 1}  # the base's max_length dropped
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(str(out)).tokenizer.convert_tokens_to_ids("<image>") == VOCAB


def test_lora_default_dtype_is_float32_merge_then_cast(tmp_path):
    base = write_base(tmp_path)
    factors = lora_factors(torch.Generator().manual_seed(3), r=4)
    lora = write_lora(tmp_path, r=4, alpha=8, factors=factors)
    out = tmp_path / "hf"
    convert(lora, out, base=base, progress=False)
    got = _tensors(out)["language_model.model.layers.0.mlp.up_proj.weight"]
    want = _merged(_base_state(base), factors, "model.layers.0.mlp.up_proj", 2.0).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize(
    ("overrides", "scales"),
    [
        ({"use_rslora": True}, {"q_proj": 8 / 2.0, "up_proj": 8 / 2.0}),  # lora_alpha / sqrt(r)
        ({"alpha_pattern": {"q_proj": 32}}, {"q_proj": 32 / 4, "up_proj": 8 / 4}),
    ],
)
def test_lora_scaling_rules(tmp_path, overrides, scales):
    base = write_base(tmp_path)
    factors = lora_factors(torch.Generator().manual_seed(3), r=4)
    lora = write_lora(tmp_path, r=4, alpha=8, factors=factors, adapter_overrides=overrides)
    out = tmp_path / "hf"
    convert(lora, out, base=base, dtype="float32", progress=False)
    got = _tensors(out)
    for name, scale in scales.items():
        part = "self_attn" if name == "q_proj" else "mlp"
        module = f"model.layers.1.{part}.{name}"
        torch.testing.assert_close(got[f"language_model.{module}.weight"], _merged(_base_state(base), factors, module, scale),
                                   rtol=0, atol=1e-6)


def test_composite_fan_in_fan_out(tmp_path):
    """fan_in_fan_out (Conv1D-style W stored (in, out)): W + scale * (B @ A)^T, as PEFT merges it."""
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(6, 5, generator=g).half(), torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    save_file({"w": w, "a": a, "b": b}, str(tmp_path / "t.safetensors"))
    refs = read_safetensors(tmp_path / "t.safetensors")
    c = Composite("w", "lora", (refs["w"], refs["a"], refs["b"]), (6, 5), torch.float16, 0.5, True)
    assert not c.contiguous and c.nbytes == 60 and c.path == tmp_path / "t.safetensors"
    torch.testing.assert_close(c.load(), w.float() + (b @ a).t() * 0.5, rtol=0, atol=1e-6)


def test_non_lora_prefixes_as_the_authors_loader():
    assert authors_non_lora_keys({"base_model.model.model.mm_projector.0.weight": 1}) == {"model.mm_projector.0.weight": 1}
    assert authors_non_lora_keys({"base_model.model.mm_projector.0.weight": 1}) == {"model.mm_projector.0.weight": 1}
    # once any key starts with model.model., `model.` is stripped from every key that has it
    assert authors_non_lora_keys(
        {"base_model.model.model.mm_projector.0.weight": 1, "base_model.model.lm_head.weight": 2, "x": 3}
    ) == {"model.mm_projector.0.weight": 1, "lm_head.weight": 2, "x": 3}


def test_lora_plan_streams_composites(tmp_path):
    """Merged weights are computed by the writer, never byte-copied; the rest is still a kernel copy."""
    base = write_base(tmp_path)
    lora = write_lora(tmp_path, targets=("q_proj",))
    plan = plan_conversion(lora, base=base)
    by_target = {e.target: e for e in plan.entries}
    q = by_target["language_model.model.layers.0.self_attn.q_proj.weight"]
    k = by_target["language_model.model.layers.0.self_attn.k_proj.weight"]
    assert isinstance(q.sources[0], Composite) and not q.passthrough
    assert not isinstance(k.sources[0], Composite) and k.passthrough
    assert q.describe()["source"] == ["base+lora:model.layers.0.self_attn.q_proj.weight"]


# --- projector-only, delta -----------------------------------------------------------------------


def test_projector_only_with_base(tmp_path):
    base = write_base(tmp_path)
    proj = write_projector(tmp_path)
    out = tmp_path / "hf"
    r = run("convert", proj, out, "--base", base, "--quiet")
    assert r.exit_code == 0, r.output
    got = _tensors(out)
    stored = torch.load(proj / "mm_projector.bin", weights_only=True)
    assert torch.equal(got["multi_modal_projector.linear_2.bias"], stored["model.mm_projector.2.bias"].half())
    base_sd = _base_state(base)
    assert torch.equal(got["language_model.model.layers.1.mlp.up_proj.weight"], base_sd["model.layers.1.mlp.up_proj.weight"])


def test_delta_adds_base_and_keeps_extra_rows(tmp_path):
    """v0 form: 3 extra rows (<im_patch>, <im_start>, <im_end>, which the authors' loader adds to the
    delta's 400-token tokenizer), linear projector only in the delta."""
    base = write_base(tmp_path)
    base_sd = _base_state(base)
    cfg = {"mm_use_im_start_end": True}
    delta = write_delta(tmp_path, base_sd, name="LLaVA-tiny-delta-v0", extra_rows=3, **cfg)
    cfg_path = delta / "config.json"
    raw = json.loads(cfg_path.read_text())
    del raw["mm_use_im_patch_token"]  # v0 configs lack it: the authors' loader defaults it to true
    cfg_path.write_text(json.dumps(raw))
    out = tmp_path / "hf"
    plan = convert(delta, out, base=base, dtype="float32", progress=False)
    assert plan.source.form == "delta" and plan.chat_template == "llava_v0"
    assert (plan.vocab.image_token_id, plan.vocab.pad_token_id, plan.vocab.padded) == (403, 404, 448)
    got = _tensors(out)
    d = load_file(str(delta / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        g = got["language_model." + key]
        torch.testing.assert_close(g[:VOCAB], d[key][:VOCAB].float() + base_sd[key].float(), rtol=0, atol=0)
        assert torch.equal(g[VOCAB:403], d[key][VOCAB:].float())  # extra rows from the delta as they are
    torch.testing.assert_close(got["language_model.model.norm.weight"],
                               d["model.norm.weight"].float() + base_sd["model.norm.weight"].float(), rtol=0, atol=0)
    assert torch.equal(got["multi_modal_projector.linear_1.weight"], d["model.mm_projector.weight"].float())
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(out))
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>", "<image>", "<pad>"]) == [400, 401, 402, 403, 404]
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}], add_generation_prompt=True
    )
    assert "###Human: <im_start><image><im_end>\nHi?###Assistant:" in prompt


# --- tokens the authors' loader adds -----------------------------------------------------------------


def test_im_patch_token_defaults_to_true_when_absent(tmp_path):
    ckpt = write_original(tmp_path, shards=1)
    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    del raw["mm_use_im_patch_token"]
    cfg_path.write_text(json.dumps(raw))
    out = tmp_path / "hf"
    plan = convert(ckpt, out, dtype="float32", progress=False)
    assert plan.vocab.added == ("<im_patch>",)
    assert (plan.vocab.original, plan.vocab.image_token_id, plan.vocab.pad_token_id) == (VOCAB, 401, 402)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<im_patch>", "<image>", "<pad>"]) == [400, 401, 402]
    emb = _tensors(out)["language_model.model.embed_tokens.weight"]
    assert torch.equal(emb[400], emb[401])  # the load-time row is filled like the padding rows


def test_im_start_end_tokens_trained_rows_and_template(tmp_path):
    """A self-trained save with mm_use_im_start_end: tokenizer saved with the 3 tokens, trained rows kept."""
    gen = torch.Generator().manual_seed(0)
    sd = llm_state(gen, vocab=VOCAB + 3)
    ckpt = write_original(tmp_path, "llava-v1.5-tiny-imstart/checkpoint-2", shards=1, state=sd, vocab_size=VOCAB + 3,
                          mm_use_im_start_end=True, mm_use_im_patch_token=True)
    (ckpt / "added_tokens.json").write_text(json.dumps({"<im_patch>": 400, "<im_start>": 401, "<im_end>": 402}))
    out = tmp_path / "hf"
    plan = convert(ckpt, out, dtype="float32", progress=False)
    assert plan.vocab.added == () and plan.vocab.image_token_id == 403
    emb = _tensors(out)["language_model.model.embed_tokens.weight"]
    assert torch.equal(emb[:403], sd["model.embed_tokens.weight"].float())
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(out))
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}], add_generation_prompt=True
    )
    assert prompt.endswith("USER: <im_start><image><im_end>\nHi? ASSISTANT:")
    ids = proc.tokenizer(prompt)["input_ids"]
    i = ids.index(403)
    assert ids[i - 1] == 401 and ids[i + 1] == 402


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_names_form_and_what_it_needs(tmp_path):
    lora = write_lora(tmp_path)
    r = run("inspect", lora)
    assert r.exit_code == 0, r.output
    assert f"{lora}: original LLaVA checkpoint (LoRA adapter), llama backbone" in r.output
    assert LORA_HINT in r.output
    assert "adapter_model.safetensors, non_lora_trainables.bin" in r.output
    info = json.loads(run("inspect", lora, "--json").output)
    assert info["form"] == "lora" and info["needs"] == "--base" and info["message"] == LORA_HINT

    proj = write_projector(tmp_path)
    r = run("inspect", proj)
    assert "projector-only checkpoint (pretrain stage): pass --base lmsys/vicuna-7b-v1.5 (the base LLM the " \
           "authors' MODEL_ZOO pairs with it)" in r.output
    base = write_base(tmp_path)
    delta = write_delta(tmp_path, _base_state(base), name="llava-tiny-delta-v1")
    r = run("inspect", delta)
    assert "delta weights (target = base + delta): pass --base <the base LLM the delta was made from>" in r.output

    r = run("inspect", lora, "--base", base)
    assert r.exit_code == 0, r.output
    assert "original LLaVA checkpoint (lora)" in r.output and f"base LLM: {base} (LoRA adapter applied to it)" in r.output
    assert "base+lora:model.layers.0.self_attn.q_proj.weight -> language_model.model.layers.0.self_attn.q_proj.weight" in r.output


# --- errors: exit 2, one line naming the file / key, nothing written ------------------------------


@pytest.mark.parametrize("form", ["lora", "projector", "delta"])
def test_missing_base(tmp_path, form):
    if form == "lora":
        src, hint = write_lora(tmp_path), LORA_HINT
    elif form == "projector":
        src = write_projector(tmp_path)
        hint = "projector-only checkpoint (pretrain stage): pass --base lmsys/vicuna-7b-v1.5"
    else:
        src = write_original(tmp_path, "llava-13b-delta-v1-1")
        hint = "delta weights (target = base + delta): pass --base <the base LLM the delta was made from>"
    msg = _error(tmp_path, src)
    assert msg.startswith(f"Error: {src}: {hint}")


def test_lora_without_recorded_base(tmp_path):
    lora = write_lora(tmp_path, base_model_name_or_path=None)
    assert _error(tmp_path, lora) == f"Error: {lora}: LoRA adapter: pass --base <the base LLM it was trained from>"


@pytest.mark.parametrize(
    ("recorded", "hint"),
    [
        ("./checkpoints/vicuna-7b-v1-5", "pass --base lmsys/vicuna-7b-v1.5 (the base LLM the authors' MODEL_ZOO pairs"),
        ("/data/llama-2-13b-chat", "pass --base meta-llama/Llama-2-13b-chat-hf (the base LLM the authors' MODEL_ZOO"),
        ("someorg/some-llm", "pass --base someorg/some-llm (the Hub id its files record)"),
        ("./checkpoints/my-llm", "pass --base <the base LLM it was trained from> (its files record 'my-llm' at a path "
                                 "of the machine it was trained on)"),
    ],
)
def test_base_hint_never_suggests_the_training_machine_s_path(tmp_path, recorded, hint):
    lora = write_lora(tmp_path, base_model_name_or_path=recorded)
    msg = _error(tmp_path, lora)
    assert hint in msg
    assert "./checkpoints" not in msg and "/data/" not in msg


def test_missing_non_lora_trainables(tmp_path):
    base = write_base(tmp_path)
    lora = write_lora(tmp_path)
    (lora / "non_lora_trainables.bin").unlink()
    msg = _error(tmp_path, lora, "--base", base)
    assert f"{lora / 'non_lora_trainables.bin'}: file not found" in msg


def test_base_of_another_shape(tmp_path):
    base = write_base(tmp_path, num_hidden_layers=3)
    lora = write_lora(tmp_path)
    msg = _error(tmp_path, lora, "--base", base)
    assert f"{base / 'config.json'}: num_hidden_layers 3 does not fit {lora / 'config.json'}" in msg
    assert "--base must be the LLM the LoRA was made from" in msg


def test_base_with_another_vocab(tmp_path):
    base = write_base(tmp_path, state=llm_state(torch.Generator().manual_seed(0), vocab=512, projector="none"),
                      vocab_size=512)
    lora = write_lora(tmp_path)
    msg = _error(tmp_path, lora, "--base", base)
    assert f"--base {base}: model.embed_tokens.weight has 512 rows but {lora / 'config.json'} has vocab_size 400" in msg


def test_adapter_targets_modules_absent_from_base(tmp_path):
    base = write_base(tmp_path)
    factors = lora_factors(torch.Generator().manual_seed(0), layers=3)
    lora = write_lora(tmp_path, factors=factors)
    msg = _error(tmp_path, lora, "--base", base)
    assert "adapter_model.safetensors: base_model.model.model.layers.2.mlp.down_proj.lora_A.weight targets " \
           f"model.layers.2.mlp.down_proj.weight, which the base LLM {base} does not have" in msg


def test_adapter_target_modules_unknown_to_base(tmp_path):
    base = write_base(tmp_path)
    lora = write_lora(tmp_path, adapter_overrides={"target_modules": ["q_proj", "w1"]}, targets=("q_proj",))
    msg = _error(tmp_path, lora, "--base", base)
    assert f"adapter_config.json: target_modules 'w1' matches no module of the base LLM {base}" in msg


def test_adapter_rank_disagrees_with_config(tmp_path):
    base = write_base(tmp_path)
    lora = write_lora(tmp_path, targets=("q_proj",), adapter_overrides={"r": 8})
    msg = _error(tmp_path, lora, "--base", base)
    assert "lora_A.weight has rank 4 but adapter_config.json says r = 8" in msg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"use_dora": True}, "use_dora is set"), ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head'] is not supported"),
     ({"peft_type": "IA3"}, "peft_type 'IA3'; only LoRA adapters")],
)
def test_unsupported_adapters(tmp_path, overrides, needle):
    base = write_base(tmp_path)
    lora = write_lora(tmp_path, adapter_overrides=overrides)
    msg = _error(tmp_path, lora, "--base", base)
    assert "adapter_config.json" in msg and needle in msg


def test_base_for_full_checkpoint_refused(tmp_path):
    base = write_base(tmp_path)
    ckpt = write_original(tmp_path)
    msg = _error(tmp_path, ckpt, "--base", base)
    assert f"--base {base}: {ckpt} is a full checkpoint with all its weights" in msg


def test_base_not_found(tmp_path):
    lora = write_lora(tmp_path)
    assert _error(tmp_path, lora, "--base", tmp_path / "nope") == f"Error: --base {tmp_path / 'nope'}: no such directory"


def test_delta_base_of_another_shape(tmp_path):
    base_sd = llm_state(torch.Generator().manual_seed(0), projector="none")
    delta = write_delta(tmp_path, base_sd, name="llava-tiny-delta-v1")
    base_sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, HIDDEN, dtype=torch.float16)
    base = write_base(tmp_path, state=base_sd)
    msg = _error(tmp_path, delta, "--base", base)
    assert "model.layers.1.mlp.up_proj.weight is (128, 64) in the delta but (96, 64) in the base LLM" in msg


def test_delta_base_with_more_vocab_rows_refused(tmp_path):
    base = write_base(tmp_path, state=llm_state(torch.Generator().manual_seed(0), vocab=512, projector="none"),
                      vocab_size=512)
    delta = write_delta(tmp_path, llm_state(torch.Generator().manual_seed(0), projector="none"), name="llava-tiny-delta-v1")
    msg = _error(tmp_path, delta, "--base", base)
    assert "model.embed_tokens.weight is (400, 64) in the delta but (512, 64) in the base LLM" in msg


def test_full_weights_named_delta(tmp_path):
    """A name-detected delta whose norms look like full weights is refused; --no-delta converts it."""
    base = write_base(tmp_path)
    ckpt = write_original(tmp_path, "llava-v1.5-delta-experiment")
    msg = _error(tmp_path, ckpt, "--base", base)
    assert "model.norm.weight looks like full weights" in msg and "--no-delta" in msg
    r = run("convert", ckpt, tmp_path / "hf", "--no-delta", "--quiet")
    assert r.exit_code == 0, r.output


def test_delta_flag_on_lora_refused(tmp_path):
    lora = write_lora(tmp_path)
    assert "is a LoRA adapter, not delta weights" in _error(tmp_path, lora, "--delta")


def test_unnamed_delta_warns(tmp_path):
    base = write_base(tmp_path)
    delta = write_delta(tmp_path, _base_state(base), name="llava-tiny-v1")
    r = run("convert", delta, tmp_path / "hf", "--quiet")
    assert r.exit_code == 0
    assert "Warning: model.norm.weight is near zero, as in delta weights" in r.output
    assert "--delta --base BASE" in r.output


# --- Hub repo ids, resolved offline from a pre-populated cache -------------------------------------


def _cache_repo(cache, repo_id, src, *, revision="main", tag=None):
    """Lay out SRC as huggingface_hub's cache does: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}@{tag}".encode()).hexdigest()
    shutil.copytree(src, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_resolved_offline(tmp_path, hub_cache):
    src_root = tmp_path / "src"
    base = write_base(src_root)
    lora = write_lora(src_root)
    cfg = json.loads((lora / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-tiny-patch14"
    (lora / "config.json").write_text(json.dumps(cfg))
    _cache_repo(hub_cache, "liuhaotian/llava-v1.5-tiny-lora", lora)
    _cache_repo(hub_cache, "lmsys/vicuna-tiny-v1.5", base)
    _cache_repo(hub_cache, "openai/clip-vit-tiny-patch14", src_root / "clip")

    out = tmp_path / "hf"
    r = run("convert", "liuhaotian/llava-v1.5-tiny-lora", out, "--base", "lmsys/vicuna-tiny-v1.5", "--quiet")
    assert r.exit_code == 0, r.output
    assert "chat template llava_v1" in r.output  # the authors' model name is the repo name, not the commit
    local = tmp_path / "hf-local"
    cfg["mm_vision_tower"] = str(src_root / "clip")
    (lora / "config.json").write_text(json.dumps(cfg))
    convert(lora, local, base=base, progress=False)
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


def test_hub_revision_and_vision_tower_id(tmp_path, hub_cache):
    src_root = tmp_path / "src"
    a = write_original(src_root, "a", fmt="safetensors", shards=2, seed=1)
    b = write_original(src_root, "b", fmt="safetensors", shards=2, seed=2)
    _cache_repo(hub_cache, "me/llava-v1.5-tiny", a)
    _cache_repo(hub_cache, "me/llava-v1.5-tiny", b, revision="v2", tag="b")
    _cache_repo(hub_cache, "openai/clip-vit-tiny-patch14", src_root / "clip")
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    for rev, src in ((None, a), ("v2", b)):
        out = tmp_path / f"hf-{rev}"
        args = ["--revision", rev] if rev else []
        r = run("convert", "me/llava-v1.5-tiny", out, "--vision-tower", "openai/clip-vit-tiny-patch14", "--quiet", *args)
        assert r.exit_code == 0, r.output
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            got = f.get_tensor(key)
        index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        want = load_file(str(src / index[key[len("language_model."):]]))[key[len("language_model."):]]
        assert torch.equal(got, want)


def test_hub_fetches_only_needed_files(tmp_path, hub_cache, monkeypatch):
    src_root = tmp_path / "src"
    ckpt = write_original(src_root, "llava-v1.5-tiny", fmt="bin", shards=2)
    torch.save({"lr": 1.0}, ckpt / "training_args.bin")
    _cache_repo(hub_cache, "me/llava-v1.5-tiny", ckpt)
    calls = []
    real = hub.snapshot_download

    def spy(repo_id, **kw):
        calls.append((repo_id, kw.get("revision"), tuple(kw.get("allow_patterns") or ())))
        return real(repo_id, **kw)

    monkeypatch.setattr(hub, "snapshot_download", spy)
    plan_conversion("me/llava-v1.5-tiny", vision_tower=src_root / "clip")
    assert calls[0][0] == "me/llava-v1.5-tiny" and "*.json" in calls[0][2] and "*.bin" not in calls[0][2]
    assert calls[1] == ("me/llava-v1.5-tiny", None, ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"))


def test_hub_id_not_cached_offline(tmp_path, hub_cache):
    lora = write_lora(tmp_path)
    msg = _error(tmp_path, lora, "--base", "lmsys/vicuna-7b-v1.5")
    assert msg == (
        "Error: --base lmsys/vicuna-7b-v1.5: not a local directory, and no cached snapshot of this Hub repo "
        "(HF_HUB_OFFLINE is set); download it first or pass a local directory"
    )
    msg = _error(tmp_path, "liuhaotian/llava-v1.5-7b", "--revision", "v9")
    assert "SOURCE liuhaotian/llava-v1.5-7b: not a local directory, and no cached snapshot of this Hub repo at " \
           "revision 'v9'" in msg


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_merge_memory_bounded_by_largest_tensor(tmp_path):
    """A LoRA merge over a ~200 MB base (one shard, largest tensor 4 MB, every linear layer adapted):
    anonymous memory grows by about 3x the largest tensor (its float32 merge + the cast), not with the model."""

    from test_memory import MB, _big_checkpoint

    ckpt, total, largest = _big_checkpoint(tmp_path, "safetensors")
    sd = load_file(str(ckpt / "model.safetensors"))
    base = tmp_path / "vicuna-big"
    base.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    for k in [k for k in cfg if k.startswith("mm_")]:
        del cfg[k]
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    shutil.copy(ckpt / "tokenizer.model", base)
    shutil.copy(ckpt / "tokenizer_config.json", base)
    save_file({k: v for k, v in sd.items() if "mm_projector" not in k}, str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    factors, r = {}, 16
    for k, v in sd.items():
        if k.startswith("model.layers.") and v.ndim == 2:
            m = "base_model.model." + k[: -len(".weight")]
            factors[m + ".lora_A.weight"] = (torch.randn(r, v.shape[1], generator=g) * 0.01).half()
            factors[m + ".lora_B.weight"] = (torch.randn(v.shape[0], r, generator=g) * 0.01).half()
    lora = tmp_path / "llava-v1.5-big-lora"
    lora.mkdir()
    (lora / "config.json").write_text((ckpt / "config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]}))
    save_file(factors, str(lora / "adapter_model.safetensors"))
    torch.save({"base_model.model.model." + k[len("model."):]: v for k, v in sd.items() if "mm_projector" in k},
               lora / "non_lora_trainables.bin")
    out = tmp_path / "out"
    growth = convert_growth(lora, out, base=base)
    bound = 3 * largest + 64 * MB
    print(f"LoRA merge: growth {growth / MB:.1f} MB, largest tensor {largest / MB:.0f} MB, model {total / MB:.0f} MB")
    assert growth < bound, f"anonymous memory grew {growth / MB:.1f} MB (bound {bound / MB:.1f} MB)"
    assert growth < total / 2


def test_revision_needs_a_hub_id(tmp_path):
    ckpt = write_original(tmp_path)
    assert _error(tmp_path, ckpt, "--revision", "v2") == (
        f"Error: --revision v2: SOURCE {ckpt} is a local directory, not a Hub repo id"
    )


# --- The LLaVA-NeXT repository's families in every source form (built tiny, OneVision-shaped) ------------


def _onevision_tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}


def test_onevision_lora_with_base_merges_and_converts(tmp_path, hub_cache):
    """A OneVision LoRA run (LLaVA-NeXT's train.py: adapter + non_lora_trainables.bin holding the projector,
    image_newline and the tuned SigLIP tower) with its Qwen2 base: merged as the authors' loader does."""
    from builders import onevision_config, onevision_state, qwen_config, write_qwen_tokenizer

    write_onevision(tmp_path / "full", cache=hub_cache)  # serves the SigLIP tower's config from the cache
    full = onevision_state(torch.Generator().manual_seed(3))
    base = tmp_path / "Qwen2-tiny-Instruct"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(qwen_config()))
    write_qwen_tokenizer(base)
    llm = {k: v for k, v in full.items() if k.startswith(("model.layers.", "model.embed_tokens", "model.norm"))}
    save_file(llm, str(base / "model.safetensors"))
    lora = tmp_path / "llava-onevision-qwen2-tiny-ov-lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps(onevision_config()))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
        "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "inference_mode": True,
    }))
    factors = lora_factors(torch.Generator().manual_seed(4), targets=("q_proj", "v_proj"))
    save_file(factors, str(lora / "adapter_model.safetensors"))
    trained = {k: v for k, v in full.items() if k not in llm}
    torch.save({"base_model.model." + k: v for k, v in trained.items()}, lora / "non_lora_trainables.bin")

    out = tmp_path / "hf"
    r = run("convert", lora, out, "--base", base, "--dtype", "float32", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert cfg["vision_config"]["num_hidden_layers"] == V_LAYERS - 1 and cfg["tie_word_embeddings"] is True
    got = _onevision_tensors(out)
    a = factors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].float()
    b = factors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].float()
    merged = llm["model.layers.1.self_attn.q_proj.weight"].float() + (8 / 4) * b @ a
    assert torch.allclose(got["language_model.model.layers.1.self_attn.q_proj.weight"], merged, atol=1e-3)
    assert torch.equal(got["language_model.model.layers.1.self_attn.q_proj.bias"],
                       llm["model.layers.1.self_attn.q_proj.bias"].float())
    assert torch.equal(got["image_newline"], trained["model.image_newline"].float())
    tower = "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(got[tower], trained["model.vision_tower.vision_tower." + tower[len("vision_tower."):]].float())
    assert "language_model.lm_head.weight" not in got  # tied, as released


def test_onevision_checkpoint_n_and_hub_id_convert_as_the_folder(tmp_path, hub_cache):
    """A `checkpoint-N` folder of a OneVision run, and the same checkpoint given by Hub repo id (HF cache),
    convert to the very tensors and files of the plain folder."""
    ckpt = write_onevision(tmp_path, "llava-onevision-qwen2-tiny-ov", cache=hub_cache)
    step = tmp_path / "run" / "llava-onevision-qwen2-tiny-ov" / "checkpoint-50"
    shutil.copytree(ckpt, step)
    cache_repo(hub_cache, "lmms-lab/llava-onevision-qwen2-tiny-ov", ckpt)
    outs = {}
    for label, source in (("folder", ckpt), ("step", step), ("hub", "lmms-lab/llava-onevision-qwen2-tiny-ov")):
        outs[label] = tmp_path / f"hf-{label}"
        r = run("convert", source, outs[label], "--quiet")
        assert r.exit_code == 0, (label, r.output)
    plan = plan_conversion(step)
    assert plan.source.family == "onevision" and plan.source.name == "llava-onevision-qwen2-tiny-ov_checkpoint-50"
    assert plan.chat_template == "qwen_1_5"
    ref = _onevision_tensors(outs["folder"])
    for label in ("step", "hub"):
        got = _onevision_tensors(outs[label])
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), label
        for name in ("config.json", "chat_template.jinja", "preprocessor_config.json", "tokenizer.json"):
            assert (outs[label] / name).read_text() == (outs["folder"] / name).read_text(), (label, name)


def test_onevision_pretrain_projector_with_base_converts_with_the_hub_siglip_tower(tmp_path, hub_cache):
    """The LLaVA-NeXT pretrain stage (`mm_tunable_parts: mm_mlp_adapter`, square images, flat merge: plain LLaVA
    on Qwen2 + SigLIP) saves mm_projector.bin only: with --base, the tower comes from the Hub id (weights from
    the cache), minus its last layer and head as the authors run it; the result loads and runs in transformers."""
    from builders import (
        SIGLIP_ID,
        onevision_config,
        qwen_config,
        qwen_state,
        write_qwen_tokenizer,
        write_siglip,
    )
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hub_tower = cache_repo(hub_cache, SIGLIP_ID, write_siglip(tmp_path / "siglip", weights=True))
    base = tmp_path / "Qwen2-tiny-Instruct"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(qwen_config()))
    write_qwen_tokenizer(base)
    save_file(qwen_state(torch.Generator().manual_seed(5)), str(base / "model.safetensors"))
    proj = tmp_path / "llavanext-siglip-qwen2-tiny-mlp2x_gelu-pretrain_blip558k_plain"
    proj.mkdir()
    (proj / "config.json").write_text(json.dumps(onevision_config(
        image_aspect_ratio="square", mm_patch_merge_type="flat", mm_tunable_parts="mm_mlp_adapter",
        image_grid_pinpoints=None,
    )))
    gen = torch.Generator().manual_seed(6)
    projector = {"model.mm_projector.0.weight": torch.randn(HIDDEN, 32, generator=gen),
                 "model.mm_projector.0.bias": torch.randn(HIDDEN, generator=gen),
                 "model.mm_projector.2.weight": torch.randn(HIDDEN, HIDDEN, generator=gen),
                 "model.mm_projector.2.bias": torch.randn(HIDDEN, generator=gen)}
    torch.save({k: v.to(torch.bfloat16) for k, v in projector.items()}, proj / "mm_projector.bin")

    out = tmp_path / "hf"
    r = run("convert", proj, out, "--base", base, "--dtype", "float32", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["vision_config"]["num_hidden_layers"] == V_LAYERS - 1 and cfg["vision_feature_layer"] == -1
    got = _onevision_tensors(out)
    hub = load_file(str(hub_tower / "model.safetensors"))
    assert not any(k.startswith(f"vision_tower.vision_model.encoder.layers.{V_LAYERS - 1}.") for k in got)
    assert not any(".head." in k for k in got)
    for k in ("encoder.layers.1.mlp.fc1.weight", "post_layernorm.bias", "embeddings.position_embedding.weight"):
        assert torch.equal(got["vision_tower.vision_model." + k], hub["vision_model." + k].float()), k
    assert torch.equal(got["multi_modal_projector.linear_2.weight"],
                       projector["model.mm_projector.2.weight"].to(torch.bfloat16).float())

    model = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    inputs = processor(images=Image.new("RGB", (500, 300), (120, 30, 200)), text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(cfg["image_token_index"]) == 729  # 27 x 27 patches, no CLS
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()

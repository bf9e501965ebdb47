"""The output's file set is the published llava-hf repos' one, with JSON that transformers 4.x and 5.x read."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from builders import write_original

from llava_convert.convert import convert
from llava_convert.hf_quantize import quantize_checkpoint
from llava_convert.quantize import QuantSpec

# llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf (weights aside)
LLAVA_HF_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "README.md",  # the model card (the llava-hf repos carry one too)
}
# Ours besides: the record of every input file the output was made from (README "Guarantees").
LLAVA_HF_FILES |= {"provenance.json"}
SAVE_TIME_NOISE = {"is_local", "local_files_only", "backend", "add_prefix_space", "name_or_path", "_commit_hash"}


def _weights(n: int) -> set[str]:
    if n == 1:
        return {"model.safetensors"}
    return {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)} | {"model.safetensors.index.json"}


def _check_metadata(out):
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizer"
    assert not SAVE_TIME_NOISE & set(tc), SAVE_TIME_NOISE & set(tc)
    assert "extra_special_tokens" not in tc  # a list in 5.x's spelling, which 4.x cannot read
    assert tc["add_bos_token"] is False  # the chat template writes BOS
    assert tc["padding_side"] == "left"
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == ("<s>", "</s>", "<pad>", "<unk>")
    stm = json.loads((out / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in stm.items()} == {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 401}
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"] is True
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaProcessor" and "image_processor" not in proc
    assert (proc["patch_size"], proc["vision_feature_select_strategy"]) == (14, "default")
    tpl = json.loads((out / "chat_template.json").read_text())["chat_template"]
    assert tpl == (out / "chat_template.jinja").read_text()
    tj = json.loads((out / "tokenizer.json").read_text())
    assert all(isinstance(m, str) for m in tj["model"]["merges"])  # the spelling tokenizers 0.15 reads too


@pytest.mark.parametrize("shards", [1, 3])
def test_convert_and_quantize_write_the_llava_hf_file_set(tmp_path, shards):
    ckpt = write_original(tmp_path, shards=1)
    out = tmp_path / "hf"
    convert(ckpt, out, max_shard_size="100KB" if shards > 1 else "5GB", progress=False)
    names = {p.name for p in out.iterdir()}
    n = len([x for x in names if x.endswith(".safetensors")])
    assert (n > 1) == (shards > 1)
    assert names == LLAVA_HF_FILES | _weights(n)
    _check_metadata(out)
    for quant in ("nf4", "int8"):
        q = tmp_path / quant
        quantize_checkpoint(out, q, QuantSpec(quant), max_shard_size="100KB" if shards > 1 else "5GB", progress=False)
        qnames = {p.name for p in q.iterdir()}
        qn = len([x for x in qnames if x.endswith(".safetensors")])
        assert qnames == LLAVA_HF_FILES | _weights(qn)
        _check_metadata(q)


def test_convert_with_quantize_writes_the_same_file_set(tmp_path):
    ckpt = write_original(tmp_path, shards=1)
    out = tmp_path / "hf"
    convert(ckpt, out, quantize=QuantSpec("nf4"), progress=False)
    assert {p.name for p in out.iterdir()} == LLAVA_HF_FILES | _weights(1)
    _check_metadata(out)


def test_clean_conversion_prints_no_transformers_warning(tmp_path, caplog):
    """A source with added_tokens.json (as the HF Trainer saves) converts without transformers' warnings."""
    ckpt = write_original(tmp_path, shards=1)
    (ckpt / "added_tokens.json").write_text("{}")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        convert(ckpt, tmp_path / "hf", progress=False)
    transformers_logs = [r for r in caplog.records if r.name.startswith("transformers")]
    assert not transformers_logs, [r.getMessage() for r in transformers_logs]
    assert not [w for w in caught if "transformers" in str(w.filename)], [str(w.message) for w in caught]

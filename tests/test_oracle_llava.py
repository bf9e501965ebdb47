"""Oracle tier: tiny checkpoints built and run by the authors' own code; the conversion must match them.

Float32 logits within 1e-4 over the original vocabulary, identical greedy generation, identical pixel
values, identical prompt ids from apply_chat_template + processor, on three aspect ratios.
"""

from __future__ import annotations

import json

import pytest
from parity import assert_parity

from llava_convert.convert import convert

pytestmark = [pytest.mark.oracle, pytest.mark.slow]


def _checkpoint(case_dir):
    (ckpt,) = [p for p in case_dir.iterdir() if p.is_dir() and p.name.startswith("llava")]
    return ckpt


@pytest.mark.parametrize("case", ["v15", "llama2", "v15_stray"])
def test_llava_family_matches_authors(oracle_case, tmp_path, case):
    case_dir = oracle_case(case)
    out = tmp_path / "hf"
    convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert_parity(out, case_dir)


def test_linear_projector_is_exact_identity(oracle_case, tmp_path):
    """`linear` is represented as linear_1 = W, act = identity, linear_2 = I (exact, shown by parity above)."""
    from safetensors import safe_open

    out = tmp_path / "hf"
    convert(_checkpoint(oracle_case("llama2")), out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["projector_hidden_act"] == "linear"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        import torch

        w2 = f.get_tensor("multi_modal_projector.linear_2.weight")
        assert torch.equal(w2.float(), torch.eye(w2.shape[0]))
        assert not f.get_tensor("multi_modal_projector.linear_2.bias").any()


def test_default_dtype_keeps_checkpoint_dtype(oracle_case, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "hf"
    convert(_checkpoint(oracle_case("v15")), out, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        import torch

        assert f.get_tensor("language_model.model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("vision_tower.vision_model.post_layernorm.weight").dtype == torch.float16


def test_bundled_example_is_the_authors_checkpoint(oracle_case, tmp_path):
    """examples/ holds the oracle's v15 case (made by the authors' code), so the README's command is real."""
    from pathlib import Path

    import torch

    from llava_convert.readers import read_checkpoint

    repo = Path(__file__).resolve().parents[1]
    example = read_checkpoint(repo / "examples" / "llava-v1.5-tiny")
    oracle = read_checkpoint(_checkpoint(oracle_case("v15")))
    assert sorted(example) == sorted(oracle)
    for name in oracle:
        assert torch.equal(example[name].load(), oracle[name].load()), name
    out = tmp_path / "hf"
    convert(repo / "examples" / "llava-v1.5-tiny", out, vision_tower=repo / "examples" / "clip-tiny", progress=False)
    assert (out / "model.safetensors").is_file()

"""Oracle tier for the other forms (issue #4): LoRA, projector-only and delta checkpoints converted with
--base, and a self-trained checkpoint-N/ save with <im_start>/<im_end>, against what the authors' own loader
makes of them (load_pretrained_model's LoRA and projector-only branches; apply_delta then the loader).

Float32 logits within 1e-4, identical greedy generation, pixel values and prompt ids (tests/parity.py).
"""

from __future__ import annotations

import json

import pytest
from parity import assert_parity

from llava_convert.convert import convert

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

# case -> (SOURCE inside the case directory, --base inside it, form, chat template)
FORMS = {
    "lora": ("llava-v1.5-tiny-lora", "vicuna-tiny-v1.5", "lora", "llava_v1"),
    "projector": ("llava-v1.5-mlp2x-tiny-pretrain", "vicuna-tiny-v1.5", "projector", "llava_v1"),
    "delta": ("LLaVA-tiny-delta-v0", "llama-tiny", "delta", "llava_v0"),
    "selftrained": ("llava-v1.5-tiny-imstart/checkpoint-3", None, "full", "llava_v1"),
}


@pytest.mark.parametrize("case", list(FORMS))
def test_form_matches_authors(oracle_case, tmp_path, case):
    case_dir = oracle_case(case)
    src, base, form, template = FORMS[case]
    out = tmp_path / "hf"
    plan = convert(case_dir / src, out, base=case_dir / base if base else None, dtype="float32", progress=False)
    assert plan.source.form == form and plan.chat_template == template
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    report = assert_parity(out, case_dir)
    print(f"{case}: max logit diff {max(r['logits_max_diff'] for r in report.values()):.2e}")


def test_lora_merges_every_linear_layer(oracle_case):
    """The authors' training targets all linear layers of the LLM (find_all_linear_names): all are merged."""
    from llava_convert.convert import plan_conversion
    from llava_convert.original.merge import Composite

    case_dir = oracle_case("lora")
    plan = plan_conversion(case_dir / FORMS["lora"][0], base=case_dir / FORMS["lora"][1])
    merged = {e.target for e in plan.entries if e.sources and isinstance(e.sources[0], Composite)}
    assert len(merged) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(e.sources[0].kind == "lora" for e in plan.entries if e.target in merged)


def test_self_trained_tokens_keep_their_ids(oracle_case, tmp_path):
    from transformers import AutoTokenizer

    case_dir = oracle_case("selftrained")
    out = tmp_path / "hf"
    plan = convert(case_dir / FORMS["selftrained"][0], out, progress=False)
    assert plan.source.name == "llava-v1.5-tiny-imstart_checkpoint-3"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>", "<image>", "<pad>"]) == [400, 401, 402, 403, 404]

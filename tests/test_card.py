"""The model card written into every conversion: metadata the Hub parses, provenance, prompt format, a usage
snippet that runs, check figures, and a user's own card left alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE, EXAMPLE_TOWER, REPO
from huggingface_hub import ModelCard, ModelCardData

from llava_convert import card
from llava_convert.cli import main
from llava_convert.convert import convert
from llava_convert.quantize import QuantSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def hub_cached_source(tmp_path_factory) -> Path:
    """The bundled example laid out as a Hub cache snapshot of `liuhaotian/llava-v1.5-tiny`, with a license."""
    snap = tmp_path_factory.mktemp("hfcache") / "models--liuhaotian--llava-v1.5-tiny" / "snapshots" / COMMIT
    shutil.copytree(EXAMPLE, snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\ninference: false\n---\n\n# LLaVA tiny\n")
    return snap


@pytest.fixture(scope="module")
def nf4_conversion(tmp_path_factory, hub_cached_source) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "llava-v1.5-tiny-nf4"
    convert(hub_cached_source, out, vision_tower=EXAMPLE_TOWER, chat_template="llava_v1",
            quantize=QuantSpec("nf4", blocksize=64), progress=False, command="llava-convert convert X Y --quantize nf4")
    return out


def test_plain_card_metadata_parses_with_huggingface_hub(example_conversion):
    text = (example_conversion / "README.md").read_text()
    parsed = ModelCard.load(example_conversion / "README.md")
    data = parsed.data
    assert isinstance(data, ModelCardData)
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert data.tags == ["llava", "llava-convert"]
    assert data.base_model is None and data.license is None  # a local source: no repo id, no license stated
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    assert text.startswith("---\n") and card.MARKER in text


def test_plain_card_records_provenance(example_conversion):
    text = (example_conversion / "README.md").read_text()
    for f in sorted(EXAMPLE.iterdir()):
        assert f"| `{f.name}` |" in text and _sha(f) in text, f.name
    for f in sorted(EXAMPLE_TOWER.iterdir()):
        assert _sha(f) in text, f.name
    for table in ("llava.toml", "clip.toml"):
        assert f"`{table}` (sha256 `{_sha(REPO / 'mappings' / table)}`)" in text
    assert f"local directory `{EXAMPLE}`" in text
    assert "- dtype: `float16`" in text
    assert "`LlavaForConditionalGeneration`" in text
    assert "- Command: `llava-convert convert " in text and "--vision-tower" in text
    assert "Made with: llava-convert 0.1.0" in text
    assert "## Quantization" not in text
    facts = card.read_facts(example_conversion / "README.md")
    assert facts["source"]["files"][0]["sha256"] == _sha(EXAMPLE / facts["source"]["files"][0]["name"])


def test_rendered_prompt_is_what_the_processor_gives(example_conversion):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(example_conversion)
    want = processor.apply_chat_template(card.example_messages(), add_generation_prompt=True)
    text = (example_conversion / "README.md").read_text()
    assert f"```text\n{want}\n```" in text
    assert "the authors' `llava_v1` conversation mode" in text
    assert (example_conversion / "chat_template.jinja").read_text().strip() in text


@pytest.mark.parametrize("which", ["example_conversion", "nf4_conversion"])
def test_usage_snippet_runs_as_written(request, which):
    conversion = request.getfixturevalue(which)
    code = _snippet((conversion / "README.md").read_text())
    assert f'model_id = "{conversion}"' in code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_card_is_deterministic(example_conversion, tmp_path):
    again = tmp_path / example_conversion.name
    convert(EXAMPLE, again, vision_tower=EXAMPLE_TOWER, progress=False)
    a = (example_conversion / "README.md").read_text().replace(str(example_conversion), "OUT")
    b = (again / "README.md").read_text().replace(str(again), "OUT")
    assert a == b


def test_quantized_card_links_its_hub_source(nf4_conversion, hub_cached_source):
    data = ModelCard.load(nf4_conversion / "README.md").data
    assert data.base_model == "liuhaotian/llava-v1.5-tiny"
    assert data.to_dict()["base_model_relation"] == "quantized"
    assert data.license == "apache-2.0"  # stated by the source's own card
    assert data.tags == ["llava", "llava-convert", "bitsandbytes", "4-bit", "nf4"]
    text = (nf4_conversion / "README.md").read_text()
    assert f"[liuhaotian/llava-v1.5-tiny](https://huggingface.co/liuhaotian/llava-v1.5-tiny) at revision `{COMMIT}`" in text
    assert "## Quantization" in text and "bitsandbytes nf4 (4-bit), quantized on cpu." in text
    assert "Kept unquantized (skip list): `lm_head`, `vision_tower`, `multi_modal_projector`." in text
    assert "| `bnb_4bit_quant_type` | `nf4` |" in text
    assert "- Command: `llava-convert convert X Y --quantize nf4`" in text


def test_quantize_command_card_records_the_conversion_it_came_from(example_conversion, tmp_path):
    out = tmp_path / "int8"
    r = CliRunner().invoke(main, ["quantize", str(example_conversion), str(out), "--quantize", "int8", "--quiet"])
    assert r.exit_code == 0, r.output
    data = ModelCard.load(out / "README.md").data
    assert data.tags == ["llava", "llava-convert", "bitsandbytes", "8-bit", "int8"]
    facts = card.read_facts(out / "README.md")
    assert facts["kind"] == "quantize"
    assert facts["converted_from"]["path"] == str(EXAMPLE)
    assert facts["source"]["path"] == str(example_conversion)
    shard = next(f for f in facts["source"]["files"] if f["name"] == "model.safetensors")
    assert shard["sha256"] == _sha(example_conversion / "model.safetensors")
    assert not (out / card.REPORT_NAME).exists()


def test_check_save_report_puts_figures_in_the_card(example_conversion, tmp_path):
    out = tmp_path / "checked"
    shutil.copytree(example_conversion, out)
    r = CliRunner().invoke(main, ["check", str(EXAMPLE), str(out), "--vision-tower", str(EXAMPLE_TOWER),
                                  "--save-report", "--quiet", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / card.REPORT_NAME).read_text())
    text = (out / "README.md").read_text()
    assert "**PASS**" in text
    f = report["figures"]
    assert f"| KL(original ‖ converted) | {card._fmt(f['kl'])} |" in text
    assert f"| logits max abs diff | {card._fmt(f['logits_max_abs_diff'])} |" in text
    assert "| greedy generation identical | yes (4 of 4 tokens) | required |" in text
    assert "Images: `builtin` (300×180)" in text and report["settings"]["prompt"] in text
    assert f"transformers {report['versions']['transformers']}" in text

    # A report made for other files is not shown as if it described these.
    cfg = json.loads((out / "config.json").read_text())
    cfg["_note"] = "edited"
    (out / "config.json").write_text(json.dumps(cfg))
    card.refresh_card(out)
    text = (out / "README.md").read_text()
    assert "**PASS**" not in text and "config.json has changed since" in text


def test_a_users_own_card_is_never_overwritten(example_conversion, tmp_path):
    out = tmp_path / "mine"
    shutil.copytree(example_conversion, out)
    mine = "---\nlicense: mit\n---\n\n# My model\n\nHand-written.\n"
    (out / "README.md").write_text(mine)
    facts = card.read_facts(example_conversion / "README.md")
    assert card.write_card(out, facts) is False
    assert card.refresh_card(out) is False
    assert (out / "README.md").read_text() == mine
    assert card.write_card(out, facts, force=True) is True
    assert card.is_own_card(out / "README.md")


def test_command_in_card_never_holds_a_token():
    cmd = card.redact_command(["llava-convert", "convert", "a", "b", "--token", "hf_secret", "--push-to-hub",
                               "me/x", "--token=hf_other"])
    assert "hf_secret" not in cmd and "hf_other" not in cmd and "--push-to-hub me/x" in cmd

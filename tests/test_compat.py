"""Compatibility tier: converted checkpoints loaded by transformers 4.x give what transformers 5 gives.

transformers 4.57 (`.venv-compat`, scripts/envs/30-compat.sh) loads every family with `AutoProcessor` + the
model class, applies the chat template, processes an image and generates: prompt ids, pixel values,
float32 logits (<= 1e-4) and greedy tokens equal transformers 5's, for a single- and a 3-turn chat, and for
an nf4 and an int8 output of `quantize`. The oldest versions with each class (4.36 for llava, in the oracle
environment; 4.39 for llava_next, `.venv-compat/tf439`) load the model, tokenizer and image processor and
give the same logits. One driver process per environment runs all its cases (tests/compat/driver.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, oracle_python
from parity import chat, with_image_index

from llava_convert.check.converted import collapse_image_tokens
from llava_convert.convert import convert
from llava_convert.hf_quantize import quantize_checkpoint
from llava_convert.quantize import QuantSpec

pytestmark = [pytest.mark.compat, pytest.mark.oracle, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "compat"))
import driver  # noqa: E402

FAMILIES = {  # oracle case -> architecture
    "v15": "llava",
    "llama2": "llava",
    "v16_vicuna": "llava_next",
    "v16_mistral": "llava_next",
    "v16_34b": "llava_next",
}
ATOL = 1e-4


def compat_python() -> Path:
    return Path(os.environ.get("LLAVA_COMPAT_PYTHON", REPO / ".venv-compat" / "bin" / "python"))


def _run_driver(python: Path, jobs: list[dict], out: Path, *, pythonpath: Path | None = None) -> dict:
    if not python.exists():
        pytest.fail(f"interpreter {python} not found: run scripts/envs/30-compat.sh (or scripts/test)")
    jobs_path = out.with_suffix(".json")
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if pythonpath is not None:
        if not pythonpath.is_dir():
            pytest.fail(f"{pythonpath} not found: run scripts/envs/30-compat.sh (or scripts/test)")
        env["PYTHONPATH"] = str(pythonpath)
    else:
        env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), str(HERE / "compat" / "driver.py"), str(jobs_path), str(out)],
                          capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        pytest.fail(f"driver under {python} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)


def _checkpoint(case_dir: Path) -> Path:
    (ckpt,) = [p for p in case_dir.iterdir() if p.is_dir() and p.name.startswith("llava")]
    return ckpt


@pytest.fixture(scope="module")
def runs(oracle_case, tmp_path_factory):
    """Converted checkpoints, the jobs, and every environment's results."""
    root = tmp_path_factory.mktemp("compat")
    jobs, old36, old39 = [], [], []
    refs = {}
    for case, arch in FAMILIES.items():
        case_dir = oracle_case(case)
        out = root / case
        convert(_checkpoint(case_dir), out, dtype="float32", progress=False)
        ref = torch.load(case_dir / "reference.pt", weights_only=True)
        refs[case] = ref
        common = {"dir": str(out), "arch": arch, "max_new_tokens": 8}
        jobs.append({**common, "name": f"{case}/single", "image": "landscape", "messages": chat([ref["question"]])})
        jobs.append({**common, "name": f"{case}/multi", "image": "landscape",
                     "messages": chat(ref["multi_turn"]["turns"])})
        # 4.36's llava image processor is CLIP's (no pad): a square image, which pad leaves as it is.
        old = {**common, "name": f"{case}/old", "image": "square" if arch == "llava" else "landscape",
               "messages": chat([ref["question"]]), "mode": "old"}
        (old36 if arch == "llava" else old39).append(old)
    fp16 = root / "v15-fp16"
    convert(_checkpoint(oracle_case("v15")), fp16, progress=False)
    for quant in ("nf4", "int8"):
        q = root / f"v15-{quant}"
        quantize_checkpoint(fp16, q, QuantSpec(quant), progress=False)
        jobs.append({"name": f"v15-{quant}/single", "dir": str(q), "arch": "llava", "image": "landscape",
                     "messages": chat([refs["v15"]["question"]]), "max_new_tokens": 8, "quantized": True})

    v5 = {job["name"]: driver.run_job(job) for job in jobs}
    v5.update({job["name"]: driver.run_job({**job, "mode": "full"}) for job in old36 + old39})
    # 4.39's LlavaNextImageProcessor tiles anyres images differently from the authors (and from 5.x, which
    # matches them): its model gets 5.x's pixel values, its own are compared by shape.
    for job in old39:
        job["pixel_values_from"] = str(root / (job["name"].replace("/", "-") + "-pixels.pt"))
        torch.save(v5[job["name"]]["pixel_values"], job["pixel_values_from"])
    v457 = _run_driver(compat_python(), jobs, root / "v457.pt")
    v436 = _run_driver(oracle_python(), old36, root / "v436.pt")
    v439 = _run_driver(compat_python(), old39, root / "v439.pt", pythonpath=compat_python().parents[1] / "tf439")
    dirs = {case: root / case for case in FAMILIES}
    return {"refs": refs, "dirs": dirs, "v5": v5, "v457": v457, "v436": v436, "v439": v439}


def _same_run(got: dict, want: dict, *, expanded: bool = True, own_pixels: bool = True) -> None:
    assert "error" not in got, got.get("error")
    assert "error" not in want, want.get("error")
    if expanded:
        assert got["input_ids"] == want["input_ids"]
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert float((got["pixel_values"] - want["pixel_values"]).abs().max()) == 0.0
    if own_pixels:  # the model got the version's own image processor output
        assert torch.equal(got["own_pixel_values"], got["pixel_values"])
    assert got["logits"].shape == want["logits"].shape
    diff = float((got["logits"] - want["logits"]).abs().max())
    assert diff <= ATOL, f"logits differ by {diff}"
    assert got["generated"] == want["generated"]


@pytest.mark.parametrize("case", list(FAMILIES))
@pytest.mark.parametrize("turns", ["single", "multi"])
def test_transformers_457_matches_5(runs, case, turns):
    got, want = runs["v457"][f"{case}/{turns}"], runs["v5"][f"{case}/{turns}"]
    assert "error" not in got, got["error"]
    assert got["version"].startswith("4.57.")
    assert got["classes"][0] == ("LlavaProcessor" if FAMILIES[case] == "llava" else "LlavaNextProcessor")
    assert got["classes"][1] == "LlamaTokenizerFast"
    assert got["prompt"] == want["prompt"]
    assert got["server_ids"] == want["server_ids"]
    _same_run(got, want)
    # ... and both are the authors' ids.
    ref = runs["refs"][case]
    authors = ref["multi_turn"]["input_ids"] if turns == "multi" else ref["images"]["landscape"]["input_ids"]
    image_id = _image_id(runs, case)
    assert collapse_image_tokens(got["input_ids"], image_id) == authors.tolist()
    assert with_image_index(got["server_ids"], image_id) == authors.tolist()


def _image_id(runs, case: str) -> int:
    return json.loads((runs["dirs"][case] / "config.json").read_text())["image_token_index"]


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_transformers_457_loads_quantized(runs, quant):
    got, want = runs["v457"][f"v15-{quant}/single"], runs["v5"][f"v15-{quant}/single"]
    assert "error" not in got, f"transformers {got['version']} cannot run the {quant} output: {got.get('error')}"
    assert got["prompt"] == want["prompt"]
    _same_run(got, want)


@pytest.mark.parametrize("case", [c for c, a in FAMILIES.items() if a == "llava"])
def test_transformers_436_llava(runs, case):
    got, want = runs["v436"][f"{case}/old"], runs["v5"][f"{case}/old"]
    assert "error" not in got, got["error"]
    assert got["version"] == "4.36.2"
    assert got["classes"][1:] == ["LlamaTokenizerFast", "CLIPImageProcessor"]
    image_id = _image_id(runs, case)
    assert collapse_image_tokens(got["input_ids"], image_id) == collapse_image_tokens(want["input_ids"], image_id)
    _same_run(got, want, expanded=False)


@pytest.mark.parametrize("case", [c for c, a in FAMILIES.items() if a == "llava_next"])
def test_transformers_439_llava_next(runs, case):
    got, want = runs["v439"][f"{case}/old"], runs["v5"][f"{case}/old"]
    assert "error" not in got, got["error"]
    assert got["version"] == "4.39.3"
    assert got["own_pixel_values"].shape == want["pixel_values"].shape  # same grid, tiles resized differently
    assert got["classes"][1:] == ["LlamaTokenizerFast", "LlavaNextImageProcessor"]
    image_id = _image_id(runs, case)
    assert collapse_image_tokens(got["input_ids"], image_id) == collapse_image_tokens(want["input_ids"], image_id)
    _same_run(got, want, expanded=False, own_pixels=False)

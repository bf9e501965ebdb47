"""Oracle tier for `check` on the LLaVA-NeXT repository's families, end to end: `check()` on real conversions.

The tiny originals that ``tests/oracle_next/make_reference.py`` built with the authors' code (their towers named
by Hub id, served from the root's HF cache) are converted with `convert` in float32. `check` must pass on the
correct conversions of OneVision (ov_05b: Qwen2 + trained SigLIP, anyres_max_9, range pinpoints), Interleave
(Qwen + frozen SigLIP, LlavaNext) and llama3-llava-next (Llama-3 + CLIP, double BOS) with the float32
thresholds, and name the stage on deliberately broken ones, edited after conversion:

* SigLIP with its last layer kept: `vision_config.num_hidden_layers` + 1 and the Hub tower's last encoder layer
  added to the weights -> the vision stage, with the hint for that mistake;
* the pinpoint range not expanded: the image processor's and config's `image_grid_pinpoints` replaced by the
  range's two end pairs -> the pixel stage, with the hint for that mistake.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llava_convert.check import CheckOptions, check
from llava_convert.convert import convert
from llava_convert.hub import locate
from llava_convert.reference_next import HINTS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "oracle_next"))

from next_images import test_images_next  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

CASES = ["ov_05b", "interleave", "llama3"]
SIGLIP_HUB_ID = "google/siglip-so400m-patch14-384"
VISION_STAGE = "vision tower (features)"


@pytest.fixture(scope="module")
def next_root(oracle_next_root):
    """The oracle root with its hf-cache as the HF cache (the checkpoints name their towers by Hub id)."""
    import huggingface_hub

    root = oracle_next_root  # conftest.py
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hf-cache"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hf-cache"))
        yield root


def _original(root: Path, case: str) -> Path:
    rec = json.loads((root / case / "reference.json").read_text())
    return root / case / rec["checkpoint_dir"]


@pytest.fixture(scope="module")
def converted(next_root, tmp_path_factory):
    """Each case converted once: {case: output directory}."""
    base = tmp_path_factory.mktemp("check_next")
    outs = {}
    for case in CASES:
        convert(_original(next_root, case), base / case, dtype="float32", progress=False)
        outs[case] = base / case
    return outs


def _check(root: Path, case: str, out: Path):
    images = test_images_next()
    report = check(_original(root, case), out, CheckOptions(images=list(images.values())))
    return report, dict(zip(images, report.images, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_check_passes_a_correct_conversion(next_root, converted, case):
    report, by_name = _check(next_root, case, converted[case])
    assert report.passed, report.reasons
    for name, im in by_name.items():
        assert im.first_divergence is None, (name, im.first_divergence, im.hint)
        assert im.prompt_ids_match and im.generation_match, name
        assert im.logits_max_abs is not None and im.logits_max_abs <= 1e-4, (name, im.logits_max_abs)
        # every stage of the converted model recorded and compared (LlavaOnevision / LlavaNext, SigLIP or CLIP)
        stages = {s.stage for s in im.stages}
        assert {"pixel_values", VISION_STAGE, "projector", "image merge (unpad + newline)", "logits"} <= stages
        assert all(s.ok for s in im.stages), name
    print(case, {n: im.logits_max_abs for n, im in by_name.items()})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_siglip_with_its_last_layer_kept_is_named_at_the_vision_stage(next_root, converted, tmp_path):
    """ov_05b trains its tower: a conversion that keeps the Hub tower's last layer (the checkpoint's layers,
    then the Hub's last one, as transformers' SiglipVisionModel of the Hub config would hold them)."""
    out = _copy(converted["ov_05b"], tmp_path / "last_layer_kept")
    kept = json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    hub = locate(SIGLIP_HUB_ID, role="test", tower=True, weights=True).path
    hub_layers = json.loads((hub / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    assert hub_layers == kept + 1  # the conversion dropped it, as the authors do
    _edit_json(out / "config.json", lambda c: c["vision_config"].update(num_hidden_layers=kept + 1))
    tensors = load_file(str(out / "model.safetensors"))
    last = f"vision_model.encoder.layers.{kept}."
    added = {f"vision_tower.{k}": v for k, v in load_file(str(hub / "model.safetensors")).items() if k.startswith(last)}
    assert added
    tensors.update(added)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    report, by_name = _check(next_root, "ov_05b", out)
    assert not report.passed
    for name, im in by_name.items():
        assert im.first_divergence == VISION_STAGE, (name, im.first_divergence)
        assert im.hint == HINTS["vision:siglip_last_layer_kept"], (name, im.hint)


def test_unexpanded_pinpoint_range_is_named_at_the_pixel_stage(next_root, converted, tmp_path):
    """ov_05b's pinpoints are the range "(1x1),...,(6x6)": a conversion that keeps only its end pairs picks
    other grids for the landscape and large images."""
    out = _copy(converted["ov_05b"], tmp_path / "range_unexpanded")
    ends = [[384, 384], [2304, 2304]]
    _edit_json(out / "config.json", lambda c: c.update(image_grid_pinpoints=ends))
    _edit_json(out / "preprocessor_config.json", lambda c: c.update(image_grid_pinpoints=ends))

    report, by_name = _check(next_root, "ov_05b", out)
    assert not report.passed
    for name in ("landscape", "large"):
        im = by_name[name]
        assert im.first_divergence == "pixel_values", (name, im.first_divergence)
        assert im.hint == HINTS["pixel_values:pinpoints_unexpanded"], (name, im.hint)

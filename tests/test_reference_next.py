"""The original side of `check` for the LLaVA-NeXT repository's families (`reference_next`).

Unit tests of the authors' image algorithms (`authors.images`) on their edge cases, then (marker `oracle`) the proof against the
authors: for every case and image that ``tests/oracle_next/make_reference.py`` recorded with the authors' own code
(llavaction + transformers 4.40.2), `check`'s original side (`open_reference` + `run_original`, reading the
original checkpoint) reproduces the recorded pixel values and prompt ids exactly, the vision / projector / merged
features and the float32 logits within 1e-4, and the greedy tokens. Last, the checker's stage localisation on
deliberately wrong converted outputs made with other code (transformers' own SigLIP and image processor).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from llava_convert.authors.images import (
    downscale_anyres_max,
    expand_pinpoints,
    get_anyres_image_grid_shape,
    unpad_image,
    unpad_image_transformers,
)
from llava_convert.check.compare import compare
from llava_convert.check.converted import ConvertedRun
from llava_convert.check.original import run_original
from llava_convert.check.report import thresholds_for
from llava_convert.lazy import RowSlice
from llava_convert.reference_next import HINTS, NextReferenceModel, open_reference

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "oracle_next"))

from next_images import test_images_next  # noqa: E402

CASES = ["ov_05b", "ov_7b", "interleave", "llama3", "next72b"]
QUESTION = "What is shown in this image?"


# ---------------------------------------------------------------------------------------------------
# Algorithms
# ---------------------------------------------------------------------------------------------------


def test_range_pinpoints_expand_like_the_authors():
    pins = expand_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pins) == 36
    assert pins[:7] == [
        [384, 384],
        [384, 768],
        [384, 1152],
        [384, 1536],
        [384, 1920],
        [384, 2304],
        [768, 384],
    ]
    assert pins == [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]  # the released list's order
    assert expand_pinpoints("(2x1),(3x2)", 336) == [[672, 336], [672, 672], [1008, 336], [1008, 672]]
    listed = [[384, 768], [768, 384]]
    assert expand_pinpoints(listed, 384) == listed
    assert expand_pinpoints(str(listed), 384) == listed  # a list written as a string
    # (columns, rows): a 700x300 image on the range grid picks 768x384 -> 2 columns, 1 row
    assert get_anyres_image_grid_shape((700, 300), "(1x1),...,(6x6)", 384) == (2, 1)


@pytest.mark.parametrize(
    ("h", "w", "out"),
    [
        (81, 98, (81, 98)),  # h*w = 7938: times = 1.09996 <= 1.1, kept as it is
        (81, 99, (73, 89)),  # h*w = 8019: times = 1.1055 > 1.1, shrunk to int(h // t), int(w // t)
        (86, 108, (72, 90)),  # the oracle's `large` image on OneVision (4x4 tiles, unpadded)
        (27, 27, (27, 27)),
    ],
)
def test_anyres_max_downscale_ratio_boundary(h, w, out):
    feat = torch.randn(5, h, w, generator=torch.Generator().manual_seed(0))
    got = downscale_anyres_max(feat, 9, 27)
    assert tuple(got.shape[1:]) == out
    if out == (h, w):
        assert got is feat
    else:  # bilinear, align_corners False, as the authors call it
        ref = torch.nn.functional.interpolate(feat[None], list(out), mode="bilinear", align_corners=False)[0]
        assert torch.equal(got, ref)


def test_unpad_rounding_authors_vs_transformers():
    # 110 * (54 / 198) = 29.999999999999996 in float: the authors' int() gives 29, transformers' round(.., 7) 30.
    t = torch.arange(27 * 54, dtype=torch.float32).view(1, 27, 54)
    authors = unpad_image(t, (110, 198))
    hf = unpad_image_transformers(t, (110, 198))
    assert authors.shape == (1, 27, 14) and hf.shape == (1, 27, 16)
    # away from the boundary both agree
    assert torch.equal(unpad_image(t, (700, 300)), unpad_image_transformers(t, (700, 300)))


def test_row_slice_keeps_the_first_rows(tmp_path):
    from safetensors.torch import save_file

    from llava_convert.readers import read_checkpoint

    w = torch.randn(10, 4)
    save_file({"model.embed_tokens.weight": w}, str(tmp_path / "model.safetensors"))
    ref = read_checkpoint(tmp_path)["model.embed_tokens.weight"]
    s = RowSlice(ref, 7)
    assert s.shape == (7, 4) and torch.equal(s.load(), w[:7])


# ---------------------------------------------------------------------------------------------------
# Against the authors (oracle records)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_root(oracle_next_root):
    """The oracle root (LLAVA_ORACLE_NEXT_ROOT, or built once per session), with its hf-cache as the HF cache: the
    checkpoints name their towers by Hub id, as the releases do."""
    import huggingface_hub

    root = oracle_next_root  # conftest.py
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hf-cache"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hf-cache"))
        yield root


@functools.cache
def _record(root: str, case: str) -> dict:
    return torch.load(Path(root) / case / "reference.pt", weights_only=True)


@functools.cache
def _original(root: str, case: str):
    """`check`'s original side on one case: the reference model and its runs over the oracle's images."""
    rec = _record(root, case)
    ref = open_reference(Path(root) / case / rec["checkpoint_dir"])
    images = list(test_images_next().items())
    assert [n for n, _ in images] == rec["image_names"]
    runs = run_original(ref, images, rec["question"], rec["max_new_tokens"])
    return ref, dict(zip(rec["image_names"], runs, strict=True))


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.float() - b.float()).abs().max())


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_original_side_reproduces_the_authors(case, next_root):
    rec = _record(str(next_root), case)
    ref, runs = _original(str(next_root), case)
    assert isinstance(ref, NextReferenceModel)
    assert ref.conv_mode == rec["conv_mode"]
    assert ref.vocab_size == rec["len_tokenizer"]
    figures = {}
    for name, r in rec["images"].items():
        run = runs[name]
        assert run.prompt == rec["prompt"]
        assert run.input_ids == r["input_ids"].tolist()
        assert run.image_pos == r["image_token_pos"]
        assert torch.equal(run.stages.pixel_values, r["pixel_values"]), name
        assert run.image_tokens == r["num_image_tokens"]
        assert run.inputs_embeds.shape[0] == r["inputs_embeds_len"]
        diffs = {
            "vision": _max(run.stages.vision_features, r["vision_features"]),
            "image": _max(run.stages.image_features, r["image_features"]),
            "merged": _max(run.stages.merged, r["merged_image_features"]),
            "logits": _max(run.logits, r["logits"]),
        }
        figures[name] = diffs
        assert all(v <= 1e-4 for v in diffs.values()), (name, diffs)
        assert run.generated == r["generated"].tolist(), name
    print(case, json.dumps(figures))


# ---------------------------------------------------------------------------------------------------
# Stage localisation on deliberately wrong converted outputs
# ---------------------------------------------------------------------------------------------------


def _converted_like(run, **changes) -> ConvertedRun:
    """A converted side that equals the original run, but for CHANGES."""
    fields = dict(
        prompt=run.prompt,
        input_ids=list(run.input_ids),
        used_ids=list(run.input_ids),
        pixel_values=run.stages.pixel_values,
        vision_features=run.stages.vision_features,
        image_features=run.stages.image_features,
        inputs_embeds=run.inputs_embeds,
        layers=list(run.layers),
        norm=run.norm,
        logits=run.logits,
        generated=list(run.generated),
        image_tokens=run.image_tokens,
        image_pos=run.image_pos,
        image_token_id=-200,
    )
    fields.update(changes)
    return ConvertedRun(**fields)


def _compare(ref, name, run, conv):
    img = test_images_next()[name]
    return compare(name, img.size, run, conv, thresholds_for("float32", None), ref.vocab_size, QUESTION, True)


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("case", ["ov_05b", "interleave", "llama3"])
def test_a_correct_conversion_passes_every_stage(case, next_root):
    ref, runs = _original(str(next_root), case)
    for name, run in runs.items():
        rep = _compare(ref, name, run, _converted_like(run))
        assert rep.first_divergence is None, (name, rep.first_divergence, rep.hint)
        assert any(s.stage == "image merge (unpad + newline)" for s in rep.stages)


@pytest.mark.oracle
@pytest.mark.slow
def test_siglip_with_its_last_layer_kept_is_named_at_the_vision_stage(next_root):
    """Interleave's tower is frozen: the checkpoint holds the Hub tower minus its last layer. A converter that
    keeps the Hub tower whole (transformers' own SiglipVisionModel, all its layers) is caught at the tower."""
    from transformers import SiglipVisionModel

    from llava_convert.hub import locate

    ref, runs = _original(str(next_root), "interleave")
    hub = locate("google/siglip-so400m-patch14-384", tower=True, weights=True).path
    whole = SiglipVisionModel.from_pretrained(str(hub), attn_implementation="eager").eval()
    assert whole.config.num_hidden_layers == ref.vision.config.num_hidden_layers + 1
    run = runs["landscape"]
    with torch.inference_mode():
        wrong = whole(run.stages.pixel_values[0], output_hidden_states=True).hidden_states[-1]
    rep = _compare(ref, "landscape", run, _converted_like(run, vision_features=wrong))
    assert rep.first_divergence == "vision tower (features)"
    assert rep.hint == HINTS["vision:siglip_hub_whole"]
    # the checkpoint's layers with the Hub tower's last one on top (a converter filling the "missing" layer)
    last = whole.encoder.layers[-1]
    with torch.inference_mode():
        topped = last(run.stages.vision_features, attention_mask=None)
    topped = topped[0] if isinstance(topped, tuple) else topped
    rep = _compare(ref, "landscape", run, _converted_like(run, vision_features=topped))
    assert rep.first_divergence == "vision tower (features)"
    assert rep.hint == HINTS["vision:siglip_last_layer_kept"]
    with torch.inference_mode():  # post_layernorm applied (last_hidden_state of the truncated tower)
        post = ref.vision(run.stages.pixel_values[0]).last_hidden_state
    rep = _compare(ref, "landscape", run, _converted_like(run, vision_features=post))
    assert rep.hint == HINTS["vision:siglip_post_layernorm"]


@pytest.mark.oracle
@pytest.mark.slow
def test_unexpanded_pinpoint_range_is_named_at_the_pixel_stage(next_root):
    """ov_05b writes its pinpoints as the range "(1x1),...,(6x6)": transformers' OneVision image processor given
    only its two end pairs (the range read without expanding it) is caught at the pixels."""
    from transformers import LlavaOnevisionImageProcessorPil

    ref, runs = _original(str(next_root), "ov_05b")
    proc = LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=[[384, 384], [2304, 2304]],
        size={"height": 384, "width": 384},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    for name in ("landscape", "large"):
        run = runs[name]
        pv = proc(test_images_next()[name], return_tensors="pt")["pixel_values"]
        rep = _compare(ref, name, run, _converted_like(run, pixel_values=pv))
        assert rep.first_divergence == "pixel_values", name
        assert rep.hint == HINTS["pixel_values:pinpoints_unexpanded"], (name, rep.hint)


def _with_image_features(run, feats: torch.Tensor) -> ConvertedRun:
    """A converted side whose sequence carries FEATS at the image's place (the text positions unchanged)."""

    def splice(t: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[: run.image_pos], middle, t[run.image_pos + run.image_tokens :]])

    def zeros(t: torch.Tensor) -> torch.Tensor:
        return splice(t, torch.zeros(feats.shape[0], *t.shape[1:], dtype=t.dtype))

    return _converted_like(
        run,
        inputs_embeds=splice(run.inputs_embeds, feats.to(run.inputs_embeds.dtype)),
        layers=[zeros(x) for x in run.layers],
        norm=zeros(run.norm),
        logits=zeros(run.logits),
        image_tokens=feats.shape[0],
    )


@pytest.mark.oracle
@pytest.mark.slow
def test_missing_downscale_and_plain_llava_merge_are_named_at_the_merge(next_root):
    ref, runs = _original(str(next_root), "ov_05b")
    run = runs["large"]  # 4x4 tiles: unpadded 86x108, shrunk to 72x90 by anyres_max_9
    assert run.image_tokens == 729 + 72 * 91
    feats = run.stages.image_features
    undone = ref.merge(feats, test_images_next()["large"].size, anyres=True, downscale=False)[0]
    assert undone.shape[0] == 729 + 86 * 109
    rep = _compare(ref, "large", run, _with_image_features(run, undone))
    assert rep.first_divergence == "image merge (unpad + newline)"
    assert rep.hint == HINTS["merge:no_downscale"]
    rep = _compare(ref, "large", run, _with_image_features(run, feats[0]))  # 729 features: plain LLaVA
    assert rep.first_divergence == "image merge (unpad + newline)"
    assert rep.hint == HINTS["merge:base_only"]


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.parametrize("case", ["ov_05b", "llama3"])
def test_streamed_decoder_layers_give_the_same_run(case, next_root):
    """low_memory: decoder layers materialised one at a time (tied Qwen2 and untied Llama-3 alike)."""
    rec = _record(str(next_root), case)
    ref = open_reference(next_root / case / rec["checkpoint_dir"], low_memory=True)
    r = rec["images"]["portrait"]
    run = run_original(
        ref, [("portrait", test_images_next()["portrait"])], rec["question"], rec["max_new_tokens"]
    )[0]
    assert ref._streamer is not None and ref._streamer.loads >= 2 * len(ref.lm.model.layers)
    assert _max(run.logits, r["logits"]) <= 1e-4
    assert run.generated == r["generated"].tolist()


@pytest.mark.oracle
@pytest.mark.slow
def test_single_bos_on_llama3_is_named_at_the_prompt(next_root):
    ref, runs = _original(str(next_root), "llama3")
    run = runs["landscape"]
    assert run.input_ids[:3] == [400, 400, 406]  # <|begin_of_text|> twice (tiny Llama-3: specials from 400)
    single = run.input_ids[1:]
    rep = _compare(ref, "landscape", run, _converted_like(run, input_ids=single, used_ids=single))
    assert rep.first_divergence == "prompt ids"
    assert "one BOS where the authors have two" in rep.hint

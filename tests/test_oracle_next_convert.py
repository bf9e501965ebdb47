"""Oracle tier: conversions of the LLaVA-NeXT repository's families against the authors' own code.

Each case of ``tests/oracle_next/make_reference.py`` (OneVision 0.5b-style tied and 7b-style untied, Interleave,
llama3-llava-next, next-72b-style; built with llavaction 0.0.1 + transformers 4.40.2) is converted once with
``llava-convert convert`` (its SigLIP / CLIP tower config read from the Hub id in ``mm_vision_tower``, served
from the root's HF cache), loaded with transformers 5 in float32, and must reproduce, for every test image,
the authors' pixel values (exactly), prompt ids (exactly, through the converted processor and chat template),
float32 logits (within 1e-4 over the tokenizer's columns: the authors' loader cuts the padded vocabulary to
``len(tokenizer)``) and greedy tokens.

CLIP towers (llama3-llava-next, next-72b): transformers 4.40's eager CLIP attention scales the queries before
``q @ k^T``, transformers 5's after; in float32 that moves the tower's features by ~6e-6 and the logits by up to
~1.8e-4 (transformers' own numerics, not the conversion). The conversion is proven exact by loading it with the
4.40 order for the vision tower (the ``llava_legacy_clip`` attention function, registered with transformers'
``AttentionInterface`` by ``llava_convert.reference``): logits within 1e-4. With transformers 5's default
attention the gap is recorded as a bound (ATOL_CLIP_DEFAULT) and documented in the README's known limitations.

Greedy generation: the releases' generation_config.json (copied verbatim) holds ``repetition_penalty 1.05``,
which the authors' greedy runs keep; their ``generate`` starts from ``inputs_embeds``, so the penalty sees only
the tokens generated so far. The comparison decodes greedily the same way (penalty over the generated tokens,
from the converted generation_config.json), on the converted model's own forward passes with its KV cache.

``LlavaOnevisionProcessor`` cannot be built without torchvision (its video processor); where it is missing,
the OneVision processor is assembled from the converted files (tokenizer, image processor, processor_config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "oracle_next"))

from next_images import test_images_next  # noqa: E402

from llava_convert.check.converted import collapse_image_tokens  # noqa: E402

# Importing it registers the attention function with transformers.
from llava_convert.reference import LEGACY_CLIP_ATTENTION  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

CASES = {
    "ov_05b": ("LlavaOnevisionForConditionalGeneration", "qwen_1_5"),
    "ov_7b": ("LlavaOnevisionForConditionalGeneration", "qwen_1_5"),
    "interleave": ("LlavaNextForConditionalGeneration", "qwen_1_5"),
    "llama3": ("LlavaNextForConditionalGeneration", "llava_llama_3"),
    "next72b": ("LlavaNextForConditionalGeneration", "qwen_1_5"),
}
ATOL = 1e-4
CLIP_CASES = ("llama3", "next72b")
# CLIP towers with transformers 5's default attention: the tower's features differ by ~6e-6 (values up to ~12),
# the logits by up to 1.8e-4 (values up to ~45), from the attention's order of operations alone (see above).
ATOL_CLIP_DEFAULT = 2.5e-4


def _ref(root: Path, case: str) -> dict:
    return torch.load(root / case / "reference.pt", weights_only=True)


def convert_case(root: Path, case: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`llava-convert convert` of a case's original checkpoint, its tower resolved through ROOT/hf-cache."""
    ref = _ref(root, case)
    env = dict(os.environ, HF_HUB_CACHE=str(root / "hf-cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "llava_convert.cli", "convert", str(root / case / ref["checkpoint_dir"]), str(out),
         "--dtype", "float32", "--quiet", *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )


@pytest.fixture(scope="module")
def converted(oracle_next_root, tmp_path_factory):
    """Every case converted once (module scope): {case: output directory}."""
    outs = {}
    base = tmp_path_factory.mktemp("next_convert")
    for case in CASES:
        out = base / case
        proc = convert_case(oracle_next_root, case, out)
        assert proc.returncode == 0, f"{case}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        outs[case] = out
    return outs


def load_processor(out: Path):
    """AutoProcessor, or (no torchvision) the OneVision processor assembled from the converted files."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaOnevisionProcessor

    settings = json.loads((out / "processor_config.json").read_text())
    if settings["processor_class"] != "LlavaOnevisionProcessor":
        return AutoProcessor.from_pretrained(str(out))
    try:
        return AutoProcessor.from_pretrained(str(out))
    except (AttributeError, ImportError, ValueError):  # transformers' video processor needs torchvision
        tok = AutoTokenizer.from_pretrained(str(out))
        proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
        proc.tokenizer, proc.image_processor, proc.video_processor = tok, AutoImageProcessor.from_pretrained(
            str(out)), None
        proc.chat_template = (out / "chat_template.jinja").read_text()
        proc.num_image_tokens = settings["num_image_tokens"]
        proc.vision_feature_select_strategy = settings["vision_feature_select_strategy"]
        proc.vision_aspect_ratio = settings["vision_aspect_ratio"]
        proc.image_token, proc.video_token = settings["image_token"], settings["video_token"]
        proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
        proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
        return proc


def greedy_authors_way(model, inputs, max_new_tokens: int, gen_cfg: dict, n_vocab: int) -> list[int]:
    """Greedy decoding as the authors' `generate(inputs_embeds=...)` with the release's generation config:
    repetition_penalty over the generated tokens only, stop on an eos id, over the first N_VOCAB columns (the
    authors' loader resizes the embeddings to len(tokenizer); the conversion keeps the padded, untrained rows
    as the released config sizes them, which a tiny random model could pick)."""
    penalty = float(gen_cfg.get("repetition_penalty", 1.0))
    eos = gen_cfg.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    out = model(**inputs, use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1, :n_vocab]
    mask = inputs["attention_mask"]
    gen: list[int] = []
    for _ in range(max_new_tokens):
        scores = logits.clone()
        if gen and penalty != 1.0:
            idx = torch.tensor(sorted(set(gen)))
            s = scores[idx]
            scores[idx] = torch.where(s < 0, s * penalty, s / penalty)
        tok = int(scores.argmax())
        gen.append(tok)
        if tok in eos:
            break
        mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
        out = model(input_ids=torch.tensor([[tok]]), attention_mask=mask, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1, :n_vocab]
    return gen


def parity(out: Path, ref: dict, vision_attention: str = "eager") -> dict[str, dict]:
    from transformers import AutoModelForImageTextToText

    processor = load_processor(out)
    # The authors' SigLIP tower (llavaction's own module) computes attention eagerly; transformers 5 defaults to
    # SDPA, whose float32 sums round differently (1e-5 on the tower's features, 1.5e-4 on the logits): the same
    # kernels on both sides, as the oracle's language model runs SDPA.
    attn = {"vision_config": vision_attention, "text_config": "sdpa", "": "sdpa"}
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32, attn_implementation=attn)
    model.eval()
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    image_id = model.config.image_token_index
    images = test_images_next()
    n_vocab = ref["len_tokenizer"]
    report = {}
    for name in ref["image_names"]:
        r = ref["images"][name]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ref["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=images[name], text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        pv, pv_ref = inputs["pixel_values"], r["pixel_values"]
        with torch.no_grad():
            logits = model(**inputs).logits[0, :, :n_vocab]
            gen = greedy_authors_way(model, inputs, ref["max_new_tokens"], gen_cfg, n_vocab)
            # What a user runs: every processor output is an argument generate() accepts.
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        same_pixels = tuple(pv.shape) == tuple(pv_ref.shape)
        report[name] = {
            "ids_equal": collapse_image_tokens(ids, image_id) == r["input_ids"].tolist(),
            "num_image_tokens": ids.count(image_id),
            "num_image_tokens_ref": int(r["num_image_tokens"]),
            "pixel_max_diff": float((pv - pv_ref).abs().max()) if same_pixels else float("inf"),
            "logits_max_diff": float((logits - r["logits"]).abs().max())
            if logits.shape == r["logits"].shape else float("inf"),
            "generated": gen,
            "generated_ref": r["generated"].tolist(),
        }
    return report


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_matches_authors(converted, oracle_next_root, case):
    ref = _ref(oracle_next_root, case)
    out = converted[case]
    cfg = json.loads((out / "config.json").read_text())
    cls, template = CASES[case]
    assert cfg["architectures"] == [cls]
    assert json.loads((out / "provenance.json").read_text()) is not None
    # CLIP cases: the tower attends in transformers 4.40's order, as the authors' stack (exact); see the docstring.
    report = parity(out, ref, LEGACY_CLIP_ATTENTION if case in CLIP_CASES else "eager")
    for img, r in report.items():
        print(f"{case}/{img}: {r['num_image_tokens']} image tokens, pixels max diff {r['pixel_max_diff']}, "
              f"logits max diff {r['logits_max_diff']:.2e}, generated {r['generated']}")
        assert r["ids_equal"], f"{case}/{img}: prompt ids differ from the authors': {r}"
        assert r["num_image_tokens"] == r["num_image_tokens_ref"], f"{case}/{img}: {r}"
        assert r["pixel_max_diff"] == 0.0, f"{case}/{img}: pixel values differ by {r['pixel_max_diff']}"
        assert r["logits_max_diff"] <= ATOL, f"{case}/{img}: logits differ by {r['logits_max_diff']}"
        assert r["generated"] == r["generated_ref"], f"{case}/{img}: greedy generation differs: {r}"


@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_cases_with_transformers_default_attention_stay_within_the_recorded_bound(
    converted, oracle_next_root, case
):
    """The same conversions under transformers 5's own CLIP attention (what a user gets by default): pixels,
    prompt ids and greedy tokens identical, logits within the documented bound of the attention's rounding."""
    ref = _ref(oracle_next_root, case)
    for img, r in parity(converted[case], ref).items():
        print(f"{case}/{img} (default attention): logits max diff {r['logits_max_diff']:.2e}")
        assert r["ids_equal"] and r["pixel_max_diff"] == 0.0, f"{case}/{img}: {r}"
        assert r["logits_max_diff"] <= ATOL_CLIP_DEFAULT, f"{case}/{img}: logits differ by {r['logits_max_diff']}"
        assert r["generated"] == r["generated_ref"], f"{case}/{img}: greedy generation differs: {r}"


def test_chat_template_override(oracle_next_root, tmp_path):
    """`--chat-template` replaces the family's template (ChatML `chatml_direct` instead of `qwen_1_5`)."""
    out = tmp_path / "ov"
    proc = convert_case(oracle_next_root, "ov_05b", out, "--chat-template", "chatml_direct")
    assert proc.returncode == 0, proc.stderr[-3000:]
    processor = load_processor(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nHi?<|im_end|>" \
                     "<|im_start|>assistant\n"


def test_nf4_onevision_loads_and_generates_on_cpu(oracle_next_root, tmp_path):
    """`--quantize nf4` of a OneVision conversion: `from_pretrained(OUT)` gives 4-bit linear layers in the
    language model, and it generates on CPU from the converted processor's inputs."""
    from transformers import AutoModelForImageTextToText

    ref = _ref(oracle_next_root, "ov_05b")
    out = tmp_path / "nf4"
    proc = convert_case(oracle_next_root, "ov_05b", out, "--quantize", "nf4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    processor = load_processor(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ref["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=test_images_next()["landscape"], text=prompt, return_tensors="pt")
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
    new = gen[0, inputs["input_ids"].shape[1]:]
    assert new.numel() >= 1 and (new < cfg["text_config"]["vocab_size"]).all()


def test_onevision_cases_cover_tied_range_untied_list_and_the_interpolation_branch(converted, oracle_next_root):
    """OneVision in three shapes: ov_05b tied with a pinpoint range, ov_7b untied with a pinpoint list, and the
    `large` image, whose unpadded grid exceeds anyres_max_9 by more than 1.1x (the authors' bilinear downscale)."""
    originals = {c: json.loads((oracle_next_root / c / _ref(oracle_next_root, c)["checkpoint_dir"] / "config.json")
                               .read_text()) for c in ("ov_05b", "ov_7b")}
    assert originals["ov_05b"]["tie_word_embeddings"] and isinstance(originals["ov_05b"]["image_grid_pinpoints"], str)
    assert not originals["ov_7b"]["tie_word_embeddings"]
    assert isinstance(originals["ov_7b"]["image_grid_pinpoints"], list)
    cfg = json.loads((converted["ov_05b"] / "config.json").read_text())
    assert len(cfg["image_grid_pinpoints"]) == 36 and cfg["tie_word_embeddings"]
    assert not json.loads((converted["ov_7b"] / "config.json").read_text())["tie_word_embeddings"]
    large = _ref(oracle_next_root, "ov_05b")["images"]["large"]
    cols, rows = (int(x) for x in large["grid"])
    side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    assert cols * rows > 9 * 1.1**2  # the downscale branch: more tiles than anyres_max_9 allows
    undownscaled = (rows * side) * (cols * side + 1) + side * side
    assert int(large["num_image_tokens"]) < undownscaled

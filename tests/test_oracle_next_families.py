"""Oracle tier for the LLaVA-NeXT repository's families (OneVision, Interleave, llama3-llava-next, next-72b).

``tests/oracle_next/make_reference.py`` builds tiny original checkpoints with the authors' own code
(llavaction 0.0.1 + transformers 4.40.2 in ``.venv-oracle-next``) and records what that code makes of them.
These tests check that the records are self-consistent and that they mean what a converter will rely on,
without any converter: the authors' pixels against transformers 5's own image processors, the authors'
image-token counts against transformers 5's processors' arithmetic, the authors' prompts against the literal
template strings and transformers 5's tokenizers, and the checkpoints' on-disk layout against the releases'.

Two quirks of the authors' code are worked around inside the builder (see its docstring): the Llama path of
llavaction needs an adapter around ``prepare_inputs_labels_for_multimodal`` (it returns 7 values, llava_llama.py
unpacks 6), and the Llama-3 template needs ``copy.deepcopy`` of the conversation (``Conversation.copy`` drops
the tokenizer that renders it).
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "oracle_next"))

from next_images import test_images_next  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

CASES = ["ov_05b", "ov_7b", "interleave", "llama3", "next72b"]
SIGLIP_CASES = {"ov_05b", "ov_7b", "interleave"}
QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    "What is shown in this image?<|im_end|>\n<|im_start|>assistant\n"
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown in this image?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@functools.cache
def _load(root: str, case: str) -> dict:
    return torch.load(Path(root) / case / "reference.pt", weights_only=True)


@pytest.fixture(params=CASES)
def case(request, oracle_next_root):
    name = request.param
    ref = _load(str(oracle_next_root), name)
    ckpt = oracle_next_root / name / ref["checkpoint_dir"]
    cfg = json.loads((ckpt / "config.json").read_text())
    return name, ref, ckpt, cfg


def expand_pinpoints(pinpoints, tile: int) -> list[list[int]]:
    """The authors' reading of image_grid_pinpoints: a "(AxB),...,(CxD)" range times the tile size, or a list."""
    if isinstance(pinpoints, str):
        m = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        (a, b), (c, d) = (tuple(map(int, m[0])), tuple(map(int, m[-1])))
        return [[i * tile, j * tile] for i in range(a, c + 1) for j in range(b, d + 1)]
    return [list(p) for p in pinpoints]


def _weights(ckpt: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = (f, tuple(s.get_slice(k).get_shape()))
    return out


# ---------------------------------------------------------------------------------------------------
# Self-consistency of the authors' records
# ---------------------------------------------------------------------------------------------------


def test_records_are_self_consistent(case):
    name, ref, _, cfg = case
    tile = ref["tower"]["image_size"]
    tokens_per_crop = (tile // 14) ** 2  # SigLIP: all 729 patches; CLIP "patch": CLS dropped, 576
    assert ref["logits_vocab"] == ref["len_tokenizer"] <= ref["config_vocab_size"]
    assert set(ref["image_names"]) == set(test_images_next())
    for img, r in ref["images"].items():
        ids = r["input_ids"]
        assert int((ids == -200).sum()) == 1 and int(ids[r["image_token_pos"]]) == -200, img
        gw, gh = r["grid"]
        assert tuple(r["pixel_values"].shape) == (1, 1 + gw * gh, 3, tile, tile), img
        assert tuple(r["vision_features"].shape) == (1 + gw * gh, tokens_per_crop, cfg["mm_hidden_size"]), img
        assert tuple(r["image_features"].shape) == (1 + gw * gh, tokens_per_crop, cfg["hidden_size"]), img
        assert tuple(r["merged_image_features"].shape) == (r["num_image_tokens"], cfg["hidden_size"]), img
        seq = ids.numel() - 1 + r["num_image_tokens"]
        assert tuple(r["logits"].shape) == (seq, ref["logits_vocab"]), img
        assert r["logits"].isfinite().all()
        # Greedy generation continues the recorded forward pass (and stops early only on an eos id).
        n_gen = r["generated"].numel()
        eos = ref["generation_config"]["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        assert n_gen == ref["max_new_tokens"] or int(r["generated"][-1]) in eos, img
        assert not any(int(t) in eos for t in r["generated"][:-1]), img
        torch.testing.assert_close(r["generated_scores"][0], r["logits"][-1], atol=1e-4, rtol=1e-4)
        assert int(r["logits"][-1].argmax()) == int(r["generated"][0])
        assert (r["generated_scores"].argmax(-1) == r["generated"]).all()
        # Decisive enough for a float32 conversion (logits within 1e-4) to reproduce every greedy step.
        assert min(r["generated_margins"]) > 1e-2, (img, r["generated_margins"])


def test_image_paths_cover_the_anyres_branches(oracle_next_root):
    """The OneVision images take every path of anyres_max_9: plain unpad, very wide, and the >1.1 downscale."""
    ref = _load(str(oracle_next_root), "ov_05b")
    feat = 27  # 384 / 14
    for img, r in ref["images"].items():
        gw, gh = r["grid"]
        w, h = r["image_size"]
        cur_h, cur_w = gh * feat, gw * feat
        if w / h > cur_w / cur_h:  # the authors' unpad_image
            new_h = int(h * (cur_w / w))
            cur_h -= 2 * ((cur_h - new_h) // 2)
        else:
            new_w = int(w * (cur_h / h))
            cur_w -= 2 * ((cur_w - new_w) // 2)
        times = math.sqrt(cur_h * cur_w / (9 * feat * feat))
        if times > 1.1:
            cur_h, cur_w = int(cur_h // times), int(cur_w // times)
        assert r["num_image_tokens"] == feat * feat + cur_h * (cur_w + 1), img
        if img == "large":
            assert times > 1.1 and (gw, gh) == (4, 4)
        if img == "wide":
            assert gw >= 5 and gh == 1
    assert {tuple(r["grid"]) for r in ref["images"].values()} >= {(2, 1), (1, 2)}


# ---------------------------------------------------------------------------------------------------
# The checkpoints are laid out like the releases
# ---------------------------------------------------------------------------------------------------


def test_checkpoint_layout_matches_the_release(case, oracle_next_root):
    name, ref, ckpt, cfg = case
    weights = _weights(ckpt)
    index = ckpt / "model.safetensors.index.json"
    if name in ("ov_05b", "interleave"):
        assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"] and not index.exists()
    else:
        assert index.is_file() and len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1
        assert set(json.loads(index.read_text())["weight_map"]) == set(weights)
    assert ("lm_head.weight" in weights) == (not cfg["tie_word_embeddings"])
    assert ref["tied_embeddings"] == cfg["tie_word_embeddings"]
    assert weights["model.embed_tokens.weight"][1] == (cfg["vocab_size"], cfg["hidden_size"])
    assert weights["model.image_newline"][1] == (cfg["hidden_size"],)
    for i in (0, 2):
        assert f"model.mm_projector.{i}.weight" in weights and f"model.mm_projector.{i}.bias" in weights
    tower_keys = {k for k in weights if k.startswith("model.vision_tower.vision_tower.vision_model.")}
    layers = {int(m.group(1)) for k in tower_keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    hub_cfg = _hub_tower_config(oracle_next_root, cfg["mm_vision_tower"])
    if name in SIGLIP_CASES:
        # The authors' SigLIP tower deletes the last encoder layer and replaces the head by Identity.
        assert layers == set(range(hub_cfg["vision_config"]["num_hidden_layers"] - 1))
        assert not any(".head." in k for k in tower_keys)
        assert any(k.endswith("post_layernorm.weight") for k in tower_keys)  # saved, but unused by the authors
    else:
        assert layers == set(range(hub_cfg["vision_config"]["num_hidden_layers"]))
    assert cfg["architectures"] == [ref["model_class"]]
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == ("PreTrainedTokenizerFast" if name == "llama3" else "Qwen2Tokenizer")


def _hub_tower_config(root: Path, repo_id: str) -> dict:
    snap = next((root / "hf-cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    return json.loads((snap / "config.json").read_text())


def _hub_tower_weights(root: Path, repo_id: str) -> dict[str, torch.Tensor]:
    snap = next((root / "hf-cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    with safe_open(str(snap / "model.safetensors"), "pt") as s:
        return {k: s.get_tensor(k) for k in s.keys() if k.startswith("vision_model.")}


def test_trained_towers_differ_from_the_hub_tower_and_frozen_ones_do_not(case, oracle_next_root):
    name, ref, ckpt, cfg = case
    hub = _hub_tower_weights(oracle_next_root, cfg["mm_vision_tower"])
    weights = _weights(ckpt)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    f, _ = weights["model.vision_tower.vision_tower." + key]
    with safe_open(str(f), "pt") as s:
        saved = s.get_tensor("model.vision_tower.vision_tower." + key).float()
    same = torch.equal(saved, hub[key].to(torch.bfloat16).float())
    assert same == (not ref["tower"]["trained"]), name
    assert ("mm_vision_tower" in cfg.get("mm_tunable_parts", "")) == ref["tower"]["trained"]


# ---------------------------------------------------------------------------------------------------
# Independent meaning: transformers 5's processors and tokenizers agree with the authors' records
# ---------------------------------------------------------------------------------------------------


def _hf_image_processor(ref: dict, cfg: dict):
    pinpoints = expand_pinpoints(cfg["image_grid_pinpoints"], ref["tower"]["image_size"])
    if ref["tower"]["image_size"] == 384:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        # SigLIP: 384x384, mean = std = 0.5 (the authors' SigLipImageProcessor), bicubic.
        return LlavaOnevisionImageProcessorPil(
            image_grid_pinpoints=pinpoints, size={"height": 384, "width": 384}, image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # CLIP-336: the tower's preprocessor_config (shortest edge 336, centre crop 336, OpenAI mean/std).
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        do_center_crop=True,
    )


def test_pixels_equal_transformers_image_processors(case):
    """The authors' process_images == transformers 5 (PIL backend), the released (w, h) pinpoints passed unchanged.

    transformers reads pinpoints as (height, width) and the authors as (width, height); every released grid is
    symmetric (each [a, b] comes with [b, a]) so the candidate set is the same, and none of these images ties.
    """
    name, ref, _, cfg = case
    proc = _hf_image_processor(ref, cfg)
    for img, image in test_images_next().items():
        r = ref["images"][img]
        out = proc(images=image, return_tensors="pt")
        assert out["image_sizes"].tolist() == [[image.size[1], image.size[0]]]
        torch.testing.assert_close(out["pixel_values"], r["pixel_values"], atol=0, rtol=0, msg=f"{name}/{img}")


def _hf_num_image_tokens(ref: dict, cfg: dict, image) -> int:
    """transformers 5's processors' own count of image tokens for this image (no model involved)."""
    from types import SimpleNamespace

    proc = _hf_image_processor(ref, cfg)
    w, h = image.size
    tile = ref["tower"]["image_size"]
    if cfg["image_aspect_ratio"].startswith("anyres_max"):
        from transformers.models.llava_onevision.processing_llava_onevision import (
            LlavaOnevisionProcessor as P,
        )

        shim = SimpleNamespace(image_processor=proc, num_image_tokens=(tile // 14) ** 2,
                               vision_aspect_ratio=cfg["image_aspect_ratio"])
    else:
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor as P

        # SigLIP keeps every patch ("full", no CLS); CLIP's "default" strategy drops the CLS token.
        shim = SimpleNamespace(image_processor=proc, patch_size=14, num_additional_image_tokens=0)
    shim._get_unpadded_features = functools.partial(P._get_unpadded_features, shim)
    return P._get_number_of_features(shim, h, w, tile, tile)


def test_image_token_counts_equal_transformers_processors(case):
    """anyres_max_9 -> LlavaOnevisionProcessor's count (vision_aspect_ratio); anyres -> LlavaNextProcessor's.

    Interleave is ``anyres`` + ``spatial_unpad`` (no anyres_max downscale): its count is LlavaNext's arithmetic
    with SigLIP's 729 patches, not plain LLaVA's 729 (which is what llava-hf's conversion of it gives).
    """
    name, ref, _, cfg = case
    for img, image in test_images_next().items():
        assert ref["images"][img]["num_image_tokens"] == _hf_num_image_tokens(ref, cfg, image), f"{name}/{img}"


def test_prompts_are_the_authors_templates_and_tokenize_alike_in_transformers5(case, oracle_next_root):
    name, ref, ckpt, cfg = case
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = ref["images"]["landscape"]["input_ids"].tolist()
    assert all(torch.equal(r["input_ids"], ref["images"]["landscape"]["input_ids"]) for r in ref["images"].values())
    pos = ids.index(-200)
    before, after = ref["prompt"].split("<image>")
    if name == "llama3":
        assert ref["conv_mode"] == "llava_llama_3" and ref["prompt"] == LLAMA3_PROMPT
        # The template is rendered by the (cached) Meta-Llama-3-8B-Instruct chat template...
        snap = next((oracle_next_root / "hf-cache" / "models--meta-llama--Meta-Llama-3-8B-Instruct" / "snapshots")
                    .iterdir())
        meta = AutoTokenizer.from_pretrained(str(snap))
        rendered = meta.apply_chat_template(
            [{"role": "system", "content": LLAMA3_SYSTEM},
             {"role": "user", "content": "<image>\nWhat is shown in this image?"}],
            tokenize=False, add_generation_prompt=True,
        )
        assert rendered == ref["prompt"]
        # ...which already starts with <|begin_of_text|>, and the tokenizer adds another: the authors' ids
        # start with TWO BOS tokens (tokenizer_image_token keeps the first chunk's BOS, then the chunk's own).
        bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
        assert ids[:3] == [bos, bos, tok.convert_tokens_to_ids("<|start_header_id|>")]
        assert ids[:pos] == tok(before).input_ids
        assert ids[pos + 1:] == tok(after).input_ids[1:]  # later chunks drop their BOS
    else:
        assert ref["conv_mode"] == "qwen_1_5" and ref["prompt"] == QWEN_PROMPT
        assert tok.bos_token is None
        assert ids[:pos] + ids[pos + 1:] == tok(before).input_ids + tok(after).input_ids
        assert ids[pos - 1] == ids[pos + 1] == tok("\n").input_ids[0]
    assert len(tok) == ref["len_tokenizer"]

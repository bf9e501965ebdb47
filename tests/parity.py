"""Compare a converted checkpoint with the authors' recorded outputs (oracle references)."""

from __future__ import annotations

from pathlib import Path

import torch
from images import test_images

from llava_convert.authors.tokenizer import IMAGE_TOKEN_INDEX
from llava_convert.check.converted import collapse_image_tokens


def load_converted(hf_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return processor, model


def authors_spelling(prompt: str, tokenizer) -> str:
    """A converted template's prompt in the authors' spelling: without the BOS it writes first (the authors'
    tokenizer adds it) and the spaces it writes where the authors tokenize a fresh string (authors.tokenizer.PromptStyle)."""
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :].removeprefix(" ")
    return prompt.replace("<image> \n", "<image>\n")


def chat(turns: list[str]) -> list[dict]:
    """Messages for alternating user / assistant TURNS, the image in the first user turn."""
    msgs = []
    for i, text in enumerate(turns):
        content = [{"type": "text", "text": text}]
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": ([{"type": "image"}] if i == 0 else []) + content})
    return msgs


def with_image_index(ids: list[int], image_id: int) -> list[int]:
    """Prompt ids with `<image>` as the authors' -200 (the tokenizer alone does not expand it)."""
    return [IMAGE_TOKEN_INDEX if t == image_id else t for t in ids]


def parity_report(hf_dir: Path, case_dir: Path) -> dict[str, dict]:
    """Per image: prompt, prompt ids, pixel values, logits and greedy generation against the authors'."""
    ref = torch.load(case_dir / "reference.pt", weights_only=True)
    processor, model = load_converted(hf_dir)
    images = test_images(ref["image_names"])
    image_id = model.config.image_token_index
    report = {}
    for name in ref["image_names"]:
        r = ref["images"][name]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ref["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=images[name], text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0]
        pv = inputs["pixel_values"]
        pv_ref = r["pixel_values"]
        with torch.no_grad():
            logits = model(**inputs).logits[0, :, : r["logits"].shape[1]]
            gen = model.generate(**inputs, max_new_tokens=ref["max_new_tokens"], do_sample=False)
        gen = gen[0, ids.shape[0] :]
        report[name] = {
            "prompt_equal": authors_spelling(prompt, processor.tokenizer) == ref["prompt"],
            "ids_equal": collapse_image_tokens(ids.tolist(), image_id) == r["input_ids"].tolist(),
            # vLLM's chat server: the rendered prompt tokenized without special tokens
            "server_ids_equal": with_image_index(
                processor.tokenizer(prompt, add_special_tokens=False).input_ids, image_id
            ) == r["input_ids"].tolist(),
            "num_image_tokens": int((ids == image_id).sum()),
            "num_image_tokens_ref": int(r["num_image_tokens"]),
            "pixel_shape_equal": tuple(pv.reshape(-1, *pv.shape[-3:]).shape) == tuple(pv_ref.reshape(-1, *pv_ref.shape[-3:]).shape),
            "pixel_max_diff": float((pv.reshape(pv_ref.shape) - pv_ref).abs().max()) if pv.numel() == pv_ref.numel() else float("inf"),
            "logits_shape_equal": tuple(logits.shape) == tuple(r["logits"].shape),
            "logits_max_diff": float((logits - r["logits"]).abs().max()) if logits.shape == r["logits"].shape else float("inf"),
            "generated": gen.tolist(),
            "generated_ref": r["generated"].tolist(),
        }
    return report


def assert_parity(hf_dir: Path, case_dir: Path, *, atol: float = 1e-4) -> dict[str, dict]:
    report = parity_report(hf_dir, case_dir)
    for name, r in report.items():
        assert r["prompt_equal"], f"{name}: chat template renders a different prompt"
        assert r["ids_equal"], f"{name}: prompt ids differ from the authors' tokenizer_image_token"
        assert r["server_ids_equal"], f"{name}: prompt ids without special tokens differ from the authors'"
        assert r["num_image_tokens"] == r["num_image_tokens_ref"], f"{name}: {r}"
        assert r["pixel_max_diff"] == 0.0, f"{name}: pixel_values differ by {r['pixel_max_diff']}"
        assert r["logits_max_diff"] <= atol, f"{name}: logits differ by {r['logits_max_diff']}"
        assert r["generated"] == r["generated_ref"], f"{name}: greedy generation differs: {r}"
    return report

"""Oracle tier: a 3-turn chat with the image in the first user turn gives exactly the authors' prompt ids
(`tokenizer_image_token` over `Conversation.get_prompt()`), on every path a converted checkpoint is prompted:
`apply_chat_template` + processor (transformers), the rendered prompt tokenized without special tokens
(vLLM's chat server), and `apply_chat_template(tokenize=True)`."""

from __future__ import annotations

import pytest
import torch
from images import test_images
from parity import authors_spelling, chat, with_image_index

from llava_convert.check.converted import collapse_image_tokens
from llava_convert.convert import convert

pytestmark = [pytest.mark.oracle, pytest.mark.slow]


def _checkpoint(case_dir):
    (ckpt,) = [p for p in case_dir.iterdir() if p.is_dir() and p.name.startswith("llava")]
    return ckpt


@pytest.mark.parametrize(
    ("case", "template"),
    [
        ("v15", "llava_v1"),
        ("llama2", "llava_llama_2"),
        ("v16_mistral", "mistral_instruct"),
        ("v16_vicuna", "llava_v1"),
        ("v16_34b", "chatml_direct"),
        ("selftrained", "llava_v1"),  # <im_start><image><im_end>
    ],
)
def test_multi_turn_ids_match_authors(oracle_case, tmp_path, case, template):
    from transformers import AutoProcessor

    case_dir = oracle_case(case)
    ckpt = case_dir / "llava-v1.5-tiny-imstart" / "checkpoint-3" if case == "selftrained" else _checkpoint(case_dir)
    out = tmp_path / "hf"
    plan = convert(ckpt, out, progress=False)
    assert plan.chat_template == template
    ref = torch.load(case_dir / "reference.pt", weights_only=True)
    mt = ref["multi_turn"]
    want = mt["input_ids"].tolist()
    assert len(mt["turns"]) == 5 and want.count(-200) == 1

    processor = AutoProcessor.from_pretrained(str(out))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    messages = chat(mt["turns"])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert authors_spelling(prompt, tok) == mt["prompt"]

    inputs = processor(images=test_images()["landscape"], text=prompt, return_tensors="pt")
    assert collapse_image_tokens(inputs["input_ids"][0].tolist(), image_id) == want
    assert with_image_index(tok(prompt, add_special_tokens=False).input_ids, image_id) == want
    with_pixels = [dict(m, content=list(m["content"])) for m in messages]
    with_pixels[0]["content"][0] = {"type": "image", "image": test_images()["landscape"]}
    out_ids = processor.apply_chat_template(with_pixels, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert collapse_image_tokens(list(out_ids["input_ids"][0]), image_id) == want
    # The single-turn prompt of the same tokenizer is exact too (one setting for both).
    single = processor.apply_chat_template(chat([ref["question"]]), add_generation_prompt=True)
    assert with_image_index(tok(single).input_ids, image_id) == ref["images"]["landscape"]["input_ids"].tolist()

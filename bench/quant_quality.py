"""Quantization quality on a tiny seeded LLaVA: KL divergence and top-1 agreement of each quant type and
skip policy against the unquantized conversion (float32 logits over the original vocabulary, three images).

    .venv/bin/python bench/quant_quality.py

Prints a markdown table (the README's "Quantization quality" table comes from this script).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "oracle")]

import builders  # noqa: E402

# bitsandbytes' CPU 4-bit matmul needs in_features to be a multiple of the block size (64).
builders.V_HIDDEN, builders.V_INTER = 64, 128

from images import test_images  # noqa: E402

from llava_convert.convert import convert  # noqa: E402
from llava_convert.quantize import DEFAULT_SKIP, QuantSpec  # noqa: E402

QUESTION = "What is shown in this image? Describe the picture in detail."
POLICIES = {
    "keep vision tower, projector, lm_head (default)": DEFAULT_SKIP,
    "keep lm_head only": ("lm_head",),
    "keep vision tower + projector": ("vision_tower", "multi_modal_projector"),
    "quantize everything": (),
}


def logits(model_dir: Path, processor, quantized: bool) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    kw = {} if quantized else {"dtype": torch.float32}
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), **kw).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    out = []
    for image in test_images().values():
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            out.append(model(**inputs).logits[0, :, : builders.VOCAB].float())
    return torch.cat(out)


def figures(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return kl, top1


def main() -> None:
    from transformers import AutoProcessor

    root = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        ckpt = builders.write_original(root)
        convert(ckpt, root / "fp16", progress=False)
        processor = AutoProcessor.from_pretrained(str(root / "fp16"))
        ref = logits(root / "fp16", processor, quantized=False)
        print("| quant | policy | KL(fp16 ‖ quant) | top-1 agreement |")
        print("|---|---|---|---|")
        for qt in ("int8", "nf4", "fp4"):
            for name, skip in POLICIES.items():
                out = root / f"{qt}-{len(skip)}"
                convert(ckpt, out, progress=False, quantize=QuantSpec(qt, skip_modules=skip))
                kl, top1 = figures(ref, logits(out, processor, quantized=True))
                print(f"| {qt} | {name} | {kl:.4f} | {top1:.3f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

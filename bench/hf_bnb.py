"""transformers' own bitsandbytes path on CPU: load-quantize a converted checkpoint, then save it.

    .venv/bin/python bench/hf_bnb.py HF_DIR OUTPUT --bits 4 [--skip-modules-from QUANTIZED_DIR/config.json]

`LlavaForConditionalGeneration.from_pretrained(HF_DIR, quantization_config=BitsAndBytesConfig(...),
device_map="cpu")` quantizes every Linear with bitsandbytes' CPU backend while loading; `save_pretrained`
then writes the pre-quantized checkpoint. 4-bit uses nf4 with double quant, blocksize 64 and float16
compute, as `llava-convert convert --quantize nf4` does by default. `--skip-modules-from` copies
`llm_int8_skip_modules` from a checkpoint that llava-convert quantized, so both sides quantize the same
Linears (without it transformers uses its default skip list).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--skip-modules-from", type=Path, default=None)
    args = ap.parse_args()
    phases: dict[str, float] = {}
    t0 = t = time.perf_counter()

    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    phases["imports"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    skip = None
    if args.skip_modules_from is not None:
        skip = json.loads(args.skip_modules_from.read_text())["quantization_config"]["llm_int8_skip_modules"]
    if args.bits == 4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
            llm_int8_skip_modules=skip,
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = LlavaForConditionalGeneration.from_pretrained(
        str(args.hf_dir), quantization_config=q, device_map="cpu", dtype=torch.float16
    )
    phases["load+quantize"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    model.save_pretrained(str(args.output))
    phases["save"] = round(time.perf_counter() - t, 2)
    phases["total"] = round(time.perf_counter() - t0, 2)
    n4 = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    print(json.dumps({"phases": phases, "quantized_linears": n4, "skip_modules": skip}))


if __name__ == "__main__":
    main()

"""Run converted checkpoints the way a user of one transformers version does, many cases in one process.

    PYTHON tests/compat/driver.py JOBS.json RESULTS.pt

Run by the compatibility environment's interpreter (transformers 4.57, or 4.39 / 4.36 with `"mode": "old"`)
and imported by the main one (transformers 5), so that both sides run the same steps. Each job::

    {"name": ..., "dir": converted checkpoint, "arch": "llava" | "llava_next", "mode": "full" | "old",
     "messages": chat messages, "image": a name from tests/oracle/images.py, "max_new_tokens": 8,
     "quantized": false, "pixel_values_from": optional .pt file whose pixel values the model gets instead}

"full": `AutoProcessor` (chat template, image processor, `<image>` expansion) + the model class.
"old": the versions before processors carried chat templates and expanded `<image>` (4.36 for llava, 4.39
for llava_next): `AutoTokenizer` + its `apply_chat_template` with chat_template.json, the image processor
class, and the model, which splices the image features in itself.

Results (torch.save, a dict name -> dict): version, classes, prompt, input_ids, server_ids (the rendered
prompt tokenized without special tokens, as vLLM's chat server does), own_pixel_values (the image
processor's), pixel_values (what the model got), logits (float32), generated; or error (the exception,
one line) when a step fails.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "oracle"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def _model_class(arch: str):
    import transformers

    name = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}[arch]
    return getattr(transformers, name)


def _load_model(job: dict):
    import torch
    import transformers

    kwargs = {}
    if not job.get("quantized"):
        key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        kwargs[key] = torch.float32
    return _model_class(job["arch"]).from_pretrained(job["dir"], **kwargs).eval()


def _full(job: dict, image) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(job["dir"])
    prompt = processor.apply_chat_template(job["messages"], add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    server = processor.tokenizer(prompt, add_special_tokens=False).input_ids
    return {
        "classes": [type(processor).__name__, type(processor.tokenizer).__name__,
                    type(processor.image_processor).__name__],
        "prompt": prompt,
        "server_ids": list(server),
        "inputs": dict(inputs),
    }


def _old(job: dict, image) -> dict:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor

    d = Path(job["dir"])
    tok = AutoTokenizer.from_pretrained(str(d))
    template = json.loads((d / "chat_template.json").read_text())["chat_template"]
    prompt = tok.apply_chat_template(job["messages"], chat_template=template, tokenize=False,
                                     add_generation_prompt=True)
    # LlavaImageProcessor (the authors' pad) came later; the llava image processor of these versions is CLIP's.
    ip = CLIPImageProcessor.from_pretrained(str(d)) if job["arch"] == "llava" else AutoImageProcessor.from_pretrained(str(d))
    inputs = dict(tok(prompt, return_tensors="pt"))
    inputs.update(ip(image, return_tensors="pt"))
    return {
        "classes": [None, type(tok).__name__, type(ip).__name__],
        "prompt": prompt,
        "server_ids": tok(prompt, add_special_tokens=False).input_ids,
        "inputs": inputs,
    }


def run_job(job: dict) -> dict:
    import torch
    import transformers
    from images import test_images

    image = test_images()[job["image"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = "processor"
        try:
            got = (_old if job.get("mode") == "old" else _full)(job, image)
            step = "model"
            model = _load_model(job)
            inputs = got.pop("inputs")
            got["own_pixel_values"] = inputs["pixel_values"].float()
            if job.get("pixel_values_from"):
                inputs["pixel_values"] = torch.load(job["pixel_values_from"], weights_only=True)
            if not job.get("quantized"):
                inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()
                gen = model.generate(**inputs, max_new_tokens=job.get("max_new_tokens", 8), do_sample=False)
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the version and step
            return {"version": transformers.__version__, "error": f"{step}: {type(e).__name__}: {e}".splitlines()[0]}
    n = inputs["input_ids"].shape[1]
    return {
        "version": transformers.__version__,
        **got,
        "input_ids": inputs["input_ids"][0].tolist(),
        "pixel_values": inputs["pixel_values"].float(),
        "logits": logits,
        "generated": gen[0, n:].tolist() if gen.shape[1] > n else gen[0].tolist(),
    }


def main(argv: list[str]) -> int:
    import torch

    torch.manual_seed(0)
    jobs = json.loads(Path(argv[0]).read_text())
    results = {job["name"]: run_job(job) for job in jobs}
    torch.save(results, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

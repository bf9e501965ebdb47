"""The original side of `check`: the authors' forward pass (`reference.ReferenceModel`) on every image, its
stage outputs kept on the CPU so the model can be freed before the converted one loads; and what of that
side is the converter's own code, which `check` therefore cannot test (the report says so)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..authors.config import authors_siglip_fields
from ..authors.images import expand_pinpoints
from ..authors.templates import authors_prompt, choose_chat_template
from ..authors.tokenizer import IMAGE_TOKEN_INDEX, authors_added_tokens, tokenizer_load_kwargs
from ..errors import LlavaConvertError
from ..original import open_original
from ..original.merge import read_tensors
from ..readers import read_checkpoint
from ..reference import ImageStages, ReferenceModel, clip_vision_state
from .report import SharedPart


@dataclass
class OriginalRun:
    """What the original side recorded for one image."""

    prompt: str
    input_ids: list[int]
    stages: ImageStages
    inputs_embeds: torch.Tensor
    layers: list[torch.Tensor]
    norm: torch.Tensor
    logits: torch.Tensor
    generated: list[int]
    image_pos: int
    image_tokens: int


def run_original(
    ref: ReferenceModel, images: list[tuple[str, Image.Image]], question: str, max_new_tokens: int
) -> list[OriginalRun]:
    """Run the reference on every image; returns CPU tensors only (the model can be freed afterwards)."""
    prompt = ref.prompt(question)
    ids = ref.input_ids(prompt)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise LlavaConvertError(
            f"--prompt must not contain <image> itself (the prompt has {ids.count(IMAGE_TOKEN_INDEX)})"
        )
    runs = []
    for _, image in images:
        stages = ref.encode(image)
        embeds = ref.embed(ids, stages.merged)
        fw = ref.forward(embeds)
        gen = ref.generate(embeds, max_new_tokens)
        runs.append(
            OriginalRun(
                prompt,
                ids,
                stages,
                fw.inputs_embeds,
                fw.layers,
                fw.norm,
                fw.logits,
                gen,
                ids.index(IMAGE_TOKEN_INDEX),
                stages.merged.shape[0],
            )
        )
    return runs


_PRECISION = {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def storage_downcast(ref: ReferenceModel, converted: Path) -> str | None:
    """Which original weights the converted checkpoint stores in a narrower float type, if any."""
    try:
        conv = read_checkpoint(converted)
    except LlavaConvertError:
        return None
    conv_bits = min((_PRECISION.get(r.dtype, 64) for r in conv.values() if r.dtype.is_floating_point), default=64)
    groups: dict[str, int] = {}
    sources = [("language model", ref.ckpt.path, None)]
    tower = getattr(ref, "tower", None)
    if tower is not None and getattr(tower, "weight_files", None):
        sources.append(("vision tower", tower.path, tower.weight_files))
    for label, path, files in sources:
        try:
            refs = read_checkpoint(path, files=files)
        except LlavaConvertError:
            continue
        bits = max((_PRECISION.get(r.dtype, 0) for r in refs.values() if r.dtype.is_floating_point), default=0)
        groups[label] = bits
    lossy = [label for label, bits in groups.items() if bits > conv_bits]
    return " and ".join(lossy) + " weights" if lossy else None

# ----------------------------------------------------------------------------------------------------------
# What the original side shares with the converter
# ----------------------------------------------------------------------------------------------------------


def _qualname(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


_ORACLE = "the oracle tier (the authors' own code) covers it"
_MERGES = {  # form -> (the part, what it does)
    "lora": ("the LoRA merge", "the adapter merged into the base LLM, as PEFT's merge_and_unload"),
    "projector": ("the projector-only assembly", "the pretrain-stage projector put on the base LLM"),
    "delta": ("the delta addition", "the delta weights added to the base LLM"),
}


def shared_parts(ref: ReferenceModel) -> list[SharedPart]:
    """The parts of REF's side that run the converter's own code: a bug there shows on both sides alike, so
    the check passes over it. Always the authors/ templates and tokenizer rules and the CLIP tower's key table; for a LoRA adapter,
    a projector-only checkpoint or delta weights also the merge that builds the authors' loader's model; for
    the LLaVA-NeXT families also their recognition, SigLIP tower description and pinpoint range reading."""
    parts = []
    if ref.ckpt.form in _MERGES:
        part, what = _MERGES[ref.ckpt.form]
        parts.append(
            SharedPart(
                part,
                (_qualname(read_tensors),),
                f"{what} by the converter's own code on the original side too, so a merge bug is not caught "
                f"here; {_ORACLE}",
            )
        )
    parts.append(
        SharedPart(
            "the authors' templates and tokenizer rules",
            tuple(_qualname(f) for f in (choose_chat_template, authors_prompt, tokenizer_load_kwargs,
                                         authors_added_tokens)),
            "both sides take the conversation template, its choice, the tokenizer settings and the added "
            f"tokens from the same authors/ package, so a mistake there is not caught here; {_ORACLE}",
        )
    )
    if ref.ckpt.family:
        parts.append(
            SharedPart(
                "the LLaVA-NeXT family's reading",
                tuple(_qualname(f) for f in (open_original, authors_siglip_fields, expand_pinpoints)),
                "both sides recognise the family (its template, SigLIP or CLIP), describe the SigLIP tower minus "
                "its last layer and expand range pinpoints with the same code, so a mistake there is not caught "
                f"here; {_ORACLE}",
            )
        )
    parts.append(
        SharedPart(
            "the CLIP tower's key names",
            (_qualname(clip_vision_state), "mappings/clip.toml"),
            "the tower is read through the converter's table, so a tower key mapped wrong is not caught "
            f"here; {_ORACLE}",
        )
    )
    return parts

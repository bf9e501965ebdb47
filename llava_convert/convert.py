"""`convert`: an original LLaVA checkpoint directory -> a Hugging Face llava / llava_next directory.

Plan first (pure: names, shapes, dtypes, shards, validated against the target model), then stream.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import transforms
from .errors import LlavaConvertError
from .forms import open_source, read_tensors
from .hfconfig import Vocab, llava_config
from .logs import quiet
from .mapping import MapResult, PlanEntry, check_targets, load_table, map_tensors, raise_if
from .processor import chat_template_name, plan_tokens
from .quantize import QuantSpec, quantize_tensor, should_quantize
from .readers import TensorRef, read_checkpoint
from .source import OriginalCheckpoint, VisionTower, find_vision_tower, read_json
from .target import build_target
from .writer import assign_shards, staged_output, write_shards

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EMBED_KEY = "model.embed_tokens.weight"


@dataclass
class Plan:
    """Everything `convert` will write, decided before any tensor is read."""

    source: OriginalCheckpoint
    tower: VisionTower
    vocab: Vocab
    config: dict[str, Any]
    entries: list[PlanEntry]
    index: dict[str, Any]
    dtype: torch.dtype
    chat_template: str
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def facts(self) -> dict[str, Any]:
        return {
            "architecture": self.source.architecture,
            "projector": self.source.projector_type,
            "vision_from": "checkpoint" if self.source.tower_in_checkpoint else "tower",
        }

    def summary(self) -> dict[str, Any]:
        return {
            "source": str(self.source.path),
            "form": self.source.form,
            "backbone": self.source.backbone,
            "facts": self.facts,
            "target": self.config["architectures"][0],
            "vision_tower": str(self.tower.path),
            "vocab": {
                "original": self.vocab.original,
                "image_token_id": self.vocab.image_token_id,
                "pad_token_id": self.vocab.pad_token_id,
                "padded": self.vocab.padded,
            },
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template": self.chat_template,
            "total_bytes": self.index["metadata"]["total_size"],
            "shards": sorted({e.shard for e in self.entries}),
            "tensors": [e.describe() for e in self.entries],
            "dropped": [{"source": k, "rule": r} for k, r in self.dropped],
            "warnings": self.warnings,
        }


def _output_dtype(tensors: dict[str, TensorRef], dtype: str) -> torch.dtype:
    if dtype == "auto":
        return tensors[EMBED_KEY].dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise LlavaConvertError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}") from None


def plan_conversion(
    source: Path | str,
    *,
    base: Path | str | None = None,
    revision: str | None = None,
    delta: bool | None = None,
    vision_tower: Path | str | None = None,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    chat_template: str | None = None,
    quantize: QuantSpec | None = None,
) -> Plan:
    """Plan the conversion of an original checkpoint, validating it completely; reads no tensor data
    (but the final norm weight, a few KB, to tell delta weights from full ones).

    SOURCE may be any form of original checkpoint (full, LoRA, projector-only, delta; see forms.py), given
    as a directory or a Hub repo id; `base` is the base LLM the last three need.

    Raises:
        LlavaConvertError: bad input (missing files, unsupported configuration, unmapped keys, shape mismatches).
    """
    ckpt = open_source(source, base=base, revision=revision, delta=delta)
    tower = find_vision_tower(ckpt, vision_tower)
    tensors, form_warnings = read_tensors(ckpt)
    if EMBED_KEY not in tensors:
        raise LlavaConvertError(f"{ckpt.path}: no {EMBED_KEY} in the checkpoint weights")
    rows = tensors[EMBED_KEY].shape[0]
    cfg_vocab = ckpt.config.get("vocab_size")
    if cfg_vocab is not None and cfg_vocab != rows:
        raise LlavaConvertError(
            f"{ckpt.path / 'config.json'}: vocab_size {cfg_vocab} disagrees with {EMBED_KEY} "
            f"{tuple(tensors[EMBED_KEY].shape)} in {tensors[EMBED_KEY].path.name}"
        )
    vocab = plan_tokens(ckpt, rows)
    out_dtype = _output_dtype(tensors, dtype)
    config = llava_config(ckpt, tower, vocab)
    config["dtype"] = config["torch_dtype"] = str(out_dtype).replace("torch.", "")

    facts = {
        "architecture": ckpt.architecture,
        "projector": ckpt.projector_type,
        "vision_from": "checkpoint" if ckpt.tower_in_checkpoint else "tower",
    }
    problems: list[str] = []
    results: list[MapResult] = [map_tensors(tensors, load_table("llava.toml"), facts, problems)]
    if not ckpt.tower_in_checkpoint:
        tower_tensors = read_checkpoint(tower.path, origin="vision_tower", files=tower.weight_files)
        results.append(map_tensors(tower_tensors, load_table("clip.toml"), facts, problems))
    raise_if(problems)
    entries = [e for r in results for e in r.entries]

    target = build_target(config)
    expected = target.expected_on_disk([e.target for e in entries])
    ctx = {"vocab": vocab}
    for e in entries:
        src_shapes = [s.shape for s in e.sources]
        try:
            if e.transform:
                e.shape = transforms.get(e.transform).shape(src_shapes, ctx, expected.get(e.target))
            else:
                e.shape = src_shapes[0]
        except LlavaConvertError as err:
            src = e.sources[0] if e.sources else None
            where = f"{src.name} in {src.path.name}" if src else e.target
            problems.append(f"{where} ({e.rule}): {err}")
            continue
        floating = not e.sources or e.sources[0].dtype.is_floating_point
        e.dtype = out_dtype if floating else e.sources[0].dtype
    raise_if(problems)
    raise_if(check_targets(entries, expected, target.class_name))

    apply_quantization(entries, config, quantize)
    # Write in source-file order: reads stay sequential (readahead works), as fast as a plain copy.
    entries.sort(key=_source_order)
    index = assign_shards(entries, max_shard_size)
    return Plan(
        source=ckpt,
        tower=tower,
        vocab=vocab,
        config=config,
        entries=entries,
        index=index,
        dtype=out_dtype,
        chat_template=chat_template_name(ckpt, chat_template),
        dropped=[d for r in results for d in r.dropped],
        warnings=form_warnings + [w for r in results for w in r.warnings],
    )


def apply_quantization(entries: list[PlanEntry], config: dict[str, Any], spec: QuantSpec | None) -> None:
    """Mark the weights the policy quantizes and record `quantization_config` in the config."""
    if spec is None:
        return
    spec.validate()
    for e in entries:
        if should_quantize(e.target, tuple(e.shape), spec):
            e.quant = spec
    config["quantization_config"] = spec.config()


def _source_order(e: PlanEntry) -> tuple:
    if not e.sources:
        return (1, "", 0, e.target)
    src = e.sources[0]
    # Names, not absolute paths: the same checkpoint gives the same bytes wherever it lies (local, Hub cache).
    path = getattr(src, "path", None)
    return (0, getattr(src, "origin", ""), path.name if path else "", getattr(src, "offset", 0), e.target)


def compute_entry(e: PlanEntry, ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One entry's output tensors, materialised: read, transform, cast, and quantize if planned.

    For an entry that `appends` to its source, only the appended rows (the writer copies the rest)."""
    tensors = [s.load() for s in e.sources]
    if e.appends:
        return {e.target: transforms.get(e.transform).tail(tensors, ctx, e.shape)}
    if e.transform:
        t = transforms.get(e.transform).apply(tensors, ctx, e.shape)
    else:
        (t,) = tensors
    t = t.to(e.dtype).contiguous() if t.dtype != e.dtype else t.contiguous()
    if e.quant is not None:
        return quantize_tensor(e.target, t, e.quant)
    return {e.target: t}


def _generation_config(plan: Plan) -> dict[str, Any]:
    """Only what generation needs: BOS, EOS (the original's generation_config.json, else its config) and
    `<pad>`. Length limits and sampling settings of the original (`max_length`) are not carried over: they
    were training-time values, and transformers would apply them to every `generate` call."""
    src = plan.source.tokenizer_dir / "generation_config.json"  # the base LLM's for LoRA / projector-only
    orig = read_json(src) if src.is_file() else {}
    text = plan.config["text_config"]
    gen = {
        "bos_token_id": orig.get("bos_token_id", text.get("bos_token_id")),
        "eos_token_id": orig.get("eos_token_id", text.get("eos_token_id")),
        "pad_token_id": plan.vocab.pad_token_id,
    }
    return {k: v for k, v in gen.items() if v is not None}


def write_metadata(plan: Plan, out: Path) -> None:
    """config.json, generation_config.json, tokenizer and processor files."""
    from .processor import build_processor, write_tokenizer_files

    (out / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(plan), indent=2) + "\n")
    with quiet():
        processor = build_processor(plan.source, plan.tower, plan.vocab, plan.config, chat_template=plan.chat_template)
        processor.save_pretrained(str(out))
    write_tokenizer_files(processor, out, plan.source.tokenizer_dir)


def execute(plan: Plan, output: Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write a planned conversion to OUTPUT atomically."""
    from tqdm import tqdm

    output = Path(output)
    total = plan.index["metadata"]["total_size"]
    ctx = {"vocab": plan.vocab}
    with staged_output(output, force=force) as staging:
        # Tokenizer and processor first: they fail fast on a bad tokenizer, before gigabytes are written.
        write_metadata(plan, staging)
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
            file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            written = write_shards(plan.entries, staging, lambda e: compute_entry(e, ctx), bar.update)
        plan.index["metadata"]["total_size"] = written
        shards = {e.shard for e in plan.entries}
        if len(shards) > 1:
            (staging / "model.safetensors.index.json").write_text(json.dumps(plan.index, indent=2) + "\n")
    return output


def convert(
    source: Path | str,
    output: Path | str,
    *,
    base: Path | str | None = None,
    revision: str | None = None,
    delta: bool | None = None,
    vision_tower: Path | str | None = None,
    dtype: str = "auto",
    max_shard_size: int | str = "5GB",
    chat_template: str | None = None,
    quantize: QuantSpec | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Plan:
    """Convert an original LLaVA checkpoint directory to a Hugging Face directory.

    Args:
        source: the original checkpoint: a directory or Hub repo id, in any form (full, LoRA adapter,
            projector-only, delta; see forms.py).
        output: directory to create; written atomically (a failed run leaves nothing behind).
        base: the base LLM (directory or Hub repo id) a LoRA / projector-only / delta SOURCE is applied to.
        revision: Hub revision of SOURCE.
        delta: force (True) or rule out (False) reading SOURCE as delta weights; default: by its name.
        vision_tower: CLIP directory or Hub repo id; default: the config's `mm_vision_tower`.
        dtype: "auto" (the checkpoint's own), "float16", "bfloat16" or "float32".
        max_shard_size: largest shard, e.g. "5GB" or a byte count.
        chat_template: one of the authors' conversation modes; default: the authors' choice for the name.
        quantize: write Linear weights bitsandbytes-quantized (int8, nf4, fp4) as the spec says.
        dry_run: plan and validate only; write nothing.
        force: replace an existing OUTPUT.
        progress: show a progress bar on stderr.

    Returns:
        The executed (or, with `dry_run`, only validated) `Plan`.

    Raises:
        LlavaConvertError: bad input; nothing is written.

    Example:
        >>> convert("llava-v1.5-7b", "llava-1.5-7b-hf", vision_tower="clip-vit-large-patch14-336")
    """
    plan = plan_conversion(
        source, base=base, revision=revision, delta=delta, vision_tower=vision_tower, dtype=dtype,
        max_shard_size=max_shard_size, chat_template=chat_template, quantize=quantize,
    )
    if not dry_run:
        execute(plan, Path(output), force=force, progress=progress)
    return plan

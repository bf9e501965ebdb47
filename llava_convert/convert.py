"""`convert`: an original LLaVA checkpoint directory -> a Hugging Face llava / llava_next directory.

Plan first (pure: names, shapes, dtypes, shards, validated against the target model), then stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import transforms
from .authors.templates import choose_chat_template
from .card import convert_facts, in_background, write_card
from .errors import LlavaConvertError
from .hfconfig import llava_config
from .layouts import EMBED_KEY, LM_HEAD_KEY
from .logs import quiet
from .mapping import MapResult, check_targets, load_table, map_tensors, raise_if
from .original import open_original, read_json
from .original.merge import read_tensors
from .original.tower import find_vision_tower
from .plan import DTYPES, Plan, PlanEntry, TensorSource, apply_quantization, compute_entry, source_order
from .processor import (
    build_next_processor,
    build_processor,
    plan_tokens,
    write_next_processor,
    write_tokenizer_files,
)
from .quantize import QuantSpec
from .readers import read_checkpoint
from .target import build_target
from .validate import check_llm_against_tensors, check_tower_against
from .writer import Provenance, assign_shards, staged_output, write_shards


def _output_dtype(tensors: dict[str, TensorSource], dtype: str) -> torch.dtype:
    if dtype == "auto":
        if not tensors[EMBED_KEY].dtype.is_floating_point:
            raise LlavaConvertError(
                f"{tensors[EMBED_KEY].path}: {EMBED_KEY} has dtype {tensors[EMBED_KEY].dtype}, not a floating-point one"
            )
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

    SOURCE may be any form of original checkpoint (full, LoRA, projector-only, delta; see original/), given
    as a directory or a Hub repo id; `base` is the base LLM the last three need.

    Raises:
        LlavaConvertError: bad input (missing files, unsupported configuration, unmapped keys, shape mismatches).
    """
    ckpt = open_original(source, base=base, revision=revision, delta=delta)
    tower = find_vision_tower(ckpt, vision_tower)
    tensors, form_warnings = read_tensors(ckpt)
    if EMBED_KEY not in tensors:
        raise LlavaConvertError(f"{ckpt.path}: no {EMBED_KEY} in the checkpoint weights")
    cfg_path = ckpt.path / "config.json"
    check_llm_against_tensors(ckpt.config, cfg_path, tensors)  # before any size sizes a model
    rows = tensors[EMBED_KEY].shape[0]
    cfg_vocab = ckpt.config.get("vocab_size")
    if cfg_vocab is not None and cfg_vocab != rows:
        raise LlavaConvertError(
            f"{ckpt.path / 'config.json'}: vocab_size {cfg_vocab} disagrees with {EMBED_KEY} "
            f"{tuple(tensors[EMBED_KEY].shape)} in {tensors[EMBED_KEY].path.name}"
        )
    # Every header, before the tokenizer is loaded and any config class is built: the cheap checks first.
    tower_dropped: list[tuple[str, str]] = []
    if not ckpt.tower_in_checkpoint:
        tower_tensors = read_checkpoint(tower.path, origin="vision_tower", files=tower.weight_files)
        if ckpt.siglip:  # the authors delete the Hub SigLIP tower's last encoder layer (mappings/siglip.toml)
            last = f"vision_model.encoder.layers.{tower.config['num_hidden_layers']}."
            tower_dropped = [(k, "the SigLIP tower's last layer (deleted by the authors)") for k in tower_tensors
                             if k.startswith(last)]
            tower_tensors = {k: v for k, v in tower_tensors.items() if not k.startswith(last)}
        check_tower_against(ckpt.config, cfg_path, tower.config, tower.path, tower_tensors)
    else:
        check_tower_against(ckpt.config, cfg_path, tower.config, tower.path, tensors)
    vocab = plan_tokens(ckpt, rows)
    out_dtype = _output_dtype(tensors, dtype)
    config = llava_config(ckpt, tower, vocab)
    config["dtype"] = config["torch_dtype"] = str(out_dtype).replace("torch.", "")

    facts = ckpt.facts
    problems: list[str] = []
    table = load_table("llava_next_families.toml" if ckpt.family else "llava.toml")
    results: list[MapResult] = [map_tensors(tensors, table, facts, problems)]
    if ckpt.family and LM_HEAD_KEY not in tensors and not config["text_config"]["tie_word_embeddings"]:
        # An untied target whose checkpoint saved no lm_head: the authors' model ran with the embedding as it.
        results[0].entries.append(
            PlanEntry("language_model.lm_head.weight", (tensors[EMBED_KEY],), "pad_vocab",
                      "mappings/llava_next_families.toml (lm_head from embed_tokens)")
        )
    if not ckpt.tower_in_checkpoint:
        tower_table = "siglip.toml" if ckpt.siglip else "clip.toml"
        results.append(map_tensors(tower_tensors, load_table(tower_table), facts, problems))
    raise_if(problems)
    for r in results:  # every target parameter is floating point: an integer tensor cannot be one
        for e in r.entries:
            for src in e.sources:
                if not src.dtype.is_floating_point:
                    problems.append(
                        f"{src.name} in {src.path.name} ({e.rule}): dtype {str(src.dtype).replace('torch.', '')}, "
                        f"but {e.target} is a floating-point parameter"
                    )
    raise_if(problems)
    entries = [e for r in results for e in r.entries]

    target = build_target(config, cfg_path)
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
    entries.sort(key=source_order)
    index = assign_shards(entries, max_shard_size)
    template = choose_chat_template(ckpt, chat_template)
    return Plan(
        source=ckpt,
        tower=tower,
        vocab=vocab,
        config=config,
        entries=entries,
        index=index,
        dtype=out_dtype,
        chat_template=template.name,
        chat_template_reason=template.reason,
        dropped=[d for r in results for d in r.dropped] + tower_dropped,
        warnings=form_warnings + [w for r in results for w in r.warnings] + ([template.warning] if template.warning else []),
    )


def plan_inputs(plan: Plan) -> list[tuple[str, Path | None]]:
    """The directories a conversion reads: OUTPUT must stay clear of all of them."""
    return [("SOURCE", plan.source.path), ("--base", plan.source.base), ("the vision tower", plan.tower.path)]


def provenance(plan: Plan) -> Provenance:
    """The input files OUTPUT is made of, for `provenance.json`."""
    prov = Provenance("convert")
    for role, path in plan_inputs(plan):
        prov.add_input(role, path)
    for f in plan.source.input_files():
        prov.add_file(f.role, f.path, hash_it=f.role != "weights")
    for name in ("config.json", "preprocessor_config.json"):
        prov.add_file("vision_tower", plan.tower.path / name)
    for path in plan.tower.weight_files:  # none when the checkpoint carries the tower
        prov.add_file("weights", path, hash_it=False)
    return prov


def _generation_config(plan: Plan) -> dict[str, Any]:
    """Only what generation needs: BOS, EOS (the original's generation_config.json, else its config) and
    `<pad>`. Length limits and sampling settings of the original (`max_length`) are not carried over: they
    were training-time values, and transformers would apply them to every `generate` call."""
    src = plan.source.tokenizer_dir / "generation_config.json"  # the base LLM's for LoRA / projector-only
    orig = read_json(src) if src.is_file() else {}
    text = plan.config["text_config"]
    if plan.source.family:
        # The LLaVA-NeXT repository's releases: their generation_config.json as it is (its sampling settings
        # are how the model cards run them), else BOS / EOS from the config; a pad id when it has none.
        gen = orig or {k: v for k in ("bos_token_id", "eos_token_id") if (v := text.get(k)) is not None}
        gen.setdefault("pad_token_id", plan.vocab.pad_token_id)
        return gen
    gen = {
        "bos_token_id": orig.get("bos_token_id", text.get("bos_token_id")),
        "eos_token_id": orig.get("eos_token_id", text.get("eos_token_id")),
        "pad_token_id": plan.vocab.pad_token_id,
    }
    return {k: v for k, v in gen.items() if v is not None}


def write_metadata(plan: Plan, out: Path) -> None:
    """config.json, generation_config.json, tokenizer and processor files."""
    (out / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(plan), indent=2) + "\n")
    if plan.source.family:
        with quiet():
            parts = build_next_processor(plan.source, plan.tower, plan.vocab, plan.config, plan.chat_template)
            write_next_processor(out, *parts)
        return
    with quiet():
        processor = build_processor(plan.source, plan.tower, plan.vocab, plan.config, chat_template=plan.chat_template)
        processor.save_pretrained(str(out))
    write_tokenizer_files(processor, out, plan.source.tokenizer_dir)


def execute(
    plan: Plan, output: Path, *, force: bool = False, progress: bool = True, command: str | None = None
) -> Path:
    """Write a planned conversion to OUTPUT atomically, with its model card (`command`: recorded in it)."""
    output = Path(output)
    total = plan.index["metadata"]["total_size"]
    ctx = {"vocab": plan.vocab}
    # The card's facts include the sha256 of every source file: hashed on a side thread while the shards are
    # written (the kernel copies most bytes, so the reads overlap instead of adding up).
    facts = in_background(convert_facts, plan, output, command)
    with staged_output(output, force=force, inputs=plan_inputs(plan)) as staging:
        # Tokenizer and processor first: they fail fast on a bad tokenizer, before gigabytes are written.
        write_metadata(plan, staging)
        provenance(plan).write(staging)
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
            file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            written = write_shards(plan.entries, staging, lambda e: compute_entry(e, ctx), bar.update)
        plan.index["metadata"]["total_size"] = written
        shards = {e.shard for e in plan.entries}
        if len(shards) > 1:
            (staging / "model.safetensors.index.json").write_text(json.dumps(plan.index, indent=2) + "\n")
        write_card(staging, facts())
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
    command: str | None = None,
) -> Plan:
    """Convert an original LLaVA checkpoint directory to a Hugging Face directory.

    Args:
        source: the original checkpoint: a directory or Hub repo id, in any form (full, LoRA adapter,
            projector-only, delta; see original/).
        output: directory to create; written atomically (a failed run leaves nothing behind).
        base: the base LLM (directory or Hub repo id) a LoRA / projector-only / delta SOURCE is applied to.
        revision: Hub revision of SOURCE.
        delta: force (True) or rule out (False) reading SOURCE as delta weights; default: by its name.
        vision_tower: CLIP directory or Hub repo id; default: the config's `mm_vision_tower`.
        dtype: "auto" (the checkpoint's own), "float16", "bfloat16" or "float32".
        max_shard_size: largest shard, e.g. "5GB" or a byte count.
        chat_template: one of the authors' conversation modes; default: chosen from the Hub repo id, the
            config and, last, the name (`authors.templates.choose_chat_template`; the plan records why).
        quantize: write Linear weights bitsandbytes-quantized (int8, nf4, fp4) as the spec says.
        dry_run: plan and validate only; write nothing.
        force: replace an existing OUTPUT.
        progress: show a progress bar on stderr.
        command: the command line recorded in the model card (default: the equivalent `llava-convert convert`).

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
        execute(plan, Path(output), force=force, progress=progress, command=command)
    return plan

"""`quantize`: a checkpoint already in Hugging Face llava / llava_next format -> a bitsandbytes one.

Same streaming path as `convert`: tensors keep their names (either key layout), the policy picks the
Linear weights, and everything else (tokenizer, processor, chat template) is copied as is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .card import quantize_facts, write_card
from .errors import LlavaConvertError
from .layouts import HF_MODEL_TYPES
from .original import read_json
from .plan import PlanEntry, apply_quantization, compute_entry
from .quantize import QuantSpec
from .readers import check_input_file, read_checkpoint
from .writer import Provenance, assign_shards, staged_output, write_shards

# The files of a Hugging Face llava checkpoint besides weights and config.json, copied as they are.
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "processor_config.json",
    "preprocessor_config.json", "vocab.json", "merges.txt",
)


def plan_quantize(source: Path, spec: QuantSpec, *, max_shard_size: int | str = "5GB"):
    """Plan quantizing an HF-format llava checkpoint. Returns (config, entries, index)."""
    source = Path(source)
    cfg_path = source / "config.json"
    config = read_json(cfg_path)
    if config.get("model_type") not in HF_MODEL_TYPES or "text_config" not in config:
        raise LlavaConvertError(
            f"{cfg_path}: not a Hugging Face llava / llava_next checkpoint (model_type {config.get('model_type')!r}); "
            "use `llava-convert convert` for original LLaVA checkpoints"
        )
    if config.get("quantization_config"):
        q = config["quantization_config"]
        raise LlavaConvertError(
            f"{cfg_path}: already quantized ({q.get('quant_method', '?')}, "
            f"{'4-bit' if q.get('load_in_4bit') else '8-bit' if q.get('load_in_8bit') else '?'}); "
            "quantize the unquantized checkpoint instead"
        )
    tensors = read_checkpoint(source)
    entries = []
    for name in sorted(tensors):
        ref = tensors[name]
        entries.append(PlanEntry(name, (ref,), None, "identity", dtype=ref.dtype, shape=ref.shape))
    config = dict(config)
    apply_quantization(entries, config, spec)
    if not any(e.quant is not None for e in entries):
        raise LlavaConvertError(f"{source}: no Linear weight left to quantize with skip list {list(spec.skip_modules)}")
    index = assign_shards(entries, max_shard_size)
    return config, entries, index


def quantize_checkpoint(
    source: Path | str,
    output: Path | str,
    spec: QuantSpec,
    *,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Quantize an HF-format llava checkpoint directory into OUTPUT (atomically).

    Args:
        source: directory with config.json (model_type llava / llava_next) and safetensors weights.
        output: directory to create.
        spec: quantization settings and skip list.
        max_shard_size: largest shard.
        force: replace an existing OUTPUT.
        progress: progress bar on stderr.
        command: the command line recorded in the model card.

    Returns:
        The written config (with `quantization_config`).

    Raises:
        LlavaConvertError: bad input (not HF format, already quantized, bad settings); nothing is written.
    """
    source, output = Path(source), Path(output)
    config, entries, index = plan_quantize(source, spec, max_shard_size=max_shard_size)
    prov = Provenance("quantize")
    prov.add_input("SOURCE", source)
    with staged_output(output, force=force, inputs=[("SOURCE", source)]) as staging:
        for p in sorted(source.iterdir()):
            if p.name in COPIED_FILES and p.is_file():
                check_input_file(p)  # never a symlink out of SOURCE
                (staging / p.name).write_bytes(p.read_bytes())
                prov.add_file("metadata", p)
        prov.add_file("config", source / "config.json")
        for path in sorted({e.sources[0].path for e in entries}):
            prov.add_file("weights", path, hash_it=False)
        prov.write(staging)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with tqdm(total=index["metadata"]["total_size"], unit="B", unit_scale=True, unit_divisor=1024,
                  desc="quantizing", file=sys.stderr, disable=not progress, leave=False) as bar:
            written = write_shards(entries, staging, lambda e: compute_entry(e, {}), bar.update)
        index["metadata"]["total_size"] = written
        if len({e.shard for e in entries}) > 1:
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        # The source's README describes the unquantized model: this directory gets its own card.
        write_card(staging, quantize_facts(source, output, config, spec, command))
    return config

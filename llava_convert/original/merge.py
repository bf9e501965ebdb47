"""The merged views of the forms that need a base LLM, each turned into the same thing as a full checkpoint:
`{authors' key name: TensorRef | Composite}` (the tensors of the model the authors' loader builds).

The mapping tables work on the authors' key names whatever the form, so adding a form adds no table rule.
A merged tensor is a `Composite`: a lazy tensor computed from stored ones (W + scale * B @ A, base + delta)
when the writer asks for it, never byte-copied, so memory stays bounded by the largest tensor.

A name-detected delta whose final norm weights look like full weights (mean |w| > 0.5, where a delta holds ~0)
is refused, and a full checkpoint whose norm weights are ~0 gets a warning.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import LlavaConvertError
from ..layouts import EMBED_KEY, LM_HEAD_KEY
from ..plan import Composite
from ..readers import TensorRef, read_checkpoint, read_torch_bin, read_weight_file
from ..validate import check_adapter_config
from . import ADAPTER_CONFIG, FORM_TITLES, NEEDS_BASE, OriginalCheckpoint, base_hint

NORM_KEY = "model.norm.weight"
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(\.(?P<adapter>[^.]+))?\.weight")
# Keys a delta may hold that its base LLM lacks (the authors' apply_delta allows the projector only;
# rotary inv_freq is a non-persistent buffer older transformers saved).
_DELTA_ONLY = re.compile(r"model\.mm_projector\..+|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

def read_tensors(ckpt: OriginalCheckpoint) -> tuple[dict[str, TensorRef | Composite], list[str]]:
    """Every tensor of the model the authors' loader would build, keyed by the authors' names; and warnings.

    Reads headers only, plus the final norm weight (a few KB) to tell delta weights from full ones.
    """
    if ckpt.form in NEEDS_BASE and ckpt.base is None:
        raise LlavaConvertError(f"{ckpt.path}: {base_hint(ckpt)}")
    if ckpt.form == "full":
        tensors = read_checkpoint(ckpt.path, files=list(ckpt.weights))
        warnings = []
        if _looks_like_delta(tensors):
            warnings.append(
                f"{NORM_KEY} is near zero, as in delta weights (target - base); if {ckpt.path.name} is a delta, "
                "convert it with --delta --base BASE"
            )
        return tensors, warnings
    base = read_checkpoint(ckpt.base, origin="base", files=list(ckpt.base_weights))
    if ckpt.form == "lora":
        tensors = _lora_tensors(ckpt, base)
    elif ckpt.form == "projector":
        tensors = _projector_tensors(ckpt, base)
    else:
        tensors = _delta_tensors(ckpt, base)
    if ckpt.form != "delta":
        rows = tensors[EMBED_KEY].shape[0] if EMBED_KEY in tensors else None
        vocab = ckpt.config.get("vocab_size")
        if rows is not None and vocab is not None and rows != vocab:
            raise LlavaConvertError(
                f"--base {ckpt.base}: {EMBED_KEY} has {rows} rows but {ckpt.config_path} has vocab_size "
                f"{vocab}; --base must be the LLM the {FORM_TITLES[ckpt.form]} was trained from"
            )
    return tensors, []


def _looks_like_delta(tensors: dict[str, TensorRef]) -> bool:
    ref = tensors.get(NORM_KEY)
    return ref is not None and ref.dtype.is_floating_point and float(ref.load().float().abs().mean()) < 0.05


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise LlavaConvertError(problems[0])
    if problems:
        problems = sorted(problems)
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise LlavaConvertError(f"{len(problems)} problems: " + "; ".join(problems[:8]) + more)


def authors_non_lora_keys(state: dict[str, Any]) -> dict[str, Any]:
    """`non_lora_trainables` keys as `load_pretrained_model` renames them: strip `base_model.`, then `model.`
    from every key when any key starts with `model.model.`."""
    out = {(k[11:] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in out):
        out = {(k[6:] if k.startswith("model.") else k): v for k, v in out.items()}
    return out


def _targeted(module: str, targets: Any) -> bool:
    """PEFT's `check_target_module_exists`: a regex over the whole name, or a list of name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


def _rank_alpha(acfg: dict[str, Any], module: str) -> tuple[int, float]:
    """PEFT's per-module r / lora_alpha (`rank_pattern`, `alpha_pattern`, matched as `.*\\.{key}$`)."""
    rank_pattern = acfg.get("rank_pattern") or {}
    alpha_pattern = acfg.get("alpha_pattern") or {}
    key = next((k for k in [*rank_pattern, *alpha_pattern] if re.match(rf".*\.{k}$", module)), module)
    return int(rank_pattern.get(key, acfg["r"])), float(alpha_pattern.get(key, acfg["lora_alpha"]))


def _check_adapter_config(acfg: dict[str, Any], path: Path) -> None:
    peft_type = acfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LlavaConvertError(f"{path}: peft_type {peft_type!r}; only LoRA adapters can be merged")
    check_adapter_config(acfg, path)  # r, lora_alpha finite and positive; patterns with a bounded match time
    if acfg.get("use_dora"):
        raise LlavaConvertError(f"{path}: use_dora is set; DoRA adapters are not supported (LoRA only)")
    if acfg.get("modules_to_save"):
        raise LlavaConvertError(
            f"{path}: modules_to_save {acfg['modules_to_save']!r} is not supported (LLaVA keeps such weights "
            "in non_lora_trainables.bin)"
        )
    if not acfg.get("target_modules"):
        raise LlavaConvertError(f"{path}: no target_modules")


def _lora_tensors(ckpt: OriginalCheckpoint, base: dict[str, TensorRef]) -> dict[str, TensorRef | Composite]:
    """Base LLM, then non_lora_trainables over it, then each targeted weight merged with its LoRA factors
    (the order of the authors' LoRA branch: from_pretrained(base), load_state_dict(non_lora), merge_and_unload)."""
    acfg_path = ckpt.path / ADAPTER_CONFIG
    acfg = ckpt.adapter_config
    _check_adapter_config(acfg, acfg_path)
    adapter_path, non_lora_path = ckpt.adapter, ckpt.non_lora_trainables
    adapter = read_weight_file(adapter_path, origin="adapter")
    non_lora = read_torch_bin(non_lora_path, origin="non_lora_trainables")

    tensors: dict[str, TensorRef | Composite] = dict(base)
    tensors.update(authors_non_lora_keys(non_lora))
    problems: list[str] = []
    factors: dict[str, dict[str, TensorRef]] = {}
    for key, ref in adapter.items():
        m = _LORA_KEY.fullmatch(key)
        if m:
            factors.setdefault(m.group("module"), {})[m.group("ab")] = ref
        elif key.startswith("base_model.model.") and key.endswith(".bias") and acfg.get("bias", "none") != "none":
            tensors[key[len("base_model.model.") :]] = ref  # bias="all" / "lora_only" trains biases too
        else:
            problems.append(f"{adapter_path}: {key} is not a LoRA factor (lora_A / lora_B weight)")

    targets = acfg["target_modules"]
    modules = {k[: -len(".weight")] for k, r in base.items() if k.endswith(".weight") and len(r.shape) == 2}
    for t in [targets] if isinstance(targets, str) else targets:
        one = t if isinstance(targets, str) else [t]  # the regex, or one name of the list
        if not any(_targeted(m, one) for m in modules):
            problems.append(
                f"{acfg_path}: target_modules {t!r} matches no module of the base LLM {ckpt.base}; "
                "--base must be the LLM the LoRA was trained on"
            )
    fifo = bool(acfg.get("fan_in_fan_out", False))
    for module, parts in sorted(factors.items()):
        key = f"{module}.weight"
        if set(parts) != {"A", "B"}:
            have = next(iter(parts))
            problems.append(f"{adapter_path}: {parts[have].name} has no lora_{'B' if have == 'A' else 'A'} partner")
            continue
        a, b = parts["A"], parts["B"]
        if not _targeted(module, targets):
            problems.append(f"{adapter_path}: {a.name} adapts {module}, which target_modules in {acfg_path.name} does not name")
            continue
        w = tensors.get(key)
        if w is None:
            problems.append(
                f"{adapter_path}: {a.name} targets {key}, which the base LLM {ckpt.base} does not have; "
                "--base must be the LLM the LoRA was trained on"
            )
            continue
        r, alpha = _rank_alpha(acfg, module)
        want = (w.shape[1], w.shape[0]) if fifo else tuple(w.shape)
        if len(a.shape) != 2 or len(b.shape) != 2 or len(w.shape) != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{adapter_path}: {a.name} {tuple(a.shape)} and {b.name} {tuple(b.shape)} are not LoRA factors")
        elif a.shape[0] != r:
            problems.append(f"{adapter_path}: {a.name} has rank {a.shape[0]} but {acfg_path.name} says r = {r}")
        elif (b.shape[0], a.shape[1]) != want:
            problems.append(
                f"{adapter_path}: {b.name} @ {a.name} is {(b.shape[0], a.shape[1])} but {key} in the base LLM "
                f"({w.path.name}) is {tuple(w.shape)}; --base must be the LLM the LoRA was trained on"
            )
        else:
            scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
            tensors[key] = Composite(key, "lora", (w, a, b), tuple(w.shape), w.dtype, scale, fifo, "base+lora")
    _raise(problems)
    return tensors


def _projector_tensors(ckpt: OriginalCheckpoint, base: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Base LLM with mm_projector.bin loaded over it (the authors' projector-only branch, strict=False)."""
    path = ckpt.projector
    proj = read_torch_bin(path, origin="mm_projector")
    tensors = dict(base)
    for key, ref in proj.items():
        if key in base and tuple(base[key].shape) != tuple(ref.shape):
            raise LlavaConvertError(
                f"{path}: {key} has shape {tuple(ref.shape)} but the base LLM's ({base[key].path.name}) is "
                f"{tuple(base[key].shape)}; --base must be the LLM the projector was trained on"
            )
        tensors[key] = ref
    return tensors


def _delta_tensors(ckpt: OriginalCheckpoint, base: dict[str, TensorRef]) -> dict[str, TensorRef | Composite]:
    """target = base + delta per delta key; extra vocab rows of embed / lm_head from the delta as they are."""
    delta = read_checkpoint(ckpt.path, origin="delta", files=list(ckpt.weights))
    norm = delta.get(NORM_KEY)
    if norm is not None and norm.dtype.is_floating_point and float(norm.load().float().abs().mean()) > 0.5:
        raise LlavaConvertError(
            f"{norm.path}: {NORM_KEY} looks like full weights (mean |w| > 0.5), not a delta (target - base ~ 0); "
            "pass --no-delta if the name's 'delta' is misleading"
        )
    tensors: dict[str, TensorRef | Composite] = {}
    problems = []
    for key, d in delta.items():
        b = base.get(key)
        if b is None:
            if _DELTA_ONLY.fullmatch(key):
                tensors[key] = d
            else:
                problems.append(
                    f"{d.path}: {key} is in the delta but not in the base LLM {ckpt.base}; "
                    "--base must be the LLM the delta was made from"
                )
            continue
        ds, bs = tuple(d.shape), tuple(b.shape)
        extra_rows = key in (EMBED_KEY, LM_HEAD_KEY) and len(ds) == 2 and len(bs) == 2 and ds[1] == bs[1] and ds[0] > bs[0]
        if ds == bs or extra_rows:
            tensors[key] = Composite(key, "delta", (d, b), ds, d.dtype, origin="base+delta")
        else:
            problems.append(
                f"{d.path}: {key} is {ds} in the delta but {bs} in the base LLM ({b.path}); "
                "--base must be the LLM the delta was made from"
            )
    _raise(problems)
    return tensors

"""Sanity checks on configs and adapter settings, before any of their values sizes a model or a buffer.

Every number a config gives is checked for its type and range (`"64"`, `true`, `-1`, `1e9` layers are
refused with the file and field named), then against the tensors actually present: a config that claims
20000 layers over a checkpoint holding 2 is refused before transformers builds even a meta-device model.
Adapter `target_modules` patterns are regular expressions PEFT matches with Python's backtracking engine;
only patterns whose matching time stays bounded (no nested or stacked unbounded repeats) are accepted.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .errors import LlavaConvertError

# Upper bounds far above any released model (Llama 3.1 405B: 126 layers, 128 heads, hidden 16384, 128k vocab).
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_WIDTH = 1 << 20
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 26
MAX_IMAGE_SIZE = 16384

# The authors' config: field -> (kind, upper bound)
_LLM_FIELDS: dict[str, tuple[str, int | None]] = {
    "hidden_size": ("pos_int", MAX_WIDTH),
    "intermediate_size": ("pos_int", MAX_WIDTH),
    "num_hidden_layers": ("pos_int", MAX_LAYERS),
    "num_attention_heads": ("pos_int", MAX_HEADS),
    "num_key_value_heads": ("pos_int", MAX_HEADS),
    "head_dim": ("pos_int", MAX_WIDTH),
    "vocab_size": ("pos_int", MAX_VOCAB),
    "max_position_embeddings": ("pos_int", MAX_POSITIONS),
    "mm_hidden_size": ("pos_int", MAX_WIDTH),
    "tokenizer_model_max_length": ("pos_int", MAX_POSITIONS),
    "sliding_window": ("pos_int", MAX_POSITIONS),
    "mm_vision_select_layer": ("int", MAX_LAYERS + 1),
    "bos_token_id": ("id", MAX_VOCAB),
    "pad_token_id": ("id", MAX_VOCAB),
    "rms_norm_eps": ("pos_float", None),
    "rope_theta": ("pos_float", None),
    "initializer_range": ("float", None),
    "mm_vision_tower": ("str", None),
    "mm_projector_type": ("str", None),
    "mm_vision_select_feature": ("str", None),
    "mm_patch_merge_type": ("str", None),
    "image_aspect_ratio": ("str", None),
    "hidden_act": ("str", None),
    "mm_use_im_start_end": ("bool", None),
    "mm_use_im_patch_token": ("bool", None),
    "tie_word_embeddings": ("bool", None),
    "unfreeze_mm_vision_tower": ("bool", None),
    "rope_scaling": ("dict", None),
}
_TOWER_FIELDS: dict[str, tuple[str, int | None]] = {
    "hidden_size": ("pos_int", MAX_WIDTH),
    "intermediate_size": ("pos_int", MAX_WIDTH),
    "num_hidden_layers": ("pos_int", MAX_LAYERS),
    "num_attention_heads": ("pos_int", MAX_HEADS),
    "num_channels": ("pos_int", 64),
    "image_size": ("pos_int", MAX_IMAGE_SIZE),
    "patch_size": ("pos_int", MAX_IMAGE_SIZE),
    "projection_dim": ("pos_int", MAX_WIDTH),
    "layer_norm_eps": ("pos_float", None),
    "hidden_act": ("str", None),
}


def _bad(path: Path, key: str, value: Any, what: str) -> LlavaConvertError:
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return LlavaConvertError(f"{path}: {key} must be {what}, found {shown[:80]}")


def check_field(path: Path, key: str, value: Any, kind: str, bound: int | None = None) -> None:
    """One field's type and range; None (JSON null) passes (the field's default applies)."""
    if value is None:
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("pos_int", "int", "id"):
        if not is_int:
            raise _bad(path, key, value, "an integer")
        low = {"pos_int": 1, "id": -1, "int": -(bound or 0)}[kind]
        if value < low or (bound is not None and value > bound):
            what = "a positive integer" if kind == "pos_int" else "an integer"
            raise _bad(path, key, value, f"{what} in [{low}, {bound}]")
    elif kind in ("pos_float", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _bad(path, key, value, "a finite number")
        if kind == "pos_float" and value <= 0:
            raise _bad(path, key, value, "a positive number")
    elif kind == "str":
        if not isinstance(value, str):
            raise _bad(path, key, value, "a string")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise _bad(path, key, value, "true or false")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise _bad(path, key, value, "an object")


def check_original_config(config: dict[str, Any], path: Path) -> None:
    """Types and ranges of the fields of an original LLaVA config.json that size or wire the model."""
    for key, (kind, bound) in _LLM_FIELDS.items():
        check_field(path, key, config.get(key), kind, bound)
    eos = config.get("eos_token_id")
    for e in eos if isinstance(eos, list) else [eos]:
        check_field(path, "eos_token_id", e, "id", MAX_VOCAB)
    pins = config.get("image_grid_pinpoints")
    if isinstance(pins, str) and re.fullmatch(r"\(\d{1,2}x\d{1,2}\)(,\s*(\.\.\.|\(\d{1,2}x\d{1,2}\)))*", pins):
        pins = None  # the LLaVA-NeXT repository's range form "(1x1),...,(6x6)" (authors.images.expand_pinpoints)
    if pins is not None:
        ok = isinstance(pins, list) and 0 < len(pins) <= 256 and all(
            isinstance(p, list) and len(p) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_IMAGE_SIZE for x in p
            )
            for p in pins
        )
        if not ok:
            raise _bad(path, "image_grid_pinpoints", pins, "a list of [height, width] pairs of positive integers")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    hidden = config.get("hidden_size")
    if heads and hidden and "head_dim" not in config and hidden % heads:
        raise LlavaConvertError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads and kv and heads % kv:
        raise LlavaConvertError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def check_tower_config(vision: dict[str, Any], path: Path) -> None:
    """Types and ranges of a CLIP vision config's size fields."""
    for key, (kind, bound) in _TOWER_FIELDS.items():
        check_field(path, key, vision.get(key), kind, bound)
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if size is not None and patch is not None and patch > size:
        raise LlavaConvertError(f"{path}: patch_size {patch} is larger than image_size {size}")
    hidden, heads = vision.get("hidden_size"), vision.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise LlavaConvertError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")


def _layers(names, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for n in names for m in [rx.match(n)] if m}


def _count_check(path: Path, key: str, claimed: int | None, found: set[int], what: str) -> None:
    if claimed is None or not found:
        return
    if found != set(range(claimed)):
        shown = f"layers {min(found)}-{max(found)} ({len(found)})" if found else "no layers"
        raise LlavaConvertError(f"{path}: {key} {claimed} but {what} hold {shown}")


def check_llm_against_tensors(config: dict[str, Any], path: Path, tensors: dict[str, Any]) -> None:
    """The config's sizes against the language model's tensors (layer count, widths, heads)."""
    _count_check(path, "num_hidden_layers", config.get("num_hidden_layers"), _layers(tensors, r"model\.layers\.(\d+)\."),
                 "the weights")
    embed = tensors.get("model.embed_tokens.weight")
    hidden = config.get("hidden_size")
    if embed is not None and hidden is not None and len(embed.shape) == 2 and embed.shape[1] != hidden:
        raise LlavaConvertError(
            f"{path}: hidden_size {hidden} disagrees with model.embed_tokens.weight {tuple(embed.shape)}"
        )
    up = tensors.get("model.layers.0.mlp.up_proj.weight")
    inter = config.get("intermediate_size")
    if up is not None and inter is not None and len(up.shape) == 2 and up.shape[0] != inter:
        raise LlavaConvertError(
            f"{path}: intermediate_size {inter} disagrees with model.layers.0.mlp.up_proj.weight {tuple(up.shape)}"
        )
    k = tensors.get("model.layers.0.self_attn.k_proj.weight")
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if k is not None and hidden and heads and len(k.shape) == 2:
        head_dim = config.get("head_dim") or hidden // heads
        if k.shape[0] != kv * head_dim:
            raise LlavaConvertError(
                f"{path}: num_key_value_heads {kv} x head_dim {head_dim} disagrees with "
                f"model.layers.0.self_attn.k_proj.weight {tuple(k.shape)}"
            )


def check_tower_against(config: dict[str, Any], cfg_path: Path, vision: dict[str, Any], tower_path: Path,
                        tower_names) -> None:
    """The tower's layer count against its tensors, and mm_vision_select_layer within the tower."""
    layers = vision.get("num_hidden_layers")
    found = _layers(tower_names, r".*vision_model\.encoder\.layers\.(\d+)\.")
    _count_check(tower_path / "config.json", "num_hidden_layers", layers, found, "the tower's weights")
    select = config.get("mm_vision_select_layer", -2)
    if layers is not None and select is not None and not -(layers + 1) <= select <= layers:
        raise LlavaConvertError(
            f"{cfg_path}: mm_vision_select_layer {select} is outside the vision tower's {layers} layers "
            f"(hidden states -{layers + 1}..{layers}; {tower_path})"
        )


# ------------------------------------------------------------------------------------------------------------
# Adapter patterns
# ------------------------------------------------------------------------------------------------------------

MAX_PATTERN = 512
_MAX_UNBOUNDED = 3  # `.*\.(q|v)_proj.*` has 2; matching cost grows as len(name) ** this


def _sre():
    try:  # Python >= 3.11
        import re._constants as constants
        import re._parser as parser
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as constants
        import sre_parse as parser
    return parser, constants


def _walk(parsed, depth: int, counter: list[int]) -> None:
    """Refuse a repeat inside a repeat (catastrophic backtracking) and count unbounded repeats."""
    c = _sre()[1]

    for op, av in parsed:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            if depth > 0:
                raise ValueError("a repeat inside a repeat")
            if hi == c.MAXREPEAT or hi > 64:
                counter[0] += 1
            _walk(sub, depth + 1, counter)
        elif op == c.SUBPATTERN:
            _walk(av[-1], depth, counter)
        elif op == c.BRANCH:
            for alt in av[1]:
                _walk(alt, depth, counter)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            _walk(av[1], depth, counter)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            raise ValueError("a back reference")


def check_pattern(pattern: Any, path: Path, key: str) -> re.Pattern:
    """Compile an adapter's module pattern if its match time is bounded, else refuse it.

    Accepted: alternations, classes, anchors, and at most three unbounded repeats (`.*`, `+`), none inside
    another repeat; that covers every pattern PEFT and LLaVA's training scripts write.

    Raises:
        LlavaConvertError: not a string, too long, invalid, or with nested / too many repeats.
    """
    if not isinstance(pattern, str):
        raise _bad(path, key, pattern, "a module name list or a regular expression string")
    if len(pattern) > MAX_PATTERN:
        raise LlavaConvertError(f"{path}: {key} is {len(pattern)} characters; at most {MAX_PATTERN}")
    try:
        parsed = _sre()[0].parse(pattern)
        counter = [0]
        _walk(parsed, 0, counter)
        if counter[0] > _MAX_UNBOUNDED:
            raise ValueError(f"{counter[0]} unbounded repeats (at most {_MAX_UNBOUNDED})")
        return re.compile(pattern)
    except re.error as e:
        raise LlavaConvertError(f"{path}: {key} {pattern!r} is not a valid regular expression ({e})") from None
    except (ValueError, RecursionError, OverflowError) as e:
        raise LlavaConvertError(
            f"{path}: {key} {pattern!r} could take unbounded time to match ({e}); list the module names instead"
        ) from None


def check_adapter_config(acfg: dict[str, Any], path: Path) -> None:
    """Types and ranges of the fields of adapter_config.json that scale or select weights."""
    r = acfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_WIDTH:
        raise _bad(path, "r", r, "a positive integer")
    alpha = acfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise _bad(path, "lora_alpha", alpha, "a positive finite number")
    targets = acfg.get("target_modules")
    if isinstance(targets, str):
        check_pattern(targets, path, "target_modules")
    elif isinstance(targets, list):
        if not all(isinstance(t, str) and 0 < len(t) <= MAX_PATTERN for t in targets) or len(targets) > 4096:
            raise _bad(path, "target_modules", targets, "a list of module names")
    elif targets is not None:
        raise _bad(path, "target_modules", targets, "a module name list or a regular expression string")
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pats = acfg.get(key)
        if pats is None:
            continue
        if not isinstance(pats, dict) or len(pats) > 4096:
            raise _bad(path, key, pats, "an object of module patterns to numbers")
        for k, v in pats.items():
            check_pattern(rf".*\.{k}$", path, f"{key} key {k!r}")
            bad = isinstance(v, bool) or not isinstance(v, int if positive_int else int | float)
            if bad or not math.isfinite(v) or v <= 0:
                raise _bad(path, f"{key}[{k!r}]", v, "a positive " + ("integer" if positive_int else "finite number"))

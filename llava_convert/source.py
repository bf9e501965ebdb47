"""Recognise an original LLaVA checkpoint directory: its form, its config, its files, its vision tower.

The original `config.json` is read as a plain dict, never through `AutoConfig`: its `model_type: llava`
names the authors' class, which clashes with transformers' own `llava`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlavaConvertError
from .readers import weight_files

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama", "llava_mistral")
SUPPORTED_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlavaConvertError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LlavaConvertError(f"{path}: expected a JSON object")
    return data


@dataclass
class VisionTower:
    """A CLIP tower directory: config, image-processor settings and (optionally) weights."""

    path: Path
    config: dict[str, Any]  # CLIPVisionConfig fields
    preprocessor: dict[str, Any]
    weight_files: list[Path] = field(default_factory=list)


@dataclass
class OriginalCheckpoint:
    """An original-format checkpoint as found on disk."""

    path: Path
    config: dict[str, Any]
    form: str  # "full" (more forms: see issue tracker)
    backbone: str  # "llama" | "mistral"
    weight_files: list[Path]

    @property
    def name(self) -> str:
        """The authors' `get_model_name_from_path`: the folder name, with its parent for `checkpoint-N`."""
        parts = self.path.resolve().parts
        if parts[-1].startswith("checkpoint-") and len(parts) > 1:
            return f"{parts[-2]}_{parts[-1]}"
        return parts[-1]

    @property
    def projector_type(self) -> str:
        return self.config.get("mm_projector_type", "linear")

    @property
    def architecture(self) -> str:
        """`llava_next` when the checkpoint tiles images (anyres), else `llava`."""
        return "llava_next" if self.config.get("image_aspect_ratio") == "anyres" else "llava"

    @property
    def tower_in_checkpoint(self) -> bool:
        return bool(self.config.get("unfreeze_mm_vision_tower", False))


def open_original(path: Path) -> OriginalCheckpoint:
    """Recognise SOURCE as an original LLaVA checkpoint, or explain what it is instead."""
    if not path.exists():
        raise LlavaConvertError(f"{path}: no such directory")
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: expected a checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LlavaConvertError(f"{cfg_path}: file not found (not a LLaVA checkpoint directory)")
    config = read_json(cfg_path)
    model_type = config.get("model_type")
    if "text_config" in config or "vision_config" in config:
        raise LlavaConvertError(
            f"{cfg_path}: this is already a Hugging Face checkpoint (model_type {model_type!r} with "
            "text_config/vision_config); use `llava-convert quantize` to quantize it"
        )
    if model_type not in ORIGINAL_MODEL_TYPES and "mm_vision_tower" not in config:
        raise LlavaConvertError(
            f"{cfg_path}: model_type {model_type!r} is not an original LLaVA checkpoint "
            f"(expected one of {', '.join(ORIGINAL_MODEL_TYPES)} with mm_* fields)"
        )
    if "mm_vision_tower" not in config:
        raise LlavaConvertError(f"{cfg_path}: no mm_vision_tower; not a multimodal LLaVA checkpoint")
    backbone = "mistral" if model_type == "llava_mistral" else "llama"
    check_projector(config, cfg_path)
    return OriginalCheckpoint(path, config, "full", backbone, weight_files(path))


def check_projector(config: dict[str, Any], cfg_path: Path) -> None:
    ptype = config.get("mm_projector_type", "linear")
    if ptype in ("linear", "mlp2x_gelu"):
        return
    m = SUPPORTED_MLP.match(ptype)
    if m:
        raise LlavaConvertError(
            f"{cfg_path}: mm_projector_type {ptype!r} has {m.group(1)} linear layers; Hugging Face's "
            "LlavaMultiModalProjector has exactly two (linear_1, act, linear_2), so it cannot be represented"
        )
    if ptype == "identity":
        raise LlavaConvertError(
            f"{cfg_path}: mm_projector_type 'identity' feeds vision features straight into the language model; "
            "Hugging Face's LlavaMultiModalProjector always applies two linear layers, so it cannot be represented"
        )
    raise LlavaConvertError(f"{cfg_path}: unknown mm_projector_type {ptype!r}")


def open_vision_tower(path: Path, *, need_weights: bool) -> VisionTower:
    """Read a local CLIP tower directory (a `CLIPModel` or `CLIPVisionModel` save)."""
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: vision tower directory not found")
    cfg = read_json(path / "config.json")
    vision = cfg.get("vision_config", cfg) if cfg.get("model_type") != "clip_vision_model" else cfg
    if "hidden_size" not in vision or "patch_size" not in vision:
        raise LlavaConvertError(f"{path / 'config.json'}: not a CLIP config (no vision hidden_size/patch_size)")
    pre_path = path / "preprocessor_config.json"
    if not pre_path.is_file():
        raise LlavaConvertError(f"{pre_path}: file not found (the tower's image-processor settings are needed)")
    pre = read_json(pre_path)
    files = weight_files(path) if need_weights else []
    return VisionTower(path, dict(vision), pre, files)


def find_vision_tower(ckpt: OriginalCheckpoint, override: Path | None) -> VisionTower:
    """The CLIP tower the authors' code would use: `--vision-tower`, else `mm_vision_tower` when local."""
    need_weights = not ckpt.tower_in_checkpoint
    if override is not None:
        return open_vision_tower(override, need_weights=need_weights)
    name = ckpt.config.get("mm_vision_tower") or ckpt.config.get("vision_tower")
    if name and Path(name).is_dir():
        return open_vision_tower(Path(name), need_weights=need_weights)
    raise LlavaConvertError(
        f"{ckpt.path / 'config.json'}: vision tower {name!r} is not a local directory; pass "
        "--vision-tower PATH (a CLIP directory with config.json, preprocessor_config.json"
        + (")" if ckpt.tower_in_checkpoint else " and weights)")
    )

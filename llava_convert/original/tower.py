"""The vision tower of an original LLaVA checkpoint: `--vision-tower`, else its `mm_vision_tower`.

A CLIP tower, or for the LLaVA-NeXT repository's SigLIP checkpoints a SigLIP one, described as the authors
run it (`authors.config.authors_siglip_fields`: its last layer deleted, no head)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..authors.config import authors_siglip_fields
from ..errors import LlavaConvertError
from ..hub import locate, parse_repo_id
from ..readers import weight_files
from ..validate import check_tower_config
from . import OriginalCheckpoint, read_json


@dataclass(frozen=True)
class VisionTower:
    """A CLIP tower directory: config, image-processor settings and (optionally) weights."""

    path: Path
    config: dict[str, Any]  # CLIPVisionConfig fields
    preprocessor: dict[str, Any]
    weight_files: tuple[Path, ...] = field(default_factory=tuple)


def open_vision_tower(path: Path, *, need_weights: bool) -> VisionTower:
    """Read a local CLIP tower directory (a `CLIPModel` or `CLIPVisionModel` save)."""
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: vision tower directory not found")
    cfg = read_json(path / "config.json")
    vision = cfg.get("vision_config", cfg) if cfg.get("model_type") != "clip_vision_model" else cfg
    if not isinstance(vision, dict) or "hidden_size" not in vision or "patch_size" not in vision:
        raise LlavaConvertError(f"{path / 'config.json'}: not a CLIP config (no vision hidden_size/patch_size)")
    check_tower_config(vision, path / "config.json")
    pre_path = path / "preprocessor_config.json"
    if not pre_path.is_file():
        raise LlavaConvertError(f"{pre_path}: file not found (the tower's image-processor settings are needed)")
    pre = read_json(pre_path)
    files = tuple(weight_files(path)) if need_weights else ()
    return VisionTower(path, dict(vision), pre, files)


def find_vision_tower(ckpt: OriginalCheckpoint, override: Path | str | None) -> VisionTower:
    """The tower the authors' code would use (`_find_vision_tower`); a SigLIP one as they run it."""
    tower = _find_vision_tower(ckpt, override)
    if ckpt.siglip:
        return VisionTower(tower.path, authors_siglip_fields(tower.config), tower.preprocessor, tower.weight_files)
    return tower


def _find_vision_tower(ckpt: OriginalCheckpoint, override: Path | str | None) -> VisionTower:
    """The CLIP tower the authors' code would use: `--vision-tower`, else `mm_vision_tower`.

    Either may be a local directory or a Hub repo id (`openai/clip-vit-large-patch14-336`), fetched with
    huggingface_hub (config, image-processor config and, unless the checkpoint carries the tower, weights).
    """
    need_weights = not ckpt.tower_in_checkpoint
    if override is not None:
        found = locate(override, role="--vision-tower", tower=True, weights=need_weights)
        return open_vision_tower(found.path, need_weights=need_weights)
    name = ckpt.config.get("mm_vision_tower") or ckpt.config.get("vision_tower")
    if name and Path(name).is_dir():
        return open_vision_tower(Path(name), need_weights=need_weights)
    hint = (
        "pass --vision-tower PATH (a CLIP directory with config.json, preprocessor_config.json"
        + (")" if ckpt.tower_in_checkpoint else " and weights)")
    )
    if name and parse_repo_id(str(name)):
        try:
            found = locate(str(name), role="mm_vision_tower", tower=True, weights=need_weights)
        except LlavaConvertError as e:
            raise LlavaConvertError(
                f"{ckpt.config_path}: vision tower {name!r} is not a local directory; {hint}, "
                f"or make it available from the Hub ({str(e).split(': ', 1)[-1]})"
            ) from None
        return open_vision_tower(found.path, need_weights=need_weights)
    base = Path(str(name)).name if name else ""
    if base.startswith("clip-vit-"):  # a path on the machine it was trained on, to one of the openai towers
        hint += f", e.g. --vision-tower openai/{base} (the tower that path names, on the Hub)"
    raise LlavaConvertError(f"{ckpt.config_path}: vision tower {name!r} is not a local directory; {hint}")

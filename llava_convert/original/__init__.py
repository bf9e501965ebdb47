"""Recognise an original LLaVA checkpoint directory: its form, its config, its files, its vision tower.

The original `config.json` is read as a plain dict, never through `AutoConfig`: its `model_type: llava`
names the authors' class, which clashes with transformers' own `llava`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlavaConvertError
from .readers import read_json_file, weight_files
from .validate import check_original_config, check_tower_config

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama", "llava_mistral")
SUPPORTED_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def read_json(path: Path) -> dict[str, Any]:
    data = read_json_file(path)  # strict, size-capped, no symlink out of its directory
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
    form: str  # "full" | "lora" | "projector" | "delta" (see forms.py)
    backbone: str  # "llama" | "mistral"
    weight_files: list[Path]
    base: Path | None = None  # the base LLM a lora / projector / delta checkpoint is applied to
    repo_id: str | None = None  # when SOURCE was given as a Hub repo id, or is a snapshot of the HF cache
    tokenizer_path: Path | None = None

    @property
    def tokenizer_dir(self) -> Path:
        """Where the authors' builder takes the tokenizer (and the model its generation config) from."""
        return self.tokenizer_path or self.path

    @property
    def name(self) -> str:
        """The authors' `get_model_name_from_path`: the folder name, with its parent for `checkpoint-N`."""
        parts = Path(self.repo_id).parts if self.repo_id else self.path.resolve().parts
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

    @property
    def facts(self) -> dict[str, Any]:
        """What the mapping tables' `when` conditions test."""
        return {
            "architecture": self.architecture,
            "projector": self.projector_type,
            "vision_from": "checkpoint" if self.tower_in_checkpoint else "tower",
        }


def open_original(path: Path, *, form: str = "full", repo_id: str | None = None) -> OriginalCheckpoint:
    """Recognise SOURCE as an original LLaVA checkpoint, or explain what it is instead.

    `form` (from `forms.detect_form`) says which files hold its weights; a lora / projector / delta
    checkpoint still needs its base LLM (`forms.open_source` attaches it). `repo_id` defaults to the repo
    of a Hugging Face cache snapshot folder.
    """
    from .hub import cached_repo_id

    repo_id = repo_id or cached_repo_id(path)
    if not path.exists():
        raise LlavaConvertError(f"{path}: no such directory")
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: expected a checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LlavaConvertError(f"{cfg_path}: file not found (not a LLaVA checkpoint directory)")
    config = read_json(cfg_path)
    check_original_config(config, cfg_path)
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
    if form == "lora":
        files = [adapter_file(path), path / NON_LORA]
        if not files[1].is_file():
            raise LlavaConvertError(
                f"{files[1]}: file not found; a LLaVA LoRA run saves the projector (and any other non-LoRA "
                "trained weights) there, and the authors' loader needs it too"
            )
    elif form == "projector":
        files = [path / PROJECTOR]
    else:
        files = weight_files(path)
    return OriginalCheckpoint(path, config, form, backbone, files, repo_id=repo_id)


ADAPTER_CONFIG = "adapter_config.json"
NON_LORA = "non_lora_trainables.bin"
PROJECTOR = "mm_projector.bin"


def adapter_file(path: Path) -> Path:
    """The PEFT adapter weights of a LoRA directory (safetensors preferred, as PEFT loads them)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise LlavaConvertError(f"{path}: {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin")


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
    if not isinstance(vision, dict) or "hidden_size" not in vision or "patch_size" not in vision:
        raise LlavaConvertError(f"{path / 'config.json'}: not a CLIP config (no vision hidden_size/patch_size)")
    check_tower_config(vision, path / "config.json")
    pre_path = path / "preprocessor_config.json"
    if not pre_path.is_file():
        raise LlavaConvertError(f"{pre_path}: file not found (the tower's image-processor settings are needed)")
    pre = read_json(pre_path)
    files = weight_files(path) if need_weights else []
    return VisionTower(path, dict(vision), pre, files)


def find_vision_tower(ckpt: OriginalCheckpoint, override: Path | str | None) -> VisionTower:
    """The CLIP tower the authors' code would use: `--vision-tower`, else `mm_vision_tower`.

    Either may be a local directory or a Hub repo id (`openai/clip-vit-large-patch14-336`), fetched with
    huggingface_hub (config, image-processor config and, unless the checkpoint carries the tower, weights).
    """
    from .hub import locate, parse_repo_id

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
                f"{ckpt.path / 'config.json'}: vision tower {name!r} is not a local directory; {hint}, "
                f"or make it available from the Hub ({str(e).split(': ', 1)[-1]})"
            ) from None
        return open_vision_tower(found.path, need_weights=need_weights)
    base = Path(str(name)).name if name else ""
    if base.startswith("clip-vit-"):  # a path on the machine it was trained on, to one of the openai towers
        hint += f", e.g. --vision-tower openai/{base} (the tower that path names, on the Hub)"
    raise LlavaConvertError(f"{ckpt.path / 'config.json'}: vision tower {name!r} is not a local directory; {hint}")

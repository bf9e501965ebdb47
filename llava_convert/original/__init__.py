"""Open an original LLaVA checkpoint: find it (local, Hub id, HF cache), read its config once, recognise its
form, attach its base LLM, and describe it with every file it is made of named.

    full       config.json + weights (+ tokenizer)        released v1 / v1.5 / v1.6, self-trained saves, checkpoint-N/
    lora       config.json + adapter_config.json + adapter_model.{safetensors,bin} + non_lora_trainables.bin;
               needs --base (the LLM it was trained from), whose tokenizer it uses
    projector  config.json + mm_projector.bin (pretrain stage); needs --base, whose tokenizer it uses
    delta      config.json + weights holding target - base (v0, v1-1 releases) + tokenizer; needs --base

A Hugging Face checkpoint (`text_config` / `vision_config`) is refused with a pointer to `quantize`.
`original.merge` turns any form into the tensors of the model the authors' loader builds; `original.tower`
finds the CLIP tower.

The LLaVA-NeXT repository's checkpoints (LLaVA-OneVision, LLaVA-NeXT-Interleave, llama3-llava-next-8b,
llava-next-72b/110b) are original checkpoints of the same format; `family` says which (None: haotian-liu/LLaVA).
Their `model_type` is unreliable (`llava`, `llava_qwen`, `llava_llama`): the family comes from `architectures`,
`image_aspect_ratio`, the tower's name and, for Llama-3, the tokenizer (its special tokens). Their tower is
always saved in the checkpoint (trained or not), and that is the one the authors' loader runs.

Delta detection: the authors' delta repos (`LLaVA-13b-delta-v0`, `LLaVA-Lightning-7B-delta-v1-1`) have a
config.json and weights exactly like a full checkpoint; only their name says "delta". So a checkpoint whose
name has a `delta` word (`-delta-`, `_delta`, ...) is a delta, unless `delta=False` (`--no-delta`) says
otherwise; `delta=True` (`--delta`) forces it.

The original `config.json` is read as a plain dict, never through `AutoConfig`: its `model_type: llava`
names the authors' class, which clashes with transformers' own `llava`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from ..authors.tokenizer import tokenizer_has
from ..errors import LlavaConvertError
from ..hub import cached_repo_id, locate, parse_repo_id
from ..readers import WEIGHT_INDEX_NAMES, WEIGHT_SINGLE_NAMES, read_json, weight_files
from ..validate import check_original_config

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama", "llava_mistral", "llava_qwen")
# The LLaVA-NeXT repository's families: OneVision (Qwen2 + SigLIP, anyres_max_N), Interleave (Qwen + SigLIP,
# anyres), next_qwen (llava-next-72b/110b: Qwen1.5 + CLIP), llama3 (llama3-llava-next-8b: Llama-3 + CLIP).
NEXT_FAMILIES = ("onevision", "interleave", "next_qwen", "llama3")
QWEN_ARCHITECTURE = "LlavaQwenForCausalLM"
LLAMA_ARCHITECTURE = "LlavaLlamaForCausalLM"
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|eot_id|>")
SUPPORTED_MLP = re.compile(r"^mlp(\d+)x_gelu$")
ADAPTER_CONFIG = "adapter_config.json"
NON_LORA = "non_lora_trainables.bin"
PROJECTOR = "mm_projector.bin"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
GENERATION_CONFIG = "generation_config.json"
NEEDS_BASE = ("lora", "projector", "delta")
FORM_TITLES = {
    "full": "full checkpoint",
    "lora": "LoRA adapter",
    "projector": "projector-only checkpoint (pretrain stage)",
    "delta": "delta weights",
    "hf": "Hugging Face checkpoint",
}
_DELTA_WORD = re.compile(r"(^|[-_.])delta([-_.]|$)", re.IGNORECASE)
# LLM shape fields that must agree between the checkpoint's config and its base LLM's.
_BASE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")




class InputFile(NamedTuple):
    """One file a conversion reads, with its role (`provenance.json`, the model card)."""

    role: str  # "config" | "tokenizer" | "generation_config" | "weights"
    path: Path


@dataclass(frozen=True)
class OriginalCheckpoint:
    """An original-format checkpoint as found on disk (`open_original`); every file it is made of by name."""

    path: Path
    config: dict[str, Any]
    form: str  # "full" | "lora" | "projector" | "delta"
    backbone: str  # "llama" | "mistral" | "qwen2" (Qwen2 and Qwen1.5)
    name: str  # the authors' `get_model_name_from_path` (the conv-mode and delta rules read it)
    tokenizer_dir: Path  # where the authors' builder takes the tokenizer (and generation config) from
    weights: tuple[Path, ...] = ()  # full / delta: the checkpoint's weight files
    adapter: Path | None = None  # lora: adapter_model.{safetensors,bin}
    adapter_config: dict[str, Any] | None = None  # lora: adapter_config.json
    non_lora_trainables: Path | None = None  # lora: non_lora_trainables.bin (projector and other trained weights)
    projector: Path | None = None  # projector: mm_projector.bin
    base: Path | None = None  # the base LLM a lora / projector / delta checkpoint is applied to
    base_weights: tuple[Path, ...] = ()
    repo_id: str | None = None  # when SOURCE was given as a Hub repo id, or is a snapshot of the HF cache
    family: str | None = None  # one of NEXT_FAMILIES (a LLaVA-NeXT-repository checkpoint), else None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def own_files(self) -> tuple[Path, ...]:
        """The weight files of the checkpoint itself (not its base LLM's)."""
        named = (self.adapter, self.non_lora_trainables, self.projector)
        return (*self.weights, *(p for p in named if p is not None))

    def input_files(self) -> tuple[InputFile, ...]:
        """Every file of the checkpoint (and its base LLM) a conversion reads, with its role."""
        files = [InputFile("config", self.config_path)]
        files += [InputFile("tokenizer", self.tokenizer_dir / n) for n in TOKENIZER_FILES
                  if (self.tokenizer_dir / n).is_file()]
        if (self.tokenizer_dir / GENERATION_CONFIG).is_file():
            files.append(InputFile("generation_config", self.tokenizer_dir / GENERATION_CONFIG))
        files += [InputFile("weights", p) for p in (*self.own_files, *self.base_weights)]
        return tuple(files)

    @property
    def projector_type(self) -> str:
        return self.config.get("mm_projector_type", "linear")

    @property
    def architecture(self) -> str:
        """`llava_onevision` (anyres_max_N), `llava_next` when the checkpoint tiles images (anyres), else `llava`."""
        if self.family == "onevision":
            return "llava_onevision"
        if self.family:  # anyres, or the pretrain stage's square images (plain LLaVA)
            return "llava_next" if str(self.config.get("image_aspect_ratio", "")).startswith("anyres") else "llava"
        return "llava_next" if self.config.get("image_aspect_ratio") == "anyres" else "llava"

    @property
    def tower_in_checkpoint(self) -> bool:
        if self.family and self.form in ("full", "delta"):
            return True  # the LLaVA-NeXT repository saves the tower, trained or not, and its loader uses it
        tuned = "mm_vision_tower" in str(self.config.get("mm_tunable_parts") or "")  # LLaVA-NeXT training
        return self.form != "projector" and (tuned or bool(self.config.get("unfreeze_mm_vision_tower", False)))

    @property
    def siglip(self) -> bool:
        """The authors' `build_vision_tower`: a tower is SigLIP when its name says so (LLaVA-NeXT repository)."""
        name = self.config.get("mm_vision_tower") or self.config.get("vision_tower") or ""
        return self.family is not None and "siglip" in str(name).lower()

    @property
    def facts(self) -> dict[str, Any]:
        """What the mapping tables' `when` conditions test."""
        return {
            "architecture": self.architecture,
            "projector": self.projector_type,
            "vision_from": "checkpoint" if self.tower_in_checkpoint else "tower",
        }


def open_original(
    spec: Path | str,
    *,
    base: Path | str | None = None,
    revision: str | None = None,
    delta: bool | None = None,
    require_base: bool = True,
    representable: bool = True,
) -> OriginalCheckpoint:
    """Find SPEC (local or Hub), recognise it as an original LLaVA checkpoint (or explain what it is instead)
    and attach its base LLM.

    Args:
        spec: checkpoint directory or Hub repo id.
        base: the base LLM (directory or Hub repo id) for lora / projector / delta checkpoints.
        revision: Hub revision of SPEC.
        delta: force (True) or rule out (False) the delta form; default: by name.
        require_base: raise when a form needs a base and none is given (`inspect` passes False).
        representable: refuse projectors Hugging Face's Llava cannot represent (`mlp{N}x_gelu` N != 2,
            `identity`); the reference model, which runs them as the authors do, passes False.

    Returns:
        The frozen description; `base`, `base_weights` and `tokenizer_dir` set for the forms that need a base.

    Raises:
        LlavaConvertError: unreadable SPEC or base, a missing or unfit --base, --base for a full checkpoint.
    """
    found = locate(spec, revision=revision, role="SOURCE")
    if revision and found.repo_id is None:
        raise LlavaConvertError(f"--revision {revision}: SOURCE {spec} is a local directory, not a Hub repo id")
    path = found.path
    repo_id = found.repo_id or cached_repo_id(path)
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: expected a checkpoint directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise LlavaConvertError(f"{cfg_path}: file not found (not a LLaVA checkpoint directory)")
    config = read_json(cfg_path)
    name = _authors_name(path, repo_id)
    form = _form(path, config, name, delta)
    backbone = _check_config(config, cfg_path, representable)
    files: dict[str, Any] = {}
    if form == "lora":
        files["adapter_config"] = read_json(path / ADAPTER_CONFIG)
        files["adapter"] = _adapter_file(path)
        files["non_lora_trainables"] = path / NON_LORA
        if not files["non_lora_trainables"].is_file():
            raise LlavaConvertError(
                f"{path / NON_LORA}: file not found; a LLaVA LoRA run saves the projector (and any other non-LoRA "
                "trained weights) there, and the authors' loader needs it too"
            )
    elif form == "projector":
        files["projector"] = path / PROJECTOR
    else:
        files["weights"] = tuple(weight_files(path))
    family = _family(config, path)
    ckpt = OriginalCheckpoint(path, config, form, backbone, name, path, repo_id=repo_id, family=family, **files)
    if form not in NEEDS_BASE:
        if base is not None:
            raise LlavaConvertError(
                f"--base {base}: {spec} is a {FORM_TITLES[form]} with all its weights; --base is only for "
                "LoRA adapters, projector-only checkpoints and delta weights"
            )
        return ckpt
    if base is None:
        if require_base:
            raise LlavaConvertError(f"{spec}: {base_hint(ckpt)}")
        return ckpt
    base_path = locate(base, role="--base").path
    _check_base(ckpt, base_path)
    # The authors' builder of a LoRA / projector-only checkpoint: AutoTokenizer.from_pretrained(model_base).
    tokenizer_dir = base_path if form in ("lora", "projector") else path
    return replace(ckpt, base=base_path, base_weights=tuple(weight_files(base_path)), tokenizer_dir=tokenizer_dir,
                   family=_family(config, tokenizer_dir))  # Llama-3 is told by its tokenizer: the base's


def _family(config: dict[str, Any], tokenizer_dir: Path) -> str | None:
    """Which of NEXT_FAMILIES CONFIG is (None: a haotian-liu/LLaVA checkpoint)."""
    arch = config.get("architectures") or []
    aspect = str(config.get("image_aspect_ratio") or "")
    tower = str(config.get("mm_vision_tower") or config.get("vision_tower") or "").lower()
    if QWEN_ARCHITECTURE in arch or config.get("model_type") == "llava_qwen":
        if aspect.startswith("anyres_max"):
            return "onevision"
        return "interleave" if "siglip" in tower else "next_qwen"
    if LLAMA_ARCHITECTURE in arch and aspect.startswith("anyres") and tokenizer_has(tokenizer_dir, LLAMA3_TOKENS):
        return "llama3"
    return None


def _authors_name(path: Path, repo_id: str | None) -> str:
    """The authors' `get_model_name_from_path`: the folder name, with its parent for `checkpoint-N`."""
    parts = Path(repo_id).parts if repo_id else path.resolve().parts
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def _form(path: Path, config: dict[str, Any], name: str, delta: bool | None) -> str:
    """Which form PATH is in: "full", "lora", "projector", "delta" or "hf" (refused by `_check_config`).

    `delta` True / False overrides the name rule (`--delta` / `--no-delta`); True for a LoRA adapter, a
    projector-only save or a Hugging Face checkpoint is an error.
    """
    form = None
    if (path / ADAPTER_CONFIG).is_file():
        form = "lora"
    elif "text_config" in config or "vision_config" in config:
        form = "hf"
    elif (path / PROJECTOR).is_file() and not _has_full_weights(path):
        form = "projector"
    if form is not None:
        if delta:
            raise LlavaConvertError(f"--delta: {path} is a {FORM_TITLES[form]}, not delta weights")
        return form
    if delta is None:
        delta = bool(_DELTA_WORD.search(name))
    return "delta" if delta else "full"


def _has_full_weights(path: Path) -> bool:
    if any((path / n).is_file() for n in (*WEIGHT_INDEX_NAMES, *WEIGHT_SINGLE_NAMES)):
        return True
    return any(p.name != "adapter_model.safetensors" for p in path.glob("*.safetensors")) or any(
        path.glob("pytorch_model*.bin")
    )


def _check_config(config: dict[str, Any], cfg_path: Path, representable: bool) -> str:
    """Refuse what is not an original multimodal LLaVA config; return its backbone ("llama" | "mistral" | "qwen2")."""
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
    check_projector(config, cfg_path, representable=representable)
    if QWEN_ARCHITECTURE in (config.get("architectures") or []) or model_type == "llava_qwen":
        return "qwen2"  # the LLaVA-NeXT repository's Qwen2 / Qwen1.5 backbones
    return "mistral" if model_type == "llava_mistral" else "llama"


def _adapter_file(path: Path) -> Path:
    """The PEFT adapter weights of a LoRA directory (safetensors preferred, as PEFT loads them)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise LlavaConvertError(f"{path}: {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin")


def check_projector(config: dict[str, Any], cfg_path: Path, *, representable: bool = True) -> None:
    """Refuse an unknown `mm_projector_type`, and (`representable`) one Hugging Face's Llava cannot hold."""
    ptype = config.get("mm_projector_type", "linear")
    if ptype in ("linear", "mlp2x_gelu"):
        return
    m = SUPPORTED_MLP.match(ptype)
    if not representable and (m or ptype == "identity"):
        return
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


def _check_base(ckpt: OriginalCheckpoint, base: Path) -> None:
    """The base LLM's config must describe the same network as the checkpoint's (its vocab is checked on weights)."""
    base_cfg_path = base / "config.json"
    base_cfg = read_json(base_cfg_path)
    check_original_config(base_cfg, base_cfg_path)
    if "text_config" in base_cfg or "vision_config" in base_cfg:
        raise LlavaConvertError(
            f"--base {base}: a Hugging Face multimodal checkpoint; pass the base language model "
            "(e.g. lmsys/vicuna-7b-v1.5)"
        )
    what = {"lora": "LoRA", "projector": "projector", "delta": "delta"}[ckpt.form]
    for key in _BASE_FIELDS:
        mine = ckpt.config.get(key, ckpt.config.get("num_attention_heads") if key == "num_key_value_heads" else None)
        theirs = base_cfg.get(key, base_cfg.get("num_attention_heads") if key == "num_key_value_heads" else None)
        if mine is not None and theirs is not None and mine != theirs:
            raise LlavaConvertError(
                f"{base_cfg_path}: {key} {theirs} does not fit {ckpt.config_path} ({key} {mine}); "
                f"--base must be the LLM the {what} was made from"
            )
    if ckpt.form in ("lora", "projector") and not any(
        (base / f).is_file() for f in ("tokenizer.model", "tokenizer.json")
    ):
        raise LlavaConvertError(
            f"--base {base}: no tokenizer (tokenizer.model or tokenizer.json); the authors' loader takes "
            f"the tokenizer of a {what} checkpoint from its base LLM"
        )


# The base LLMs of the authors' LoRA and projector-only releases as their MODEL_ZOO.md pairs them, keyed by the
# name the release's files record for it (`./checkpoints/vicuna-7b-v1-5` on the machine it was trained on),
# normalised by `_base_key`.
MODEL_ZOO_BASES = {
    "vicuna-7b-v1-5": "lmsys/vicuna-7b-v1.5",
    "vicuna-13b-v1-5": "lmsys/vicuna-13b-v1.5",
    "vicuna-7b-v1-3": "lmsys/vicuna-7b-v1.3",
    "vicuna-13b-v1-3": "lmsys/vicuna-13b-v1.3",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "mpt-7b-chat": "mosaicml/mpt-7b-chat",
}


def _base_key(recorded: str) -> str:
    name = re.sub(r"[._]", "-", recorded.rstrip("/").rsplit("/", 1)[-1].lower())
    return name.removesuffix("-hf")


def suggested_base(recorded: str | None) -> tuple[str | None, str]:
    """A `--base` a user can pass for the base a release records, and why; (None, why) when there is none.

    A Hub id is itself; a path from the training machine (`./checkpoints/vicuna-7b-v1-5`) becomes the Hub id the
    authors' MODEL_ZOO pairs with it; a path that exists here is itself; any other path is not suggested."""
    if not recorded:
        return None, ""
    known = MODEL_ZOO_BASES.get(_base_key(recorded))
    if known is not None:
        return known, "the base LLM the authors' MODEL_ZOO pairs with it"
    if Path(recorded).is_dir():
        return recorded, "the base LLM its files record"
    if not recorded.startswith((".", "/", "~")) and parse_repo_id(recorded):
        return recorded, "the Hub id its files record"
    return None, f"its files record {_base_key(recorded)!r} at a path of the machine it was trained on"


def base_hint(ckpt: OriginalCheckpoint) -> str:
    """What a checkpoint of a form that needs a base LLM asks for, with a base a user can pass."""
    if ckpt.form == "delta":
        return "delta weights (target = base + delta): pass --base <the base LLM the delta was made from>"
    if ckpt.form == "lora":
        recorded = (ckpt.adapter_config or {}).get("base_model_name_or_path")
    else:
        recorded = ckpt.config.get("_name_or_path")
    title = FORM_TITLES[ckpt.form]
    base, why = suggested_base(recorded if isinstance(recorded, str) else None)
    if base:
        return f"{title}: pass --base {base} ({why})"
    return f"{title}: pass --base <the base LLM it was trained from>" + (f" ({why})" if why else "")

"""The converted side of `check`: the Hugging Face checkpoint loaded as a user loads it (transformers 5's
`AutoModelForImageTextToText` and `AutoProcessor.apply_chat_template`), whole or streamed layer by layer,
with hooks recording the vision features, the projector output, each decoder layer, the final norm and the
logits."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaOnevisionProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
)

from ..authors.tokenizer import IMAGE_TOKEN_INDEX
from ..errors import LlavaConvertError
from ..layouts import HF_MODEL_TYPES, to_v5
from ..lazy import LayerStreamer, load_outside, materialize_buffers
from ..logs import quiet
from ..original import read_json
from ..plan import DTYPES
from ..readers import TensorRef, read_checkpoint
from ..reference import GREEDY, TEXT_ATTENTION, VISION_ATTENTION, Recorder
from .report import quantization_type


class PromptError(Exception):
    """The converted processor cannot render the chat prompt (no chat template, or a broken one): a finding of
    the check (the prompt ids then differ), not bad input."""


_LAYERS = "model.language_model.layers."


def hf_weight_name(name: str) -> str:
    """A converted checkpoint's tensor name -> the transformers 5 module path (legacy and v5 layouts)."""
    return to_v5(name)


@dataclass
class ConvertedRun:
    """What the converted side recorded for one image."""

    prompt: str | None  # None when the chat template failed (prompt_error)
    input_ids: list[int]  # as the processor produced them
    used_ids: list[int]  # what the numbers below were computed on
    pixel_values: torch.Tensor
    vision_features: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    norm: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    image_tokens: int = 0
    image_pos: int = 0
    image_token_id: int = -1
    prompt_error: PromptError | None = None
    error: str | None = None


def read_converted_config(path: Path) -> dict[str, Any]:
    """The converted config.json as a dict, refusing anything that is not a HF llava / llava_next checkpoint."""
    if not path.is_dir():
        raise LlavaConvertError(f"{path}: no such directory")
    cfg_path = path / "config.json"
    config = read_json(cfg_path)
    model_type = config.get("model_type")
    if "text_config" not in config or model_type not in HF_MODEL_TYPES:
        what = (
            "an original LLaVA checkpoint (pass it as ORIGINAL)"
            if "mm_vision_tower" in config
            else (f"model_type {model_type!r}")
        )
        raise LlavaConvertError(
            f"{cfg_path}: not a converted checkpoint: {what}; expected a Hugging Face "
            f"{' or '.join(HF_MODEL_TYPES)} config with text_config"
        )
    return config


def load_processor(path: Path):
    """`AutoProcessor` of the converted checkpoint (tokenizer, image processor, chat template); a
    `LlavaOnevisionProcessor` without its video processor where torchvision (which that needs) is missing."""
    with quiet():
        try:
            return AutoProcessor.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable processors
            if isinstance(e, ImportError) and _processor_class(path) == "LlavaOnevisionProcessor":
                return _onevision_processor_without_video(path)
            first = str(e).split(". ")[0].split("\n")[0]
            raise LlavaConvertError(
                f"{path}: cannot load the processor ({type(e).__name__}: {first})"
            ) from None


def _processor_class(path: Path) -> str | None:
    settings = path / "processor_config.json"
    return read_json(settings).get("processor_class") if settings.is_file() else None


def _onevision_processor_without_video(path: Path):
    """`LlavaOnevisionProcessor` from the converted files, its video processor left out (images only)."""
    settings = read_json(path / "processor_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # ProcessorMixin's constructor insists on every sub-processor: built without it, field by field.
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.tokenizer, proc.video_processor = tokenizer, None
    proc.image_processor = AutoImageProcessor.from_pretrained(str(path))
    template = path / "chat_template.jinja"
    proc.chat_template = template.read_text() if template.is_file() else None
    proc.num_image_tokens = settings["num_image_tokens"]
    proc.vision_feature_select_strategy = settings["vision_feature_select_strategy"]
    proc.vision_aspect_ratio = settings.get("vision_aspect_ratio", "anyres_max_9")
    proc.image_token, proc.video_token = settings.get("image_token", "<image>"), settings.get("video_token", "<video>")
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


class ConvertedModel:
    """A converted checkpoint loaded with transformers 5 (`AutoModelForImageTextToText`, `AutoProcessor`)."""

    def __init__(self, path: Path, *, dtype: str, low_memory: bool, processor=None):
        self.path = path
        self.config = read_converted_config(path)
        self.quant = quantization_type(self.config)
        self.dtype = DTYPES[dtype]
        self.notes: list[str] = []
        self.missing: list[str] = []
        self.processor = processor if processor is not None else load_processor(path)
        self._streamer = None
        if low_memory and self.quant is None:
            self.model = self._load_streaming()
        else:
            if low_memory:
                self.notes.append(
                    "quantized converted model loaded whole (--low-memory streams the original only)"
                )
            self.model = self._load()
            if self.model.dtype != self.dtype:
                self.notes.append(
                    f"converted model runs in {str(self.model.dtype).removeprefix('torch.')}, "
                    f"its stored dtype ({self.quant}-quantized checkpoints load as stored)"
                )
        self.model.eval()
        cfg = self.model.config
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        inner = self.model.model
        self.recorder = Recorder(inner.language_model.layers, inner.language_model.norm)
        self._captured: dict[str, torch.Tensor] = {}
        self._hook = inner.multi_modal_projector.register_forward_hook(self._capture_projector)

    # The attention kernels the converted model runs with (the original side's CLIP tower uses the same).
    ATTENTION = {"text_config": TEXT_ATTENTION, "vision_config": VISION_ATTENTION, "": TEXT_ATTENTION}

    def _load(self):
        if self.quant is not None:
            try:
                import bitsandbytes  # noqa: F401 - lazy: optional, only quantized checkpoints need it
            except ImportError:
                raise LlavaConvertError(
                    f"{self.path / 'config.json'}: {self.quant}-quantized checkpoint; install bitsandbytes to check it"
                ) from None
        # A bitsandbytes checkpoint is loaded as a user loads it, in its stored dtype: transformers casts only
        # the tensors outside its quantized-weight mapping to a different `dtype` (biases but not the weights
        # of the modules left unquantized), and that mixed model cannot run.
        dtype = "auto" if self.quant is not None else self.dtype
        try:
            with quiet():
                model, info = AutoModelForImageTextToText.from_pretrained(
                    str(self.path), dtype=dtype, attn_implementation=self.ATTENTION, output_loading_info=True
                )
        except LlavaConvertError:
            raise
        except Exception as e:  # noqa: BLE001
            raise LlavaConvertError(
                f"{self.path}: transformers cannot load it ({type(e).__name__}: {e})"
            ) from None
        self.missing = sorted(info.get("missing_keys", []))
        return model

    def _load_streaming(self):
        with quiet():
            cfg = AutoConfig.from_pretrained(str(self.path))
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=self.ATTENTION)
        refs = {hf_weight_name(k): r for k, r in read_checkpoint(self.path).items()}
        embed = "model.language_model.embed_tokens.weight"
        if "lm_head.weight" not in refs and cfg.get_text_config().tie_word_embeddings and embed in refs:
            refs["lm_head.weight"] = refs[embed]
        n = cfg.get_text_config().num_hidden_layers
        per_layer: list[dict[str, TensorRef]] = [{} for _ in range(n)]
        rest: dict[str, TensorRef] = {}
        for k, r in refs.items():
            if k.startswith(_LAYERS):
                i, _, sub = k[len(_LAYERS) :].partition(".")
                if i.isdigit() and int(i) < n:
                    per_layer[int(i)][sub] = r
                    continue
            rest[k] = r
        load_outside(model, rest, self.dtype, skip=_LAYERS, where=str(self.path))
        layers = model.model.language_model.layers
        self._streamer = LayerStreamer(layers, lambda i: per_layer[i], self.dtype, str(self.path))
        materialize_buffers(model)
        return model

    def _capture_projector(self, module, args, output):
        self._captured["vision"] = args[0].detach().float().clone()
        self._captured["projector"] = output.detach().float().clone()

    def prompt(self, question: str) -> str:
        """The converted chat template's prompt for one image and QUESTION; raises `PromptError`."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        try:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a missing/broken template is a finding, not a crash
            raise PromptError(f"{type(e).__name__}: {e}".split("\n")[0]) from e

    def generation_config(self, max_new_tokens: int):
        gc_ = copy.deepcopy(self.model.generation_config)
        gc_.update(**GREEDY, max_new_tokens=max_new_tokens, max_length=None)
        return gc_

    def authors_decoding(
        self, max_new_tokens: int, prompt_len: int, vocab: int | None
    ) -> tuple[Any, LogitsProcessorList]:
        """Greedy settings and logits processors that decode as the authors' `generate(inputs_embeds=...)` does:
        their prompt is embeddings, so a `repetition_penalty` of the generation config sees the generated
        tokens only; their model has VOCAB columns (`resize_token_embeddings(len(tokenizer))`), the converted
        one may keep a padded vocabulary."""
        gc_ = self.generation_config(max_new_tokens)
        penalty = gc_.repetition_penalty
        processors = LogitsProcessorList()
        if penalty not in (None, 1.0):
            gc_.repetition_penalty = None
            processors.append(_GeneratedOnly(RepetitionPenaltyLogitsProcessor(penalty), prompt_len))
        if vocab is not None:
            processors.append(_FirstColumns(vocab))
        return gc_, processors

    @torch.inference_mode()
    def run(
        self,
        image: Image.Image,
        question: str,
        original_ids: list[int],
        max_new_tokens: int,
        vocab: int | None = None,
    ) -> ConvertedRun:
        """One image through the converted model; greedy tokens decoded over the original's VOCAB columns."""
        prompt: str | None = None
        prompt_error: PromptError | None = None
        try:
            prompt = self.prompt(question)
        except PromptError as e:  # the ids are then compared on the bare question (they differ)
            prompt_error = e
        with quiet():
            text = prompt if prompt is not None else "<image>\n" + question
            inputs = self.processor(images=image, text=text, return_tensors="pt")
        # Processor outputs the model does not name (an image processor of another class: OneVision's
        # `batch_num_images` on a LlavaNext model) are dropped, and said: `generate(**inputs)` refuses them.
        named = inspect.signature(self.model.forward).parameters
        for key in [k for k in inputs if k not in named]:
            del inputs[key]
            note = (
                f"the converted processor outputs {key!r}, which {type(self.model).__name__} does not take "
                "(generate(**processor(...)) refuses it); left out here"
            )
            if note not in self.notes:
                self.notes.append(note)
        ids = inputs["input_ids"][0].tolist()
        n_img = ids.count(self.image_token_id)
        run = ConvertedRun(
            prompt,
            ids,
            ids,
            inputs["pixel_values"].float().clone(),
            prompt_error=prompt_error,
            image_tokens=n_img,
            image_token_id=self.image_token_id,
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if collapse_image_tokens(ids, self.image_token_id) != original_ids and n_img:
            # Different text: compute the numbers on the original's ids (image expanded as the processor does)
            # so every later stage still lines up position by position.
            used = []
            for t in original_ids:
                used.extend([self.image_token_id] * n_img if t == IMAGE_TOKEN_INDEX else [t])
            run.used_ids = used
            inputs["input_ids"] = torch.tensor([used])
            inputs["attention_mask"] = torch.ones(1, len(used), dtype=torch.long)
        run.image_pos = run.used_ids.index(self.image_token_id) if n_img else 0
        self._captured = {}
        try:
            with quiet(), self.recorder.recording() as rec:
                out = self.model(**inputs, use_cache=False)
            run.logits = out.logits[0].float()
            run.inputs_embeds, run.norm = rec.embeds, rec.norm
            run.layers = [rec.layers[i] for i in range(len(rec.layers))]
            run.vision_features = self._captured.get("vision")
            run.image_features = self._captured.get("projector")
            if max_new_tokens > 0:
                settings, processors = self.authors_decoding(max_new_tokens, len(run.used_ids), vocab)
                with quiet():
                    gen = self.model.generate(**inputs, generation_config=settings, logits_processor=processors)
                run.generated = gen[0, len(run.used_ids) :].tolist()
        except Exception as e:  # noqa: BLE001 - a converted model that cannot run is a failed check
            run.error = f"{type(e).__name__}: {e}".split("\n")[0]
            # The vision stages may have run before the failure (e.g. a feature/token count mismatch).
            run.vision_features = self._captured.get("vision")
            run.image_features = self._captured.get("projector")
        return run

    def close(self) -> None:
        self.recorder.remove()
        self._hook.remove()
        if self._streamer is not None:
            self._streamer.remove()
        self.model = None


class _GeneratedOnly(LogitsProcessor):
    """PROCESSOR applied to the generated tokens only (the ids after the first PROMPT_LEN)."""

    def __init__(self, processor: LogitsProcessor, prompt_len: int):
        self.processor, self.prompt_len = processor, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        return self.processor(generated, scores) if generated.shape[1] else scores


class _FirstColumns(LogitsProcessor):
    """Only the first VOCAB columns can be chosen."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] > self.vocab:
            scores = scores.clone()
            scores[:, self.vocab :] = -float("inf")
        return scores


def collapse_image_tokens(ids: list[int], image_id: int) -> list[int]:
    """HF repeats the image token once per feature; the authors' prompt has one -200 per image."""
    out: list[int] = []
    for t in ids:
        if t == image_id:
            if not out or out[-1] != IMAGE_TOKEN_INDEX:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(t)
    return out


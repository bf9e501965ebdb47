"""The target model's own parameter names and shapes, from transformers itself.

The model is built on the meta device (no memory), and each on-disk (legacy layout) name is translated
with transformers' own checkpoint-conversion rules (`layouts.conversion_rules`), the ones `from_pretrained`
applies when loading. So a plan that passes this check loads with no missing or unexpected keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import LlavaConvertError
from .layouts import MODEL_CLASSES, Rules, conversion_rules


@dataclass
class TargetModel:
    class_name: str
    params: dict[str, tuple[int, ...]]  # in-memory (transformers 5) names
    rules: Rules

    def to_model_name(self, disk_name: str) -> str:
        return self.rules.rename(disk_name, self.params)

    def expected_on_disk(self, disk_names: list[str]) -> dict[str, tuple[int, ...]]:
        """Expected shapes keyed by our on-disk names; parameters no name reaches are listed by model name."""
        out: dict[str, tuple[int, ...]] = {}
        reached = set()
        for n in disk_names:
            m = self.to_model_name(n)
            if m in self.params:
                out[n] = self.params[m]
                reached.add(m)
        for m, shape in self.params.items():
            if m not in reached:
                out[m] = shape
        return out


def build_target(config: dict[str, Any], cfg_path: Any = "config.json") -> TargetModel:
    config_cls, model_cls = MODEL_CLASSES.get(config["model_type"], MODEL_CLASSES["llava"])
    try:
        with torch.device("meta"):
            model = model_cls(config_cls.from_dict(config))
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many types; name the field
        raise LlavaConvertError(f"{cfg_path}: cannot build the target model ({type(e).__name__}: {e})") from None
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:  # the embedding itself: not written (as released)
        params.pop("lm_head.weight", None)
    return TargetModel(model_cls.__name__, params, conversion_rules(model))

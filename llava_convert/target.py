"""The target model's own parameter names and shapes, from transformers itself.

The model is built on the meta device (no memory), and each on-disk (legacy layout) name is translated
with transformers' own checkpoint-conversion rules, the ones `from_pretrained` applies when loading. So a
plan that passes this check loads with no missing or unexpected keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TargetModel:
    class_name: str
    params: dict[str, tuple[int, ...]]  # in-memory (transformers 5) names
    _renamings: list
    _converters: list
    _prefix: str

    def to_model_name(self, disk_name: str) -> str:
        from transformers.core_model_loading import rename_source_key

        name, _ = rename_source_key(disk_name, self._renamings, self._converters, self._prefix, self.params)
        return name

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
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    from .errors import LlavaConvertError

    try:
        if config["model_type"] == "llava_next":
            cfg, cls = LlavaNextConfig.from_dict(config), LlavaNextForConditionalGeneration
        else:
            cfg, cls = LlavaConfig.from_dict(config), LlavaForConditionalGeneration
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many types; name the field
        raise LlavaConvertError(f"{cfg_path}: cannot build the target model ({type(e).__name__}: {e})") from None
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    conv = get_model_conversion_mapping(model)
    ren = [c for c in conv if isinstance(c, WeightRenaming)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    return TargetModel(cls.__name__, params, ren, cvt, model.base_model_prefix)

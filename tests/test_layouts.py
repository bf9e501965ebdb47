"""The key layouts (legacy on disk, transformers 5 in memory) have one owner, `layouts.py`, and every fact
named in a constant is defined in one module only."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from llava_convert import layouts
from llava_convert.check.converted import hf_weight_name
from llava_convert.layouts import (
    LEGACY_ROOTS,
    MODEL_CLASSES,
    conversion_rules,
    spellings,
    to_legacy,
    to_v5,
    under,
)
from llava_convert.quantize import DEFAULT_SKIP, QuantSpec, is_linear_weight, should_quantize

PACKAGE = Path(layouts.__file__).parent

TEXT = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 24, "vocab_size": 40}
VISION = {"model_type": "clip_vision_model", "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
          "intermediate_size": 24, "image_size": 8, "patch_size": 4, "projection_dim": 16}


@pytest.fixture(scope="module", params=sorted(MODEL_CLASSES))
def model(request):
    config_cls, model_cls = MODEL_CLASSES[request.param]
    with torch.device("meta"):
        m = model_cls(config_cls(text_config=TEXT, vision_config=VISION))
    return request.param, m


def test_every_parameter_maps_legacy_to_v5_and_back(model):
    """Each transformers 5 parameter has one legacy name, under a legacy root, that transformers' own loading
    rules (those of this very model) and `to_v5` both bring back to it; `spellings` lists both."""
    model_type, m = model
    params = dict(m.state_dict())
    rules = conversion_rules(m)
    legacy_names = set()
    for name in params:
        legacy = to_legacy(name)
        assert any(under(legacy, root) for root in LEGACY_ROOTS), (name, legacy)
        assert rules.rename(legacy, params) == name
        assert to_v5(legacy, model_type) == name == to_v5(name, model_type) == hf_weight_name(legacy)
        assert to_legacy(legacy) == legacy
        assert legacy in spellings(name) and name in spellings(legacy)
        legacy_names.add(legacy)
    assert len(legacy_names) == len(params)
    assert ("model.image_newline" in params) == (model_type != "llava")  # the tiling models have one


def test_the_4_52_layout_reads_as_legacy():
    """transformers 4.52-4.x kept CLIP's `vision_model` level in memory: its names still find their legacy
    spelling (skip lists written for it keep working)."""
    mid = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    assert to_legacy(mid) == "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    assert to_legacy("model.vision_tower") == "vision_tower"
    assert spellings("vision_tower") == ["vision_tower", "model.vision_tower"]
    assert spellings("vision_tower.vision_model.encoder") == [
        "vision_tower.vision_model.encoder",
        "model.vision_tower.vision_model.encoder",
        "model.vision_tower.encoder",
    ]
    assert to_legacy("k_proj") == "k_proj" and spellings("k_proj") == ["k_proj"]


def test_linear_predicate_is_exactly_the_linear_modules_in_both_layouts(model):
    """`is_linear_weight` picks the weights of the model's `nn.Linear` modules, nothing else, whichever layout
    the name is in (bitsandbytes replaces only Linear modules)."""
    _, m = model
    linears = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears
    for name, p in m.state_dict().items():
        shape = tuple(p.shape)
        assert is_linear_weight(name, shape) == (name in linears), name
        assert is_linear_weight(to_legacy(name), shape) == (name in linears), name


@pytest.mark.parametrize(
    "skip",
    [DEFAULT_SKIP, (), ("vision_tower",), ("model.vision_tower",), ("language_model.model.layers.1",),
     ("model.language_model.layers.0.mlp",), ("k_proj", "lm_head"), ("model.vision_tower.encoder.layers.2",)],
)
def test_skip_lists_decide_the_same_under_both_layouts(model, skip):
    """The quantization policy gives each weight the same answer in the legacy and the transformers 5 layout,
    whichever layout the skip list is spelled in."""
    _, m = model
    spec = QuantSpec("nf4", skip_modules=tuple(skip))
    spec_other = QuantSpec("nf4", skip_modules=tuple(to_legacy(s) if s.startswith("model.") else to_v5(s)
                                                     for s in skip))
    decided = 0
    for name, p in m.state_dict().items():
        shape = tuple(p.shape)
        legacy = to_legacy(name)
        answer = should_quantize(name, shape, spec)
        assert should_quantize(legacy, shape, spec) == answer == should_quantize(name, shape, spec_other), name
        decided += answer
    assert decided > 0


# ------------------------------------------------------------------------------------------------
# constants: defined in one module of the package
# ------------------------------------------------------------------------------------------------

# The CLI repeats quantize.DEFAULT_SKIP so that `--help` does not import torch (test_cli keeps them equal).
FAST_START_COPIES = {("DEFAULT_SKIP", "cli.py")}


def _module_constants() -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_"):
                    if (t.id, rel) not in FAST_START_COPIES:
                        where[t.id].append(rel)
    return where


def test_each_constant_is_defined_in_one_module():
    where = _module_constants()
    for name in ("EMBED_KEY", "DTYPES", "QUANT_TYPES", "HF_MODEL_TYPES"):
        assert len(where[name]) == 1, (name, where[name])
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, f"defined in several modules: {twice}"

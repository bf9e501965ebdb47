"""The mapping engine: every problem found, all at once, naming the table and the rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llava_convert.errors import LlavaConvertError, MappingError
from llava_convert.mapping import check_targets, load_table, map_tensors, mappings_dir, parse_table
from llava_convert.readers import TensorRef


def refs(*names, shape=(2, 2)):
    return {n: TensorRef(n, Path("x.bin"), torch.float16, shape, 0) for n in names}


TABLE = r"""
[[rule]]
source = 'a\.(?P<i>\d+)\.w'
target = 'A.{i}.weight'

[[rule]]
source = 'b\.w'
target = 'B.weight'
when = { kind = "x" }

[[rule]]
source = 'b\.w'
target = 'B2.weight'
when = { kind = "y" }

[[rule]]
source = 'junk\..*'
drop = true
warn = "junk ignored"

[[rule]]
source = 'c\..*'
target = 'C'

[[rule]]
source = 'c\.d'
target = 'D'

[[synthesize]]
target = 'E.weight'
transform = "eye"
when = { kind = "y" }
"""


def test_rules_groups_when_and_drops():
    table = parse_table("t.toml", TABLE)
    problems: list[str] = []
    res = map_tensors(refs("a.0.w", "a.1.w", "b.w", "junk.x", "junk.y"), table, {"kind": "y"}, problems)
    assert problems == []
    assert sorted(e.target for e in res.entries) == ["A.0.weight", "A.1.weight", "B2.weight", "E.weight"]
    assert [d[0] for d in res.dropped] == ["junk.x", "junk.y"]
    assert res.warnings == ["junk ignored (2 key(s), e.g. junk.x)"]
    synth = [e for e in res.entries if e.target == "E.weight"][0]
    assert synth.sources == () and synth.transform == "eye" and synth.rule == "mappings/t.toml synthesize #1"


def test_unmapped_and_ambiguous_reported_together():
    table = parse_table("t.toml", TABLE)
    problems: list[str] = []
    map_tensors(refs("zzz", "c.d", "b.w"), table, {"kind": "none"}, problems)
    assert sorted(problems) == [
        "b.w: no rule in mappings/t.toml matches this key",
        "c.d: matches several target rules (mappings/t.toml rule #5, mappings/t.toml rule #6)",
        "zzz: no rule in mappings/t.toml matches this key",
    ]
    err = MappingError(problems)
    assert str(err).startswith("3 mapping problem(s): b.w: no rule")
    assert "\n" not in str(err)


def test_targets_checked_against_model():
    table = parse_table("t.toml", TABLE)
    problems: list[str] = []
    res = map_tensors(refs("a.0.w", "a.1.w", "c.x"), table, {}, problems)
    for e in res.entries:
        e.shape = e.sources[0].shape
    expected = {"A.0.weight": (2, 2), "A.1.weight": (3, 2), "Missing.weight": (1,)}
    got = check_targets(res.entries, expected, "Model")
    assert got == [
        "A.1.weight: from a.1.w (mappings/t.toml rule #1) has shape (2, 2) but Model expects (3, 2) "
        "(do the weights match config.json?)",
        "C: from c.x (mappings/t.toml rule #5) is not a parameter of Model",
        "Missing.weight: expected by Model but no source key maps to it",
    ]


def test_duplicate_target():
    table = parse_table("t.toml", "[[rule]]\nsource = 'x|y'\ntarget = 'T'\n")
    problems: list[str] = []
    res = map_tensors(refs("x", "y"), table, {}, problems)
    for e in res.entries:
        e.shape = (2, 2)
    got = check_targets(res.entries, {"T": (2, 2)}, "M")
    assert got == ["T: produced twice, from x (mappings/t.toml rule #1) and y (mappings/t.toml rule #1)"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[rule]]\nsource = 'a'\n", "needs source and either target or drop"),
        ("[[rule]]\nsource = '('\ntarget = 'x'\n", "bad regex"),
        ("[[rule]]\nsource = 'a'\ntarget = 'x'\nfoo = 1\n", "unknown field(s) ['foo']"),
        ("[[synthesize]]\ntarget = 'x'\n", "needs target and transform"),
        ("[[rule]\n", "invalid TOML"),
    ],
)
def test_bad_tables(text, needle):
    with pytest.raises(LlavaConvertError, match=None) as ei:
        parse_table("bad.toml", text)
    assert needle in str(ei.value) and "bad.toml" in str(ei.value)


def test_shipped_tables_parse():
    names = sorted(p.name for p in mappings_dir().glob("*.toml"))
    assert "llava.toml" in names and "clip.toml" in names
    for n in names:
        assert load_table(n).rules


DROP_FIRST = r"""
[[rule]]
source = 'v\.general\.(?P<rest>.+)'
target = 'V.{rest}'

[[rule]]
source = 'v\.general\.buffer'
drop = true

[[rule]]
source = 'v\.(other|general\.buffer)'
drop = true
warn = "stray v"
"""


def test_a_drop_wins_over_a_general_rule_and_the_first_drop_is_recorded():
    table = parse_table("t.toml", DROP_FIRST)
    problems: list[str] = []
    res = map_tensors(refs("v.general.w", "v.general.buffer", "v.other"), table, {}, problems)
    assert problems == []
    assert [e.target for e in res.entries] == ["V.w"]
    assert res.dropped == [("v.general.buffer", "mappings/t.toml rule #2"), ("v.other", "mappings/t.toml rule #3")]
    assert res.warnings == ["stray v (1 key(s), e.g. v.other)"]


def test_shipped_table_headers_state_the_semantics_and_name_real_files():
    root = mappings_dir().parent
    for path in mappings_dir().glob("*.toml"):
        text = path.read_text()
        assert "a key matching a drop" in " ".join(text.split()), path.name
        for ref in re.findall(r"llava_convert/[\w/]+\.py", text):
            assert (root / ref).is_file(), f"{path.name} names {ref}, which does not exist"


def _clip_keys(prefix: str, *, position_ids: bool, text: bool) -> list[str]:
    names = [
        "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
        "pre_layrnorm.weight", "post_layernorm.bias", "encoder.layers.0.self_attn.q_proj.weight",
    ]
    keys = [prefix + n for n in names]
    if position_ids:
        keys.append(prefix + "embeddings.position_ids")
    if text:
        keys += ["text_model.embeddings.position_ids", "text_model.embeddings.token_embedding.weight",
                 "text_model.final_layer_norm.weight", "text_projection.weight", "visual_projection.weight",
                 "logit_scale"]
    return keys


@pytest.mark.parametrize(
    ("layout", "prefix", "position_ids", "text"),
    [
        ("CLIPModel saved by transformers 4.21 (the released openai towers)", "vision_model.", True, True),
        ("CLIPModel saved by transformers >= 4.31", "vision_model.", False, True),
        ("CLIPVisionModel saved by transformers 4.x", "vision_model.", False, False),
        ("CLIPVisionModel saved by transformers 4.21", "vision_model.", True, False),
        ("CLIPVisionModel saved by transformers 5", "", False, False),
    ],
)
def test_clip_table_reads_every_tower_layout(layout, prefix, position_ids, text):
    problems: list[str] = []
    res = map_tensors(refs(*_clip_keys(prefix, position_ids=position_ids, text=text)), load_table("clip.toml"),
                      {}, problems)
    assert problems == [], layout
    assert sorted(e.target for e in res.entries) == sorted(
        "vision_tower.vision_model." + k for k in _clip_keys("", position_ids=False, text=False)
    )

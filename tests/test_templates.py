"""Chat-template choice: every mode the authors' name rule can give has a template; the reasons given."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from builders import write_original
from jinja2 import Environment

from llava_convert.authors.templates import (
    AUTHORS_DEFAULT_MODE,
    AUTHORS_NAME_RULES,
    CONV_TEMPLATES,
    RELEASE_NAMES,
    TEMPLATES,
    authors_conv_mode,
    template_for,
)
from llava_convert.convert import plan_conversion
from llava_convert.hub import cached_repo_id


def test_every_mode_the_authors_name_rule_gives_has_a_template():
    modes = {mode for _, mode in AUTHORS_NAME_RULES} | {AUTHORS_DEFAULT_MODE}
    assert modes <= set(TEMPLATES) and modes <= set(CONV_TEMPLATES)
    assert authors_conv_mode("LLaVA-Lightning-MPT-7B-preview") == "mpt"
    for name in [*RELEASE_NAMES, *(marker for marker, _ in AUTHORS_NAME_RULES), "no-marker"]:
        mode = authors_conv_mode(name)
        assert "{%- set IMAGE" in template_for(mode), name  # no "unknown chat template" for any name


def test_jinja_templates_and_the_authors_conversations_are_one_table():
    """The chat templates are generated from the authors' Conversation fields: the same modes, and a
    Conversation edited is a chat template changed."""
    assert set(TEMPLATES) == set(CONV_TEMPLATES)
    for mode, conv in CONV_TEMPLATES.items():
        assert TEMPLATES[mode] == conv.jinja()
        assert conv.jinja() != replace(conv, system=conv.system + "!").jinja(), mode


def test_cached_repo_id_reads_the_cache_layout(tmp_path):
    snap = tmp_path / "hub" / "models--liuhaotian--llava-v1.5-7b" / "snapshots" / "4481d27"
    snap.mkdir(parents=True)
    assert cached_repo_id(snap) == "liuhaotian/llava-v1.5-7b"
    assert cached_repo_id(tmp_path / "hub") is None
    link = tmp_path / "link"
    link.symlink_to(snap)
    assert cached_repo_id(link) == "liuhaotian/llava-v1.5-7b"


def test_folder_name_with_a_marker_but_not_a_release_warns(tmp_path):
    """A linear-projector Llama checkpoint: the config does not decide; 'v1' in a made-up name does, with a warning."""
    ckpt = write_original(tmp_path, "my-v1-finetune", projector="linear")
    plan = plan_conversion(ckpt, vision_tower=tmp_path / "clip")
    assert plan.chat_template == "llava_v1"
    assert plan.chat_template_reason == "from the folder name 'my-v1-finetune' ('v1' in it, the authors' run_llava.py rule)"
    assert len(plan.warnings) == 1 and "does not name a LLaVA release" in plan.warnings[0]


def test_vision_tower_path_from_the_training_machine_suggests_the_hub_id(tmp_path):
    from llava_convert.errors import LlavaConvertError

    ckpt = write_original(tmp_path, "llava-v1.5-tiny")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "./checkpoints/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlavaConvertError, match=r"e\.g\. --vision-tower openai/clip-vit-large-patch14-336 "):
        plan_conversion(ckpt)


@pytest.mark.parametrize("mode", sorted(CONV_TEMPLATES))
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_template_renders_the_authors_get_prompt_over_several_turns(mode, system):
    """Both renderings of a Conversation agree: 2 user turns, an answer, a system message or not."""
    conv = CONV_TEMPLATES[mode] if system is None else replace(CONV_TEMPLATES[mode], system=system)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    got = Environment().from_string(template_for(mode)).render(messages=messages, add_generation_prompt=True)
    user, assistant = conv.roles
    turns = [(user, "<image>\nWhat is it?"), (assistant, "A cat."), (user, "And its colour?"), (assistant, None)]
    assert got == conv.get_prompt(turns)


def test_llama_3_template_writes_the_authors_double_bos():
    """llava_llama_3: the authors' prompt text starts with <|begin_of_text|> and their tokenizer adds BOS in
    front; the converted template writes `bos_token` before the literal one."""
    tpl = template_for("llava_llama_3", bos=True)
    got = Environment().from_string(tpl).render(
        messages=[{"role": "user", "content": "Hi?"}], add_generation_prompt=True, bos_token="<|begin_of_text|>"
    )
    assert got.startswith("<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert got.endswith("<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen_2_is_qwen_1_5():
    """The authors register one Conversation under both names."""
    assert CONV_TEMPLATES["qwen_2"] is CONV_TEMPLATES["qwen_1_5"]
    assert CONV_TEMPLATES["qwen_1_5"].prompt("<image>\nHi?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_expand_pinpoints_reads_a_range_as_the_authors_do():
    from llava_convert.authors.images import expand_pinpoints

    assert expand_pinpoints("(1x1),...,(2x3)", 384) == [
        [384, 384], [384, 768], [384, 1152], [768, 384], [768, 768], [768, 1152]
    ]
    assert expand_pinpoints([[336, 672], [672, 336]], 336) == [[336, 672], [672, 336]]
    assert expand_pinpoints("[[336, 672]]", 336) == [[336, 672]]

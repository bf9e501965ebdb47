"""Chat templates reproducing the authors' conversation templates (`llava/conversation.py`).

`apply_chat_template(messages, add_generation_prompt=True)` renders the same string as the authors'
`Conversation.get_prompt()` for the same turns, with an image item rendered as `<image>\\n` before the
text as the authors' `run_llava.py` does. A converted checkpoint's template also writes `bos_token` first
when the authors' ids start with BOS, and a space where they tokenize a fresh string (see
`processor.PromptStyle`), so that the rendered prompt tokenizes to the authors' ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LlavaConvertError

# Renders a message's content: a plain string, or a list of {"type": "image"} / {"type": "text"} items.
_RENDER = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _system(default: str) -> str:
    return (
        "{%- set system = " + repr(default) + " -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    )


def _sep_two(system: str, user: str, assistant: str, sep: str, sep2: str) -> str:
    """SeparatorStyle.TWO (llava_v1, vicuna_v1): `SYSTEM<sep>USER: q<sep>ASSISTANT: a<sep2>...ASSISTANT:`."""
    return (
        _RENDER
        + _system(system)
        + "{{- system + " + repr(sep) + " -}}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}{{- " + repr(user + ": ") + " + render(message['content']) + "
        + repr(sep) + " -}}"
        "{%- else -%}{{- " + repr(assistant + ": ") + " + render(message['content']) + " + repr(sep2) + " -}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + repr(assistant + ":") + " -}}{%- endif -%}"
    )


def _sep_single(system: str, user: str, assistant: str, sep: str) -> str:
    """SeparatorStyle.SINGLE (llava_v0): `SYSTEM###Human: q###Assistant:`."""
    return (
        _RENDER
        + _system(system)
        + "{{- system + " + repr(sep) + " -}}"
        "{%- for message in loop_messages -%}"
        "{%- set role = " + repr(user) + " if message['role'] == 'user' else " + repr(assistant) + " -%}"
        "{{- role + ': ' + render(message['content']) + " + repr(sep) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + repr(assistant + ":") + " -}}{%- endif -%}"
    )


def _llama_2(system: str, sep: str, sep2: str) -> str:
    """SeparatorStyle.LLAMA_2 (llava_llama_2, mistral_instruct).

    First user turn gets `<<SYS>>` (when the system text is not empty); user turns are `sep + [INST] q [/INST]`,
    assistant turns ` a sep2`; the authors strip `sep` characters from the left of the whole prompt.
    """
    return (
        _RENDER
        + _system(system)
        + "{%- for message in loop_messages -%}"
        "{%- set text = render(message['content']) -%}"
        "{%- if loop.first and system -%}{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- ('' if loop.first else " + repr(sep) + ") + '[INST] ' + text + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + text + ' ' + " + repr(sep2) + " -}}{%- endif -%}"
        "{%- endfor -%}"
    )


def _mpt(system: str, user: str, assistant: str, sep: str) -> str:
    """SeparatorStyle.MPT (chatml_direct, mpt): `SYSTEM<sep><role>msg<sep>...<assistant role>`."""
    return (
        _RENDER
        + _system(system)
        + "{{- system + " + repr(sep) + " -}}"
        "{%- for message in loop_messages -%}"
        "{%- set role = " + repr(user) + " if message['role'] == 'user' else " + repr(assistant) + " -%}"
        "{{- role + render(message['content']) + " + repr(sep) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + repr(assistant) + " -}}{%- endif -%}"
    )


_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, str] = {
    "llava_v1": _sep_two(_V1_SYSTEM, "USER", "ASSISTANT", " ", "</s>"),
    "vicuna_v1": _sep_two(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER",
        "ASSISTANT",
        " ",
        "</s>",
    ),
    "llava_v0": _sep_single(_V1_SYSTEM, "Human", "Assistant", "###"),
    "llava_llama_2": _llama_2(
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        "<s>",
        "</s>",
    ),
    "mistral_instruct": _llama_2("", "", "</s>"),
    "chatml_direct": _mpt(
        "<|im_start|>system\nAnswer the questions.", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"
    ),
    "mpt": _mpt(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
}


def template_for(name: str, *, image_text: str = "<image>\n", bos: bool = False, start: str = "") -> str:
    """The Jinja chat template for one of the authors' conversation modes.

    IMAGE_TEXT is what an image item renders as; with BOS the prompt starts with `bos_token`, then START."""
    try:
        tpl = TEMPLATES[name]
    except KeyError:
        raise LlavaConvertError(
            f"unknown chat template {name!r} (known: {', '.join(sorted(TEMPLATES))})"
        ) from None
    head = "{%- set IMAGE = " + repr(image_text) + " -%}"
    if bos:
        head += "{{- bos_token + " + repr(start) + " -}}"
    return head + tpl


# `llava/eval/run_llava.py`: the first of these substrings found in the lower-cased model name picks the mode;
# a name with none of them gets "llava_v0".
AUTHORS_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("llama-2", "llava_llama_2"),
    ("mistral", "mistral_instruct"),
    ("v1.6-34b", "chatml_direct"),
    ("v1", "llava_v1"),
    ("mpt", "mpt"),
)
AUTHORS_DEFAULT_MODE = "llava_v0"

# The liuhaotian releases (Hub repo names, lower-cased): a folder with one of these names identifies its release.
RELEASE_NAMES = frozenset({
    "llava-v1.5-7b", "llava-v1.5-13b", "llava-v1.5-7b-lora", "llava-v1.5-13b-lora",
    "llava-v1.6-vicuna-7b", "llava-v1.6-vicuna-13b", "llava-v1.6-mistral-7b", "llava-v1.6-34b",
    "llava-llama-2-13b-chat-lightning-preview", "llava-llama-2-7b-chat-lightning-lora-preview",
    "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", "llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5",
    "llava-7b-delta-v0", "llava-13b-delta-v0", "llava-lightning-7b-delta-v1-1", "llava-lightning-mpt-7b-preview",
})


@dataclass(frozen=True)
class TemplateChoice:
    """Which of the authors' conversation modes a conversion uses, and why (shown to the user)."""

    name: str
    reason: str
    warning: str | None = None


def authors_name_rule(model_name: str) -> tuple[str, str | None]:
    """The authors' mode for MODEL_NAME and the substring that decided it (None: nothing matched, the default)."""
    name = model_name.lower()
    for marker, mode in AUTHORS_NAME_RULES:
        if marker in name:
            return mode, marker
    return AUTHORS_DEFAULT_MODE, None


def authors_conv_mode(model_name: str) -> str:
    """The authors' choice of conversation mode from the checkpoint name (`llava/eval/run_llava.py`)."""
    return authors_name_rule(model_name)[0]

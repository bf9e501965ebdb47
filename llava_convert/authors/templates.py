"""The authors' conversation templates (`llava/conversation.py`) and how a model's mode is chosen.

`CONV_TEMPLATES` holds each of the authors' `Conversation`s once, as their fields (system text, roles,
separator style, separators). Both renderings come from that one table:

* `Conversation.get_prompt` / `authors_prompt`: the authors' own algorithm in Python, what the reference
  (`reference.py`) prompts with;
* `TEMPLATES` / `template_for`: a Jinja chat template per mode, written into a converted checkpoint.
  `apply_chat_template(messages, add_generation_prompt=True)` renders the same string as the authors'
  `Conversation.get_prompt()` for the same turns, with an image item rendered as `<image>\\n` before the
  text as the authors' `run_llava.py` does. A converted checkpoint's template also writes `bos_token` first
  when the authors' ids start with BOS, and a space where they tokenize a fresh string (see
  `authors.tokenizer.PromptStyle`), so that the rendered prompt tokenizes to the authors' ids.

The authors' choice of mode from a model name (`run_llava.py`) is `authors_name_rule`; `choose_chat_template`
is how a conversion (and the reference beside it) decides, using the config where the name does not.
The oracle tier checks both renderings against the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LlavaConvertError
from .tokenizer import DEFAULT_IMAGE_TOKEN, IM_END_TOKEN, IM_START_TOKEN, IMAGE_PLACEHOLDER, tokenizer_has

if TYPE_CHECKING:
    from ..original import OriginalCheckpoint


@dataclass(frozen=True)
class Conversation:
    """One of the authors' `Conversation` templates (the fields `get_prompt` reads)."""

    system: str
    roles: tuple[str, str]
    style: str  # SINGLE | TWO | MPT | LLAMA_2 | CHATML | LLAMA_3
    sep: str
    sep2: str | None = None

    def get_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        """`Conversation.get_prompt` for plain-string messages (`None` = the turn to be generated)."""
        if self.style == "SINGLE":
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + ": " + message + self.sep if message else role + ":"
        elif self.style == "TWO":
            seps = [self.sep, self.sep2 or ""]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
        elif self.style == "MPT":
            ret = self.system + self.sep
            for role, message in messages:
                ret += role + message + self.sep if message else role
        elif self.style == "LLAMA_2":
            ret = ""
            for i, (_role, message) in enumerate(messages):
                if not message:
                    continue
                if i == 0 and self.system:
                    message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
                if i % 2 == 0:
                    ret += self.sep + f"[INST] {message} [/INST]"
                else:
                    ret += " " + message + " " + (self.sep2 or "")
            ret = ret.lstrip(self.sep)  # sic: a character-set strip, as the authors do
        elif self.style == "CHATML":  # LLaVA-NeXT's conversation.py
            ret = "" if self.system == "" else self.system + self.sep + "\n"
            for role, message in messages:
                ret += role + "\n" + message + self.sep + "\n" if message else role + "\n"
        elif self.style == "LLAMA_3":
            # LLaVA-NeXT renders these turns with Meta-Llama-3-8B-Instruct's chat template: the system turn
            # always, every turn with a message (`| trim`-med), then the generation prompt.
            turns = [("system", self.system), *((r, m) for r, m in messages if m)]
            ret = LLAMA3_BOS + "".join(_llama3_turn(r, m.strip(), self.sep) for r, m in turns)
            ret += _llama3_turn(self.roles[1], None, self.sep)
        else:
            raise ValueError(f"unknown separator style {self.style!r}")
        return ret

    def prompt(self, query: str) -> str:
        return self.get_prompt([(self.roles[0], query), (self.roles[1], None)])

    def jinja(self) -> str:
        """The Jinja chat template that renders what `get_prompt` does (without the image/BOS header)."""
        user, assistant = self.roles
        if self.style == "SINGLE":
            return _sep_each(self.system, user + ": ", assistant + ": ", self.sep, assistant + ":")
        if self.style == "TWO":
            return _sep_two(self.system, user, assistant, self.sep, self.sep2 or "")
        if self.style == "MPT":
            return _sep_each(self.system, user, assistant, self.sep, assistant)
        if self.style == "LLAMA_2":
            return _llama_2(self.system, self.sep, self.sep2 or "")
        if self.style == "CHATML":
            return _chatml(self.system, user + "\n", assistant + "\n", self.sep)
        if self.style == "LLAMA_3":
            return _llama_3(self.system, self.sep)
        raise ValueError(f"unknown separator style {self.style!r}")


_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
# Llama-3's BOS as Meta-Llama-3-8B-Instruct's chat template writes it (its `bos_token`); the authors' tokenizer
# adds another in front, so their llava_llama_3 ids start with two (`template_for(..., bos=True)` writes the first).
LLAMA3_BOS = "<|begin_of_text|>"


def _llama3_turn(role: str, message: str | None, eot: str) -> str:
    """One turn of Meta-Llama-3-8B-Instruct's chat template (MESSAGE None: the generation prompt)."""
    head = "<|start_header_id|>" + role + "<|end_header_id|>\n\n"
    return head if message is None else head + message + eot


# LLaVA-NeXT's `conv_qwen` (registered as both qwen_1_5 and qwen_2).
_QWEN = Conversation(
    "<|im_start|>system\nYou are a helpful assistant.", ("<|im_start|>user", "<|im_start|>assistant"), "CHATML",
    "<|im_end|>",
)

CONV_TEMPLATES: dict[str, Conversation] = {
    "llava_v0": Conversation(_V1_SYSTEM, ("Human", "Assistant"), "SINGLE", "###"),
    "llava_v1": Conversation(_V1_SYSTEM, ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "vicuna_v1": Conversation(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        ("USER", "ASSISTANT"),
        "TWO",
        " ",
        "</s>",
    ),
    "llava_llama_2": Conversation(
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        ("USER", "ASSISTANT"),
        "LLAMA_2",
        "<s>",
        "</s>",
    ),
    "mistral_instruct": Conversation("", ("USER", "ASSISTANT"), "LLAMA_2", "", "</s>"),
    "chatml_direct": Conversation("<|im_start|>system\nAnswer the questions.", _CHATML_ROLES, "MPT", "<|im_end|>"),
    "mpt": Conversation(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.",
        _CHATML_ROLES,
        "MPT",
        "<|im_end|>",
    ),
    # The LLaVA-NeXT repository's modes (OneVision, Interleave, llava-next-72b/110b; llama3-llava-next-8b).
    "qwen_1_5": _QWEN,
    "qwen_2": _QWEN,
    "llava_llama_3": Conversation(
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.",
        ("user", "assistant"),
        "LLAMA_3",
        "<|eot_id|>",
    ),
}


def authors_prompt(question: str, conv_mode: str, *, im_start_end: bool = False) -> str:
    """The prompt `run_llava.py` builds for one image and QUESTION."""
    image = IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + IM_END_TOKEN if im_start_end else DEFAULT_IMAGE_TOKEN
    if IMAGE_PLACEHOLDER in question:
        qs = question.replace(IMAGE_PLACEHOLDER, image)
    else:
        qs = image + "\n" + question
    try:
        conv = CONV_TEMPLATES[conv_mode]
    except KeyError:
        raise LlavaConvertError(
            f"unknown conversation mode {conv_mode!r} (known: {', '.join(sorted(CONV_TEMPLATES))})"
        ) from None
    return conv.prompt(qs)


# ----------------------------------------------------------------------------------------------------------
# The same templates in Jinja, one builder per separator style
# ----------------------------------------------------------------------------------------------------------

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


def _sep_each(system: str, user: str, assistant: str, sep: str, generation: str) -> str:
    """SeparatorStyle.SINGLE (llava_v0: `SYSTEM###Human: q###Assistant:`) and MPT (chatml_direct, mpt:
    `SYSTEM<sep><role>msg<sep>...<assistant role>`): every turn is its role prefix, the message, `sep`."""
    return (
        _RENDER
        + _system(system)
        + "{{- system + " + repr(sep) + " -}}"
        "{%- for message in loop_messages -%}"
        "{%- set role = " + repr(user) + " if message['role'] == 'user' else " + repr(assistant) + " -%}"
        "{{- role + render(message['content']) + " + repr(sep) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + repr(generation) + " -}}{%- endif -%}"
    )


def _chatml(system: str, user: str, assistant: str, sep: str) -> str:
    """SeparatorStyle.CHATML (qwen_1_5, qwen_2): `SYSTEM<sep>\\n` (nothing for an empty system), then
    `<role>\\nmsg<sep>\\n` per turn, `<assistant role>\\n` to generate."""
    return (
        _RENDER
        + _system(system)
        + "{%- if system -%}{{- system + " + repr(sep + "\n") + " -}}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- set role = " + repr(user) + " if message['role'] == 'user' else " + repr(assistant) + " -%}"
        "{{- role + render(message['content']) + " + repr(sep + "\n") + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + repr(assistant) + " -}}{%- endif -%}"
    )


def _llama_3(system: str, eot: str) -> str:
    """SeparatorStyle.LLAMA_3 (llava_llama_3): Meta-Llama-3-8B-Instruct's chat template with the system turn
    always written, as the authors' `get_prompt` calls it."""
    return (
        _RENDER
        + _system(system)
        + "{{- " + repr(LLAMA3_BOS) + " + " + repr(_llama3_turn("system", None, eot)) + " + system | trim + "
        + repr(eot) + " -}}"
        "{%- for message in loop_messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + render(message['content']) | trim"
        " + " + repr(eot) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    )


# The Jinja chat templates written into converted checkpoints, generated from CONV_TEMPLATES.
TEMPLATES: dict[str, str] = {name: conv.jinja() for name, conv in CONV_TEMPLATES.items()}


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


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# The LLaVA-NeXT repository's families (`OriginalCheckpoint.family`): the mode their model cards use.
FAMILY_TEMPLATES = {"onevision": "qwen_1_5", "interleave": "qwen_1_5", "next_qwen": "qwen_1_5",
                    "llama3": "llava_llama_3"}
# The LLaVA-1.5 / 1.6 recipe (two-layer MLP projector) on a Llama-family LLM: every release of it (Vicuna
# v1.5, and the Yi / Mistral ones decided before this rule) was trained and evaluated with the v1 conversation.
_V1_PROJECTOR = "mlp2x_gelu"


def choose_chat_template(ckpt: OriginalCheckpoint, override: str | None = None) -> TemplateChoice:
    """The authors' conversation mode for CKPT, chosen from what identifies the model, and why.

    In order: `override` (--chat-template); for a LLaVA-NeXT-repository checkpoint, its family's mode (the
    authors' model cards: `qwen_1_5` for the Qwen backbones, `llava_llama_3` for Llama-3); the Hub repo id (SOURCE given as one, or a snapshot folder of the
    HF cache) through the authors' name rule when one of its markers is in the name; the config's own fields
    where they decide it (a Mistral backbone; a ChatML tokenizer, as Yi's; the LLaVA-1.5 / 1.6 MLP projector on
    a Llama backbone); last, as the authors do, the folder name, with a warning when that name is not the name
    of a release.

    Example:
        >>> choose_chat_template(open_original(Path("llava-v1.5-7b"))).name  # doctest: +SKIP
        'llava_v1'
    """
    if override:
        template_for(override)  # an unknown name fails while planning, so --dry-run refuses it too
        return TemplateChoice(override, "given with --chat-template")
    if ckpt.family:
        return TemplateChoice(
            FAMILY_TEMPLATES[ckpt.family],
            f"the authors' model cards' template for {ckpt.family} checkpoints (LLaVA-NeXT repository)",
        )
    if ckpt.repo_id:
        repo_name = ckpt.name
        mode, marker = authors_name_rule(repo_name)
        if marker is not None:
            return TemplateChoice(
                mode, f"from the Hub repo id {ckpt.repo_id} ('{marker}' in its name, the authors' run_llava.py rule)"
            )
    if ckpt.backbone == "mistral":
        return TemplateChoice(
            "mistral_instruct", f"config.json model_type {ckpt.config.get('model_type')!r} (a Mistral backbone)"
        )
    if tokenizer_has(ckpt.tokenizer_dir, CHATML_TOKENS):
        return TemplateChoice("chatml_direct", "the tokenizer has the ChatML tokens <|im_start|> / <|im_end|>")
    if ckpt.projector_type == _V1_PROJECTOR:
        return TemplateChoice(
            "llava_v1",
            f"config.json mm_projector_type {_V1_PROJECTOR!r} on a Llama backbone (the LLaVA-1.5 / 1.6 recipe)",
        )
    name = ckpt.name
    mode, marker = authors_name_rule(name)
    rule = f"'{marker}' in it" if marker else "no marker in it, the authors' default"
    where = f"the Hub repo name {name!r}" if ckpt.repo_id else f"the folder name {name!r}"
    choice = f"from {where} ({rule}, the authors' run_llava.py rule)"
    warning = None
    if name.lower() not in RELEASE_NAMES:
        warning = (
            f"chat template {mode!r} chosen {choice}, which does not name a LLaVA release and config.json does not "
            "decide it; pass --chat-template if the model was trained with another conversation mode"
        )
    return TemplateChoice(mode, choice, warning)

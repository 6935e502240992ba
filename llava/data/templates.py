"""Conversation templates: messages -> text segments, each marked supervised or not.

A template renders a conversation as a list of ``Segment(text, supervised)``. Only assistant replies and their
end-of-turn marker are supervised. The segments joined give the full prompt string; ``llava.data.tokenize`` turns
that into ids and labels. Templates are values passed around, never module state:

    >>> t = get_template("vicuna_v1")
    >>> [s.text for s in t.render([Message("user", "hi"), Message("assistant", "yo")], bos="<s>", eos="</s>")]
    ['<s>A chat between ... USER: hi ASSISTANT:', ' yo</s>']

The segments are never tokenized one by one: ``llava/data/tokenize.py`` tokenizes the joined prompt once and labels
each token by the characters it covers (a token straddling a boundary is supervised when it covers a supervised
character other than leading whitespace), so no boundary has to fall where the tokenizer splits.
``auto`` uses the tokenizer's own chat template and finds the assistant spans by rendering growing prefixes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.records import Message
from llava.errors import UsageValueError


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."


def _split_system(messages: list[Message], default: str) -> tuple[str, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return default, messages


def _pairs(messages: list[Message]) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs; the last assistant is None for a prompt awaiting generation."""
    out: list[tuple[str, str | None]] = []
    for i in range(0, len(messages), 2):
        reply = messages[i + 1].content if i + 1 < len(messages) else None
        out.append((messages[i].content, reply))
    return out


def _render_plain(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    # Stage-1 alignment (LLaVA's conv_llava_plain): only the image placeholders and the caption; human text dropped.
    _, body = _split_system(messages, "")
    segs = [Segment(bos, False)] if bos else []
    for user, reply in _pairs(body):
        segs.append(Segment(DEFAULT_IMAGE_TOKEN * user.count(DEFAULT_IMAGE_TOKEN), False))
        if reply is not None:
            segs.append(Segment(reply + "\n", True))
    return [s for s in segs if s.text]


def _render_vicuna(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    sys_text, body = _split_system(messages, VICUNA_SYSTEM if system is None else system)
    segs: list[Segment] = []
    prefix = bos + (sys_text + " " if sys_text else "")
    for user, reply in _pairs(body):
        segs.append(Segment(f"{prefix}USER: {user} ASSISTANT:", False))
        prefix = ""
        if reply is not None:
            segs.append(Segment(f" {reply}{eos}", True))
    return segs


def _render_llama2(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    sys_text, body = _split_system(messages, LLAVA_LLAMA2_SYSTEM if system is None else system)
    segs: list[Segment] = []
    for i, (user, reply) in enumerate(_pairs(body)):
        if i == 0 and sys_text:
            user = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n{user}"
        segs.append(Segment(f"{bos}[INST] {user} [/INST]", False))
        if reply is not None:
            segs.append(Segment(f" {reply}{eos}", True))
    return segs


def _render_mistral(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    sys_text, body = _split_system(messages, "" if system is None else system)
    segs: list[Segment] = []
    for i, (user, reply) in enumerate(_pairs(body)):
        if i == 0 and sys_text:
            user = f"{sys_text}\n\n{user}"
        segs.append(Segment(f"{bos if i == 0 else ''}[INST] {user} [/INST]", False))
        if reply is not None:
            segs.append(Segment(f" {reply}{eos}", True))
    return segs


def _render_chatml(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    sys_text, body = _split_system(messages, CHATML_SYSTEM if system is None else system)
    segs: list[Segment] = []
    prefix = f"<|im_start|>system\n{sys_text}<|im_end|>\n" if sys_text else ""
    for user, reply in _pairs(body):
        segs.append(Segment(f"{prefix}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False))
        if reply is not None:
            segs.append(Segment(f"{reply}<|im_end|>", True))
            prefix = "\n"
    return segs


def _render_llama3(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    sys_text, body = _split_system(messages, "" if system is None else system)
    segs: list[Segment] = []
    prefix = "<|begin_of_text|>"
    if sys_text:
        prefix += f"<|start_header_id|>system<|end_header_id|>\n\n{sys_text}<|eot_id|>"
    for user, reply in _pairs(body):
        segs.append(
            Segment(
                f"{prefix}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                False,
            )
        )
        prefix = ""
        if reply is not None:
            segs.append(Segment(f"{reply}<|eot_id|>", True))
    return segs


@dataclass(frozen=True)
class ConversationTemplate:
    """A named renderer. ``uses_chat_template`` templates need the tokenizer (``render_with_tokenizer``)."""

    name: str
    renderer: Callable[[list[Message], str | None, str, str], list[Segment]] | None
    uses_bos: bool = True
    description: str = ""

    @property
    def uses_chat_template(self) -> bool:
        return self.renderer is None

    def render(self, messages: list[Message], *, bos: str = "", eos: str = "", system: str | None = None) -> list[Segment]:
        if self.renderer is None:
            raise ValueError(f"template {self.name!r} renders through the tokenizer; call render_with_tokenizer")
        return self.renderer(messages, system, bos if self.uses_bos else "", eos)

    def render_with_tokenizer(self, messages: list[Message], tokenizer, system: str | None = None) -> list[Segment]:
        """Render with the tokenizer's special tokens (or its own chat template for ``auto``)."""
        if self.renderer is not None:
            return self.render(messages, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "", system=system)
        return _render_auto(messages, tokenizer, system)


def _render_auto(messages: list[Message], tokenizer, system: str | None) -> list[Segment]:
    """Segments from ``tokenizer.apply_chat_template`` by rendering growing prefixes of the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageValueError(
            "--version auto uses the tokenizer's chat template, but this tokenizer has none; "
            "pick a named template (plain, vicuna_v1, llama_2, mistral, chatml, llama3)"
        )
    chat = [{"role": m.role, "content": m.content} for m in messages]
    if system is not None and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": system})

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(chat[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    segs: list[Segment] = []
    done = ""
    for i, msg in enumerate(chat):
        if msg["role"] != "assistant":
            continue
        before = render(i, generation_prompt=True)
        after = render(i + 1, generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise UsageValueError(
                "--version auto: the tokenizer's chat template rewrites earlier turns when a turn is added "
                "(e.g. it strips reasoning), so assistant spans cannot be located; use a named template"
            )
        reply = after[len(before) :]
        stripped = reply.rstrip()
        segs.append(Segment(before[len(done) :], False))
        segs.append(Segment(stripped, True))
        done = before + stripped
    full = render(len(chat), generation_prompt=chat[-1]["role"] != "assistant")
    if not full.startswith(done):
        raise UsageValueError("--version auto: the chat template's full rendering does not extend its prefixes")
    if full[len(done) :]:
        segs.append(Segment(full[len(done) :], False))
    return [s for s in segs if s.text]


TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        ConversationTemplate("plain", _render_plain, description="stage-1 captions: <image> + caption"),
        ConversationTemplate("vicuna_v1", _render_vicuna, description="LLaVA-1.5 (Vicuna v1.5)"),
        ConversationTemplate("llama_2", _render_llama2, description="Llama-2-chat [INST] with <<SYS>>"),
        ConversationTemplate("mistral", _render_mistral, description="Mistral-instruct [INST]"),
        ConversationTemplate("chatml", _render_chatml, uses_bos=False, description="Qwen / ChatML"),
        ConversationTemplate("llama3", _render_llama3, uses_bos=False, description="Llama-3-instruct headers"),
        ConversationTemplate("auto", None, description="the tokenizer's own chat template"),
    )
}
TEMPLATE_ALIASES = {"v1": "vicuna_v1", "llava_v1": "vicuna_v1", "v1_mmtag": "vicuna_v1", "qwen_2": "chatml",
                    "llava_llama_2": "llama_2", "mistral_instruct": "mistral", "llava_llama_3": "llama3"}


def get_template(name: str) -> ConversationTemplate:
    """Look up a template by ``--version`` name (original LLaVA aliases accepted)."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise UsageValueError(f"--version {name!r} is not a known template; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[key]

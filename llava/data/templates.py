"""Conversation templates: messages -> text segments, each marked supervised or not, plus the leading BOS.

A template renders a conversation as a list of ``Segment(text, supervised)``. Only assistant replies and their
end-of-turn marker are supervised. ``render_with_tokenizer`` puts the tokenizer's BOS first as a ``special``
segment: ``llava.data.tokenize`` turns it into its id and tokenizes the rest of the text once, which is how the
model's own tokenizer (``tokenizer(prompt)``) and every inference stack place it. Writing ``"<s>"`` into the text
instead would change the first word's token with SentencePiece tokenizers (``<s>A`` gives ``A``, not ``▁A``).

    >>> t = get_template("vicuna_v1")
    >>> [s.text for s in t.render([Message("user", "hi"), Message("assistant", "yo")], eos="</s>")]
    ['A chat between ... USER: hi ASSISTANT:', ' yo</s>']

Each named template equals its reference (see ``docs/data.md``, "Conversation templates"): LLaVA's names follow original
LLaVA's / LLaVA-NeXT's ``conversation.py`` (``plain``, ``vicuna_v1``/``v1``, ``llava_v1``, ``llama_2``,
``llava_llama_2``, ``mistral_instruct``, ``llava_llama_3``), the model names follow the model's published chat
template (``mistral``: Mistral-7B-Instruct-v0.1, ``chatml``: Qwen2, ``llama3``: Llama-3-Instruct). ``auto`` uses the
tokenizer's own chat template and finds the assistant spans by rendering growing prefixes. With LLaVA's default
image placement (``image_front``) a record with one image has its ``<image>`` moved to the front of its turn.
The segments are never tokenized one by one: ``llava/data/tokenize.py`` tokenizes the joined text once and labels
each token by the characters it covers (a token straddling a boundary is supervised when it covers a supervised
character other than leading whitespace), so no boundary has to fall where the tokenizer splits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.data.records import Message
from llava.errors import UsageValueError


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool
    special: bool = False  # a special token placed by id (the leading BOS), never tokenized as text


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_SYSTEM = (  # LLaVA's llava_llama_2 and LLaVA-NeXT's llava_llama_3
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."

Renderer = Callable[[list[Message], "str | None", str, str], list[Segment]]  # (messages, system, bos, eos)


def _split_system(messages: list[Message], default: str | None) -> tuple[str | None, list[Message]]:
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
    # LLaVA's conv_llava_plain / preprocess_plain: the human turn becomes its image placeholders, then the caption
    # and "\n"; the system text and the human words are dropped.
    _, body = _split_system(messages, "")
    segs: list[Segment] = []
    for user, reply in _pairs(body):
        segs.append(Segment(DEFAULT_IMAGE_TOKEN * user.count(DEFAULT_IMAGE_TOKEN), False))
        if reply is not None:
            segs.append(Segment(reply + "\n", True))
    return [s for s in segs if s.text]


def _two_sep(default_system: str) -> Renderer:
    """LLaVA's SeparatorStyle.TWO (``v1``): ``system + " " + "USER: q ASSISTANT: a</s>" ...``."""

    def render(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
        sys_text, body = _split_system(messages, default_system if system is None else system)
        segs: list[Segment] = []
        prefix = sys_text + " "
        for user, reply in _pairs(body):
            segs.append(Segment(f"{prefix}USER: {user} ASSISTANT:", False))
            prefix = ""
            if reply is not None:
                segs.append(Segment(f" {reply}{eos}", True))
        return segs

    return render


def _llava_llama2(default_system: str, turn_sep_is_bos: bool) -> Renderer:
    """LLaVA's SeparatorStyle.LLAMA_2: ``[INST] <<SYS>>..<</SYS>>\\n\\nq [/INST] a </s>`` (sep ``<s>`` or ``""``)."""

    def render(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
        sys_text, body = _split_system(messages, default_system if system is None else system)
        sep = bos if turn_sep_is_bos else ""
        segs: list[Segment] = []
        for i, (user, reply) in enumerate(_pairs(body)):
            if i == 0 and sys_text:
                user = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n{user}"
            segs.append(Segment(f"{sep if i else ''}[INST] {user} [/INST]", False))
            if reply is not None:
                segs.append(Segment(f" {reply} {eos}", True))
        return segs

    return render


def _render_mistral(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    # Mistral-7B-Instruct-v0.1's chat template: bos + " [INST] " (+ system "\n\n" in the first turn) q " [/INST]"
    # + " " a eos, for every turn.
    sys_text, body = _split_system(messages, system)
    segs: list[Segment] = []
    for i, (user, reply) in enumerate(_pairs(body)):
        if i == 0 and sys_text is not None:
            user = f"{sys_text}\n\n{user}"
        segs.append(Segment(f" [INST] {user} [/INST]", False))
        if reply is not None:
            segs.append(Segment(f" {reply}{eos}", True))
    return segs


def _render_chatml(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
    # Qwen2's chat template (LLaVA-NeXT's qwen_2 renders the same): every message
    # "<|im_start|>role\ncontent<|im_end|>\n"; a default system message when the conversation has none.
    sys_text, body = _split_system(messages, CHATML_SYSTEM if system is None else system)
    segs: list[Segment] = []
    prefix = f"<|im_start|>system\n{sys_text}<|im_end|>\n"
    for user, reply in _pairs(body):
        segs.append(Segment(f"{prefix}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False))
        prefix = ""
        if reply is not None:
            segs.append(Segment(f"{reply}<|im_end|>", True))
            segs.append(Segment("\n", False))
    return segs


def _llama3(default_system: str | None) -> Renderer:
    """Llama-3-Instruct's chat template: header + trimmed content + ``<|eot_id|>`` per message."""

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def render(messages: list[Message], system: str | None, bos: str, eos: str) -> list[Segment]:
        sys_text, body = _split_system(messages, default_system if system is None else system)
        segs: list[Segment] = []
        prefix = "" if sys_text is None else f"{header('system')}{sys_text.strip()}<|eot_id|>"
        for user, reply in _pairs(body):
            segs.append(Segment(f"{prefix}{header('user')}{user.strip()}<|eot_id|>{header('assistant')}", False))
            prefix = ""
            if reply is not None:
                segs.append(Segment(f"{reply.strip()}<|eot_id|>", True))
        return segs

    return render


@dataclass(frozen=True)
class ConversationTemplate:
    """A named renderer. ``uses_chat_template`` templates need the tokenizer (``render_with_tokenizer``).

    ``uses_bos``: the rendering starts with the tokenizer's BOS (as an id). ``image_front``: the tokenizer
    (``llava.data.tokenize``) first moves a conversation's single ``<image>`` to the front of its turn
    (``place_images``), as LLaVA-1.5/NeXT do."""

    name: str
    renderer: Renderer | None
    uses_bos: bool = True
    description: str = ""
    image_front: bool = True

    @property
    def uses_chat_template(self) -> bool:
        return self.renderer is None

    def render(self, messages: list[Message], *, bos: str = "", eos: str = "", system: str | None = None) -> list[Segment]:
        """Segments of the text after the BOS (``bos`` is the text of in-conversation BOS separators, llama_2)."""
        if self.renderer is None:
            raise ValueError(f"template {self.name!r} renders through the tokenizer; call render_with_tokenizer")
        return self.renderer(messages, system, bos, eos)

    def render_with_tokenizer(self, messages: list[Message], tokenizer, system: str | None = None) -> list[Segment]:
        """Render with the tokenizer's special tokens (or its own chat template for ``auto``); BOS first, special."""
        return self.renderer_for(tokenizer, system)(messages)

    def renderer_for(self, tokenizer, system: str | None = None) -> Callable[[list[Message]], list[Segment]]:
        """``messages -> render_with_tokenizer(messages, tokenizer, system)``, with what does not depend on the
        messages (the tokenizer's BOS and EOS, the leading BOS segment) looked up once: the index renders a chunk's
        records with one."""
        if self.renderer is None:
            return lambda messages: _render_auto(messages, tokenizer, system)
        bos, eos, renderer = tokenizer.bos_token or "", tokenizer.eos_token or "", self.renderer
        lead = [Segment(bos, False, special=True)] if self.uses_bos and bos else []  # Segment is frozen: shared
        return lambda messages: lead + renderer(messages, system, bos, eos)


def place_images(messages: list[Message], image_front: bool = True) -> list[Message]:
    """LLaVA's placement: with one ``<image>`` in the conversation, its message becomes
    ``("<image>\\n" + rest.strip()).strip()`` (so ``"<image>"`` alone when it has no other text).

    Multi-image conversations (and ``image_front=False``) keep the record's own placement. A video record's one
    ``<video>`` (and nothing else visual) is placed the same way, as LLaVA-NeXT places its video's ``<image>``."""
    n_images = sum([m.content.count(DEFAULT_IMAGE_TOKEN) for m in messages])
    n_videos = sum([m.content.count(DEFAULT_VIDEO_TOKEN) for m in messages])
    if not image_front or n_images + n_videos != 1:
        return messages
    token = DEFAULT_IMAGE_TOKEN if n_images else DEFAULT_VIDEO_TOKEN
    out = []
    for m in messages:
        if token in m.content:
            m = Message(m.role, (token + "\n" + m.content.replace(token, "").strip()).strip())
        out.append(m)
    return out


def _render_auto(messages: list[Message], tokenizer, system: str | None) -> list[Segment]:
    """Segments from ``tokenizer.apply_chat_template`` by rendering growing prefixes of the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageValueError(
            "--version auto uses the tokenizer's chat template, but this tokenizer has none; "
            f"pick a named template ({', '.join(n for n in TEMPLATES if n != 'auto')})"
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
    # A BOS the tokenizer's template writes stays text: ids = what apply_chat_template(tokenize=True) gives.
    return [s for s in segs if s.text]


TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t
    for t in (
        ConversationTemplate("plain", _render_plain, description="LLaVA stage-1 captions: <image> + caption"),
        ConversationTemplate("vicuna_v1", _two_sep(VICUNA_SYSTEM), description="LLaVA-1.5 v1 (Vicuna v1.5)"),
        ConversationTemplate("llava_v1", _two_sep(LLAVA_V1_SYSTEM), description="LLaVA llava_v1 (human system)"),
        ConversationTemplate("llama_2", _llava_llama2(LLAMA2_SYSTEM, True), description="LLaVA llama_2"),
        ConversationTemplate("llava_llama_2", _llava_llama2(LLAVA_LLAMA_SYSTEM, True), description="LLaVA llava_llama_2"),
        ConversationTemplate("mistral_instruct", _llava_llama2("", False), description="LLaVA mistral_instruct"),
        ConversationTemplate("mistral", _render_mistral, description="Mistral-Instruct's chat template"),
        ConversationTemplate("chatml", _render_chatml, uses_bos=False, description="Qwen2 / ChatML chat template"),
        ConversationTemplate("llama3", _llama3(None), description="Llama-3-Instruct's chat template"),
        ConversationTemplate("llava_llama_3", _llama3(LLAVA_LLAMA_SYSTEM), description="LLaVA-NeXT llava_llama_3"),
        ConversationTemplate("auto", None, uses_bos=False, description="the tokenizer's own chat template"),
    )
}
TEMPLATE_ALIASES = {"v1": "vicuna_v1", "qwen_2": "chatml", "qwen_1_5": "chatml"}  # LLaVA-NeXT: both are conv_qwen


def get_template(name: str, *, image_front: bool = True) -> ConversationTemplate:
    """Look up a template by ``--version`` name (original LLaVA names accepted); ``image_front=False`` keeps the
    records' own ``<image>`` placement (``--image_placement keep``)."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = sorted([*TEMPLATES, *TEMPLATE_ALIASES])
        raise UsageValueError(f"--version {name!r} is not a known template; choose one of {known}")
    template = TEMPLATES[key]
    return template if template.image_front == image_front else dataclasses.replace(template, image_front=image_front)

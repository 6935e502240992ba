"""Jinja chat templates saved with every checkpoint: ``processor.apply_chat_template`` renders what training did.

    set_chat_template(processor, get_template("vicuna_v1"))   # training and import do this; save_pretrained writes it

For each named conversation template (``llava.data.templates``) a Jinja template renders the same text, so
``processor.apply_chat_template(conversation, tokenize=True)`` (and serving stacks that use the saved template) give
the training ids. The BOS goes where training puts it, as an id: when the tokenizer adds it itself
(``tokenizer("x")`` starts with it, Llama/Mistral SentencePiece tokenizers) the template leaves it out and the
processor's tokenization adds it; otherwise the template writes ``bos_token`` (the processor then tokenizes
without adding special tokens); for a template that places no BOS (``chatml``, ``auto``) the saved tokenizer stops
adding one (``add_bos_token`` False). A message's content is a string (``<image>`` where the image goes; with the
default ``--image_placement front``, one ``<image>`` in the conversation moves to the front of its turn, as in
training) or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts: its images come first, each
``"<image>\\n"``, then its text, stripped, which is LLaVA's placement. ``auto`` keeps the tokenizer's own chat
template (strings rendered as given: send them as training placed them).
"""

from __future__ import annotations

import json

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.data import templates as T

_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys = content(messages[0]) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set sys = DEFAULT -%}{%- set loop_messages = messages -%}{%- endif -%}"
)


def _content_macro(image: str, image_front: bool) -> str:
    """``content(m)``: a string as it is, or with ``image_front`` and one ``<image>`` in the whole conversation,
    ``("<image>\\n" + rest.strip()).strip()`` (``templates.place_images``); parts: images first, then the text,
    stripped as that is. ``<image>`` wrapped if asked."""
    tok = DEFAULT_IMAGE_TOKEN
    lit = json.dumps(image + "\n")
    wrap = "" if image == tok else f".replace('{tok}', {json.dumps(image)})"
    string = f"m['content']{wrap}"
    if image_front:
        string = (f"((('{tok}\\n' + (m['content'].replace('{tok}', '') | trim)) | trim) if n_images() == '1' and "
                  f"'{tok}' in m['content'] else m['content']){wrap}")
    return (
        "{%- macro n_images() -%}{%- set ns = namespace(n=0) -%}{%- for x in messages -%}"
        f"{{%- if x['content'] is string -%}}{{%- set ns.n = ns.n + x['content'].count('{tok}') -%}}"
        "{%- else -%}{%- for p in x['content'] if p['type'] == 'image' -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}"
        "{%- endif -%}{%- endfor -%}{{ ns.n }}{%- endmacro -%}"
        "{%- macro content(m) -%}"
        f"{{%- if m['content'] is string -%}}{{{{ {string} }}}}"
        "{%- else -%}{%- set ns = namespace(text='', images=0) -%}"
        "{%- for p in m['content'] -%}"
        "{%- if p['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}"
        "{%- elif p['type'] == 'text' -%}{%- set ns.text = ns.text + p['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        f"{{{{ (({lit} * ns.images + (ns.text | trim)) | trim) if ns.images else ns.text }}}}"
        "{%- endif -%}"
        "{%- endmacro -%}"
    )


def _bodies(default_system: str | None) -> dict[str, str]:
    default = "none" if default_system is None else json.dumps(default_system)
    split = _SPLIT_SYSTEM.replace("DEFAULT", default)
    return {
        "plain": (
            "BOS{%- for m in messages if m['role'] != 'system' -%}"
            f"{{%- if m['role'] == 'user' -%}}{{{{ '{DEFAULT_IMAGE_TOKEN}' * (content(m).count('{DEFAULT_IMAGE_TOKEN}')) }}}}"
            "{%- else -%}{{ content(m) + '\n' }}{%- endif -%}{%- endfor -%}"
        ),
        "two_sep": (
            split + "BOS{{ sys + ' ' }}{%- for m in loop_messages -%}"
            "{%- if m['role'] == 'user' -%}{{ 'USER: ' + content(m) + ' ASSISTANT:' }}"
            "{%- else -%}{{ ' ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"
        ),
        "llava_llama2": (
            split + "BOS{%- for m in loop_messages -%}"
            "{%- if m['role'] == 'user' -%}{%- set c = content(m) -%}"
            "{%- if loop.first and sys -%}{%- set c = '<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + c -%}{%- endif -%}"
            "{{ ('' if loop.first else SEP) + '[INST] ' + c + ' [/INST]' }}"
            "{%- else -%}{{ ' ' + content(m) + ' ' + eos_token }}{%- endif -%}{%- endfor -%}"
        ),
        "mistral": (
            split + "BOS{%- for m in loop_messages -%}"
            "{%- if m['role'] == 'user' -%}{%- set c = content(m) -%}"
            "{%- if loop.first and sys is not none -%}{%- set c = sys + '\n\n' + c -%}{%- endif -%}"
            "{{ ' [INST] ' + c + ' [/INST]' }}"
            "{%- else -%}{{ ' ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"
        ),
        "chatml": (
            split + "{{ '<|im_start|>system\n' + sys + '<|im_end|>\n' }}{%- for m in loop_messages -%}"
            "{{ '<|im_start|>' + m['role'] + '\n' + content(m) + '<|im_end|>\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
        ),
        "llama3": (
            split + "BOS{%- if sys is not none -%}"
            "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + (sys | trim) + '<|eot_id|>' }}{%- endif -%}"
            "{%- for m in loop_messages -%}"
            "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (content(m) | trim) + '<|eot_id|>' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
        ),
    }


# template name -> (body kind, default system, turn separator of LLaVA's LLAMA_2 style)
_KINDS: dict[str, tuple[str, str | None, str]] = {
    "plain": ("plain", None, ""),
    "vicuna_v1": ("two_sep", T.VICUNA_SYSTEM, ""),
    "llava_v1": ("two_sep", T.LLAVA_V1_SYSTEM, ""),
    "llama_2": ("llava_llama2", T.LLAMA2_SYSTEM, "bos_token"),
    "llava_llama_2": ("llava_llama2", T.LLAVA_LLAMA_SYSTEM, "bos_token"),
    "mistral_instruct": ("llava_llama2", "", "''"),
    "mistral": ("mistral", None, ""),
    "chatml": ("chatml", T.CHATML_SYSTEM, ""),
    "llama3": ("llama3", None, ""),
    "llava_llama_3": ("llama3", T.LLAVA_LLAMA_SYSTEM, ""),
}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` (special tokens on, as the processor calls it) starts with the BOS id."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def chat_template_for(template: T.ConversationTemplate, tokenizer, mm_use_im_start_end: bool = False) -> str | None:
    """The Jinja chat template that renders ``template`` for this tokenizer (``auto``: the tokenizer's own)."""
    if template.uses_chat_template:
        return getattr(tokenizer, "chat_template", None)
    kind, default_system, sep = _KINDS[template.name]
    image = DEFAULT_IMAGE_TOKEN
    if mm_use_im_start_end:
        image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    bos = "{{ bos_token }}" if template.uses_bos and tokenizer.bos_token and not tokenizer_adds_bos(tokenizer) else ""
    body = _bodies(default_system)[kind].replace("BOS", bos).replace("SEP", sep)
    return _content_macro(image, template.image_front) + body


def set_chat_template(processor, template: T.ConversationTemplate, mm_use_im_start_end: bool = False) -> None:
    """Give the processor and its tokenizer the chat template of ``template`` (what ``save_pretrained`` writes)."""
    chat_template = chat_template_for(template, processor.tokenizer, mm_use_im_start_end)
    processor.chat_template = chat_template
    processor.tokenizer.chat_template = chat_template
    if not template.uses_bos and tokenizer_adds_bos(processor.tokenizer):
        # chatml / auto place no BOS of their own (auto: only one its chat template writes), so training has none;
        # a tokenizer that adds one would give processor.apply_chat_template and tokenizer(prompt) an extra first id.
        processor.tokenizer.add_bos_token = False

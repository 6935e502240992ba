"""Every named template against its reference, with a real SentencePiece and a byte-level BPE tokenizer.

    pytest tests/data/test_template_references.py

The references are written here from the public definitions, not from the project's code: original LLaVA's
``conversation.py`` (SeparatorStyle.TWO for v1/llava_v1, LLAMA_2 for llama_2/llava_llama_2/mistral_instruct, with the
conditional ``<<SYS>>`` wrap of its latest version; ``preprocess_plain``; ``preprocess_multimodal``'s image
placement), LLaVA-NeXT's ``llava_llama_3`` (Meta's Llama-3 template with LLaVA's system message first), and the
models' published Jinja chat templates (Mistral-7B-Instruct-v0.1, Qwen2, Llama-3-Instruct) rendered by jinja2.
The reference ids are the reference prompt tokenized the reference way: the BOS id, then the text (a BOS the Jinja
template writes is that id). For every template, with both tokenizers, and >= 15 conversations (system prompts, empty
system, multi-turn, whitespace, newlines, unicode, images anywhere, several images): ``input_ids`` equal the reference
ids, and each run of supervised tokens decodes to exactly one assistant reply plus its end-of-turn marker, starting
no earlier than the reply's own text (so moving one label breaks the test). ``auto`` with each published template set
on the tokenizer equals that template's reference. ``mistral`` is also held, id for id, against Mistral's own library
(mistral-common's v1 instruct tokenizer).
"""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer

from llava.constants import IGNORE_INDEX
from llava.data.records import Message
from llava.data.templates import TEMPLATES, get_template
from llava.data.tokenize import build_generation_prompt, tokenize_conversation
from llava.demo.tiny_models import train_tiny_tokenizer
from llava.model.builder import add_multimodal_tokens

IMG = "<image>"
N_IMAGE_TOKENS = 3

VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the human's questions.")
META_LLAMA2 = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
               "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
               "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
               "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
               "something not correct. If you don't know the answer to a question, please don't share false "
               "information.")
LLAVA_LLAMA = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
               "the user provides, and assist the user with a variety of tasks using natural language.")

# The models' published chat templates (tokenizer_config.json "chat_template").
MISTRAL_V01_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)
QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def C(*turns: str, system: str | None = None) -> list[Message]:
    msgs = [Message("system", system)] if system is not None else []
    return msgs + [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


CONVERSATIONS = {
    "image_front": C(f"{IMG}\nWhat colour is the shape?", "It is red."),
    "image_after": C(f"What colour is the shape? {IMG}", "Blue."),
    "image_middle": C(f"Look at this:\n{IMG}\nHow many circles?", "Three circles."),
    "image_no_newline": C(f"{IMG}Describe it.", "A square."),
    "multi_turn": C(f"{IMG}\nWhat is it?", "A cat.", "What colour?", "Black and white.", "Is it asleep?", "Yes."),
    "text_only": C("What is 2 + 2?", "4", "And 3 + 3?", "6"),
    "system": C(f"{IMG}\nWhat is it?", "A dog.", system="Answer in a few words."),
    "empty_system": C(f"{IMG}\nWhat is it?", "A dog.", system=""),
    "whitespace": C(f"  {IMG}\n  Where is it?  \n", "  On the left.  ", " next? ", "\tDone.\n"),
    "newlines": C(f"{IMG}\nList:\n- one\n\n- two", "one\ntwo\n\nthree"),
    "unicode": C(f"{IMG}\nQu'est-ce que c'est ? 猫か犬か", "C'est un chat 🐱, très mignon — café."),
    "two_images_one_turn": C(f"{IMG}\n{IMG}\nAre they the same?", "No, they differ."),
    "two_images_two_turns": C(f"{IMG}\nFirst one?", "A circle.", f"And this one? {IMG}", "A triangle."),
    "punctuation": C(f"{IMG}\nCompute (x) [y] {{z}}: 3.14 * 2?", "6.28; (approx.) [ok] {done}"),
    "trailing_newline_reply": C(f"{IMG}\nCaption?", "A red circle on a white background.\n"),
    "system_multi_turn_image_late": C("Hi there.", "Hello!", f"What about this {IMG} picture?", "It shows a tree.",
                                      system="You are terse."),
    "image_only": C(IMG, "A photo of a cat."),
    "caption_spaces": C(f"{IMG}\n", "  a dog on the grass  "),
    "caption_lines": C(f"{IMG}\nDescribe.", "Line one.\nLine two."),
    "image_between_words": C(f"Caption {IMG} please", "3 apples, 2 pears & 1 kiwi (total: 6)."),
    "quotes": C(f"{IMG}\n\"Quoted\" question?", "He said: \"hello\" — and left…"),
    "cjk_emoji": C(f"{IMG} 描述一下", "一只猫 🐈 在睡觉。"),
    "three_images": C(f"{IMG}{IMG}\n{IMG}\nCompare.", "All three are squares."),
}
assert len(CONVERSATIONS) >= 15
PLAIN_CONVERSATIONS = [n for n, c in CONVERSATIONS.items()  # preprocess_plain: one image turn, one caption
                       if len(c) == 2 and c[0].role == "user" and IMG in c[0].content]
assert len(PLAIN_CONVERSATIONS) >= 15


# --- reference renderings ----------------------------------------------------------------------------------------

def llava_preprocess_multimodal(msgs: list[Message]) -> list[Message]:
    """LLaVA-1.5 train.py preprocess_multimodal, for a record with one image (multi-image records: as given)."""
    if sum(m.content.count(IMG) for m in msgs) != 1:
        return msgs
    out = []
    for m in msgs:
        value = m.content
        if IMG in value:
            value = value.replace(IMG, "").strip()
            value = (IMG + "\n" + value).strip()
        out.append(Message(m.role, value))
    return out


def _system_and_turns(msgs, default):
    if msgs and msgs[0].role == "system":
        return msgs[0].content, [m.content for m in msgs[1:]]
    return default, [m.content for m in msgs]


def llava_two(default_system):
    def render(msgs, generation):  # SeparatorStyle.TWO, roles USER/ASSISTANT, sep " ", sep2 "</s>"
        system, turns = _system_and_turns(msgs, default_system)
        messages = [("USER" if i % 2 == 0 else "ASSISTANT", t) for i, t in enumerate(turns)]
        if generation:
            messages.append(("ASSISTANT", None))
        seps = [" ", "</s>"]
        ret = system + seps[0]
        for i, (role, message) in enumerate(messages):
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return "<s>", ret
    return render


def llava_llama2(default_system, sep):
    def render(msgs, generation):  # SeparatorStyle.LLAMA_2, sep2 "</s>"
        system, turns = _system_and_turns(msgs, default_system)
        ret = ""
        for i, message in enumerate(turns):
            if i == 0:
                message = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if len(system) > 0 else system) + message
            ret += sep + f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " " + "</s>"
        return "<s>", ret.lstrip(sep)
    return render


def llava_plain(msgs, generation):  # preprocess_plain: <image> + caption + conv.sep ("\n")
    turns = [m.content for m in msgs if m.role != "system"]
    return "<s>", IMG * turns[0].count(IMG) + ("" if generation else turns[1] + "\n")


def jinja_reference(source, default_system=None):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)

    def render(msgs, generation):
        chat = [{"role": m.role, "content": m.content} for m in msgs]
        if default_system is not None and chat[0]["role"] != "system":
            chat.insert(0, {"role": "system", "content": default_system})
        text = env.from_string(source).render(messages=chat, bos_token="<s>", eos_token="</s>",
                                              add_generation_prompt=generation)
        return ("<s>", text[3:]) if text.startswith("<s>") else ("", text)
    return render


REFERENCES = {
    "plain": llava_plain,
    "vicuna_v1": llava_two(VICUNA),
    "llava_v1": llava_two(LLAVA_V1),
    "llama_2": llava_llama2(META_LLAMA2, "<s>"),
    "llava_llama_2": llava_llama2(LLAVA_LLAMA, "<s>"),
    "mistral_instruct": llava_llama2("", ""),
    "mistral": jinja_reference(MISTRAL_V01_JINJA),
    "chatml": jinja_reference(QWEN2_JINJA),
    "llama3": jinja_reference(LLAMA3_JINJA),
    "llava_llama_3": jinja_reference(LLAMA3_JINJA, default_system=LLAVA_LLAMA),
}
# What each template renders for a reply from the end of the prompt before it on: the separator the reference puts
# first (a space in LLaVA's "ASSISTANT: " and " [/INST] "), the reply, its end-of-turn marker (from the definitions
# above). The supervised tokens decode to this text, less at most its leading whitespace.
SUPERVISED = {
    "plain": lambda r: r + "\n", "vicuna_v1": lambda r: " " + r + "</s>", "llava_v1": lambda r: " " + r + "</s>",
    "llama_2": lambda r: " " + r + " </s>", "llava_llama_2": lambda r: " " + r + " </s>",
    "mistral_instruct": lambda r: " " + r + " </s>", "mistral": lambda r: " " + r + "</s>",
    "chatml": lambda r: r + "<|im_end|>",
    "llama3": lambda r: r.strip() + "<|eot_id|>", "llava_llama_3": lambda r: r.strip() + "<|eot_id|>",
}
# Both tokenizers, every template: the SentencePiece one (Llama/Mistral family) gets the ChatML and Llama-3 markers
# as special tokens, as a user adding them to such a vocabulary would; the byte-level BPE one has them already.
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CASES = [(kind, t) for kind in ("sentencepiece", "bpe") for t in REFERENCES]
# ``auto`` renders the tokenizer's own chat template: with each published template set on the tokenizer it must
# give what the template's named twin's reference gives.
AUTO_CASES = [(kind, t) for kind in ("sentencepiece", "bpe") for t in ("mistral", "chatml", "llama3")]
JINJA = {"mistral": MISTRAL_V01_JINJA, "chatml": QWEN2_JINJA, "llama3": LLAMA3_JINJA}


@pytest.fixture(scope="module")
def tokenizers(sentencepiece_tokenizer_dir):
    sp = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir)
    texts = [m.content.replace(IMG, "") for c in CONVERSATIONS.values() for m in c] + [VICUNA, META_LLAMA2, LLAVA_LLAMA]
    bpe = train_tiny_tokenizer(texts, vocab_size=600)
    sp.add_special_tokens({"additional_special_tokens": CHAT_MARKERS})
    for tok in (sp, bpe):
        add_multimodal_tokens(tok, False)
        assert all(len(tok(m, add_special_tokens=False)["input_ids"]) == 1 for m in CHAT_MARKERS)
    assert sp.convert_ids_to_tokens(sp("A chat")["input_ids"]) == ["<s>", "▁A", "▁chat"]
    return {"sentencepiece": sp, "bpe": bpe}


def reference_ids(tok, name, msgs, generation=False) -> list[int]:
    placed = llava_preprocess_multimodal(msgs)  # LLaVA's data step, before any template (default placement)
    bos, text = REFERENCES[name](placed, generation)
    if bos:  # LLaVA: tokenizer(prompt) adds the BOS id; Jinja templates write bos_token: the same id
        text = text.replace("<s>", tok.bos_token).replace("</s>", tok.eos_token)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = [i for t in ids for i in ([t] * N_IMAGE_TOKENS if t == tok.convert_tokens_to_ids(IMG) else [t])]
    return ([tok.bos_token_id] if bos else []) + ids


def supervised_runs(tok, ids, labels) -> list[str]:
    runs, current = [], []
    for tid, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def _conversations(name):
    return PLAIN_CONVERSATIONS if name == "plain" else list(CONVERSATIONS)


def test_every_template_has_a_reference():
    assert set(REFERENCES) | {"auto"} == set(TEMPLATES)
    assert {get_template(alias).name for alias in ("v1", "qwen_2", "qwen_1_5")} == {"vicuna_v1", "chatml"}


def check_against_reference(tok, name, template, msgs, conv_name):
    """ids = the reference prompt's ids; each run of supervised tokens is one reply as the reference renders it."""
    sample = tokenize_conversation(msgs, template, tok, image_token_id=tok.convert_tokens_to_ids(IMG),
                                   num_image_tokens=N_IMAGE_TOKENS, model_max_length=100_000)
    assert sample.input_ids == reference_ids(tok, name, msgs), (conv_name, tok.convert_ids_to_tokens(
        sample.input_ids), tok.convert_ids_to_tokens(reference_ids(tok, name, msgs)))
    replies = [SUPERVISED[name](m.content) for m in msgs if m.role == "assistant"]
    runs = supervised_runs(tok, sample.input_ids, sample.labels)
    assert len(runs) == len(replies), conv_name
    for run, reply in zip(runs, replies):  # the run starts inside the reply's text, at most its leading space left out
        assert reply.endswith(run) and run.lstrip() == reply.lstrip(), (conv_name, run, reply)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_training_ids_equal_reference_and_labels_are_the_replies(tokenizers, kind, name):
    for conv_name in _conversations(name):
        check_against_reference(tokenizers[kind], name, get_template(name), CONVERSATIONS[conv_name], conv_name)


@pytest.mark.parametrize(("kind", "name"), AUTO_CASES)
def test_auto_with_a_published_chat_template_equals_its_reference(tokenizers, kind, name):
    tok = tokenizers[kind]
    saved = tok.chat_template
    tok.chat_template = JINJA[name]
    try:
        for conv_name in CONVERSATIONS:
            check_against_reference(tok, name, get_template("auto"), CONVERSATIONS[conv_name], conv_name)
            msgs = CONVERSATIONS[conv_name][:-1]
            ids = build_generation_prompt(msgs, get_template("auto"), tok, image_token_id=tok.convert_tokens_to_ids(IMG),
                                          num_image_tokens=N_IMAGE_TOKENS)
            assert ids == reference_ids(tok, name, msgs, generation=True), conv_name
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_generation_prompt_equals_reference(tokenizers, kind, name):
    tok = tokenizers[kind]
    for conv_name in _conversations(name):
        msgs = CONVERSATIONS[conv_name][:-1]
        ids = build_generation_prompt(msgs, get_template(name), tok, image_token_id=tok.convert_tokens_to_ids(IMG),
                                      num_image_tokens=N_IMAGE_TOKENS)
        assert ids == reference_ids(tok, name, msgs, generation=True), conv_name


def test_bos_is_an_id_not_text(tokenizers):
    """The issue's symptom: "<s>" written into the text made SentencePiece drop the first word's '▁'."""
    tok = tokenizers["sentencepiece"]
    for name, first in (("vicuna_v1", "▁A"), ("llama_2", "▁["), ("mistral", "▁[")):
        sample = tokenize_conversation(CONVERSATIONS["text_only"], get_template(name), tok, image_token_id=0,
                                       num_image_tokens=1, model_max_length=4096)
        assert tok.convert_ids_to_tokens(sample.input_ids[:2]) == ["<s>", first], name


def test_image_placement_keep_leaves_the_record_as_written(tokenizers):
    tok = tokenizers["bpe"]
    msgs = CONVERSATIONS["image_after"]
    kept = tokenize_conversation(msgs, get_template("vicuna_v1", image_front=False), tok,
                                 image_token_id=tok.convert_tokens_to_ids(IMG), num_image_tokens=1, model_max_length=4096)
    text = "<s>" + VICUNA + " USER: " + msgs[0].content + " ASSISTANT: " + msgs[1].content + "</s>"
    assert kept.input_ids == [tok.bos_token_id] + tok(text[3:], add_special_tokens=False)["input_ids"]
    moved = tokenize_conversation(msgs, get_template("vicuna_v1"), tok, image_token_id=tok.convert_tokens_to_ids(IMG),
                                  num_image_tokens=1, model_max_length=4096)
    assert moved.input_ids != kept.input_ids


MISTRAL_COMMON_CONVERSATIONS = [
    CONVERSATIONS["text_only"],
    C("Hello there, how are you?", "Fine, thanks.", "Tell me a joke.", "Why did the chicken cross the road?"),
    C("Qu'est-ce que c'est ? 猫か犬か", "C'est un chat 🐱 — très mignon.", "Et ça ?", "Un café."),
    C("List:\n- one\n\n- two", "one\ntwo\n\nthree"),
]


@pytest.mark.parametrize("index", range(len(MISTRAL_COMMON_CONVERSATIONS)))
def test_mistral_equals_mistral_commons_own_tokenization(tokenizers, index):
    """Mistral's own library (mistral-common, v1 instruct tokenizer: the same SentencePiece model) as the reference."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    msgs = MISTRAL_COMMON_CONVERSATIONS[index]
    request = InstructRequest(messages=[UserMessage(content=m.content) if m.role == "user"
                                        else AssistantMessage(content=m.content) for m in msgs])
    expected = MistralTokenizer.v1().instruct_tokenizer.encode_instruct(request).tokens
    sample = tokenize_conversation(msgs, get_template("mistral"), tokenizers["sentencepiece"], image_token_id=-1,
                                   num_image_tokens=1, model_max_length=4096)
    assert sample.input_ids == expected

"""Conversation -> ``input_ids`` + ``labels`` with exact masks, image placeholders expanded to feature count.

The template renders supervised/unsupervised text segments after a leading BOS; the BOS enters as its id and the
joined text is tokenized once (so the ids are exactly ``tokenizer(prompt)``, what inference sees for the same prompt),
and each token is labelled from the character span it covers:
a token is supervised when it covers a character of a supervised segment (leading whitespace excluded,
so a space-prefixed reply token counts as the reply's). There is no
re-tokenize-and-count step, so LLaVA's "tokenization mismatch" cannot occur. Each ``<image>`` token is then
expanded to ``num_image_tokens`` copies (never labelled), and truncation never cuts into an image.

    ids, labels = tokenize_conversation(record.messages, template, tokenizer, image_token_id=32000,
                                        num_image_tokens=576, model_max_length=2048)
"""

from __future__ import annotations

from dataclasses import dataclass

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_VIDEO_TOKEN,
    IGNORE_INDEX,
)
from llava.data.records import Message
from llava.data.templates import ConversationTemplate, Segment, place_images


class SampleRejected(ValueError):
    """A sample that must not reach the loss. ``kind``: image_tokens_exceed_max_length |
    video_tokens_exceed_max_length | no_supervised_tokens."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def wrap_image_placeholders(messages: list[Message], mm_use_im_start_end: bool) -> list[Message]:
    """``<image>`` -> ``<im_start><image><im_end>`` when ``--mm_use_im_start_end`` is on."""
    if not mm_use_im_start_end:
        return messages
    wrapped = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return [Message(m.role, m.content.replace(DEFAULT_IMAGE_TOKEN, wrapped)) for m in messages]


def special_head(segments: list[Segment], tokenizer) -> tuple[list[int], list[Segment]]:
    """The leading ``special`` segments (the BOS) as their ids, and the segments after them."""
    head: list[int] = []
    while segments and segments[0].special:
        tid = tokenizer.convert_tokens_to_ids(segments[0].text)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"the template places {segments[0].text!r}, which is not a token of this tokenizer")
        head.append(tid)
        segments = segments[1:]
    if any(s.special for s in segments):
        raise ValueError("internal error: special segments must lead the rendering")
    return head, segments


def supervised_text(segments: list[Segment]) -> tuple[str, bytearray]:
    """The joined text of ``segments`` and a mask of its characters: 1 for those of a supervised segment, from the
    segment's first non-space character on. A token is supervised when it covers a 1."""
    text = "".join(s.text for s in segments)
    supervised = bytearray(len(text))
    pos = 0
    for seg in segments:
        if seg.supervised:
            start = len(seg.text) - len(seg.text.lstrip())
            supervised[pos + start : pos + len(seg.text)] = b"\x01" * (len(seg.text) - start)
        pos += len(seg.text)
    return text, supervised


def label_segments(segments: list[Segment], tokenizer) -> tuple[list[int], list[int]]:
    """Leading ``special`` segments (the BOS) as their ids, then the joined text tokenized once, each token labelled
    by the characters it covers."""
    head, segments = special_head(segments, tokenizer)
    text, supervised = supervised_text(segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [tid if any(supervised[start:end]) else IGNORE_INDEX for tid, (start, end) in zip(ids, enc["offset_mapping"])]
    return head + ids, [IGNORE_INDEX] * len(head) + labels


def prepare_messages(messages: list[Message], template: ConversationTemplate, mm_use_im_start_end: bool) -> list[Message]:
    """LLaVA's preprocess_multimodal: place the image (``template.image_front``), then wrap it (im_start/end)."""
    return wrap_image_placeholders(place_images(messages, template.image_front), mm_use_im_start_end)


def tokenize_conversation(
    messages: list[Message],
    template: ConversationTemplate,
    tokenizer,
    *,
    image_token_id: int,
    num_image_tokens: int | list[int],
    model_max_length: int,
    mm_use_im_start_end: bool = False,
    system: str | None = None,
    video_token_id: int | None = None,
    num_video_tokens: int = 0,
) -> TokenizedSample:
    """Render, tokenize, label, expand images (and the ``<video>``, to ``num_video_tokens``) and truncate one
    conversation.

    Raises ``SampleRejected`` when the image (or video) tokens alone do not fit in ``model_max_length`` or when no
    supervised token is left after truncation.
    """
    segments = template.render_with_tokenizer(prepare_messages(messages, template, mm_use_im_start_end), tokenizer, system)
    ids, labels = label_segments(segments, tokenizer)
    n_placeholders = sum(s.text.count(DEFAULT_IMAGE_TOKEN) for s in segments)
    ids, labels = expand_image_tokens(ids, labels, image_token_id, num_image_tokens, n_placeholders)
    if video_token_id is not None:
        n_videos = sum(s.text.count(DEFAULT_VIDEO_TOKEN) for s in segments)
        ids, labels = expand_image_tokens(ids, labels, video_token_id, num_video_tokens, n_videos,
                                          placeholder=DEFAULT_VIDEO_TOKEN)

    truncated = False
    if len(ids) > model_max_length:
        visual = (image_token_id, video_token_id)
        last_image = max((i for i, t in enumerate(ids) if t in visual), default=-1)
        if last_image >= model_max_length:
            what = "video" if ids[last_image] == video_token_id else "image"
            raise SampleRejected(
                f"{what}_tokens_exceed_max_length",
                f"the {what} tokens end at position {last_image + 1}, beyond --model_max_length {model_max_length}",
            )
        ids, labels, truncated = ids[:model_max_length], labels[:model_max_length], True
    if labels.count(IGNORE_INDEX) == len(labels):  # C-speed scan: samples hold hundreds of image tokens
        reason = f"after truncation to --model_max_length {model_max_length}" if truncated else "in the rendered prompt"
        raise SampleRejected("no_supervised_tokens", f"no assistant token is left to learn from {reason}")
    return TokenizedSample(ids, labels, truncated)


def expand_image_tokens(
    ids: list[int], labels: list[int], image_token_id: int, num_image_tokens: int | list[int], expected_images: int,
    placeholder: str = DEFAULT_IMAGE_TOKEN,
) -> tuple[list[int], list[int]]:
    """Replace each single image token by ``num_image_tokens`` copies (labels ``IGNORE_INDEX``); a list gives each
    image its own count, in order (anyres: the count depends on the image's size). ``placeholder``: the text of the
    token (``<video>`` for a video's)."""
    found = ids.count(image_token_id)
    if found != expected_images:
        raise ValueError(
            f"tokenizing produced {found} image token(s) for {expected_images} {placeholder} placeholder(s); "
            f"is {placeholder} registered as a special token (id {image_token_id}) in this tokenizer?"
        )
    if found == 0:
        return ids, labels
    counts = [num_image_tokens] * found if isinstance(num_image_tokens, int) else list(num_image_tokens)
    if len(counts) != found:
        raise ValueError(f"{found} {placeholder} placeholder(s) but {len(counts)} image(s)")
    counts.reverse()
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tid, lab in zip(ids, labels):
        if tid == image_token_id:
            n = counts.pop()
            out_ids.extend([image_token_id] * n)
            out_labels.extend([IGNORE_INDEX] * n)
        else:
            out_ids.append(tid)
            out_labels.append(lab)
    return out_ids, out_labels


def build_generation_prompt(
    messages: list[Message],
    template: ConversationTemplate,
    tokenizer,
    *,
    image_token_id: int,
    num_image_tokens: int | list[int],
    mm_use_im_start_end: bool = False,
    system: str | None = None,
    video_token_id: int | None = None,
    num_video_tokens: int = 0,
) -> list[int]:
    """Prompt ids for generation: the conversation ending in a user turn, rendered up to the assistant marker."""
    if not messages or messages[-1].role != "user":
        raise ValueError("a generation prompt must end with a user message")
    segments = template.render_with_tokenizer(prepare_messages(messages, template, mm_use_im_start_end), tokenizer, system)
    ids, labels = label_segments(segments, tokenizer)
    n = ids.count(image_token_id)
    ids, labels = expand_image_tokens(ids, labels, image_token_id, num_image_tokens, n)
    if video_token_id is not None:
        ids, _ = expand_image_tokens(ids, labels, video_token_id, num_video_tokens, ids.count(video_token_id),
                                     placeholder=DEFAULT_VIDEO_TOKEN)
    return ids

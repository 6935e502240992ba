"""Parse and validate one LLaVA-format record.

A record is ``{"id": ..., "image": "a.jpg" | ["a.jpg", ...], "images": [...], "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. ``parse_record`` turns it into a ``Record`` or
raises ``RecordError`` naming the record id, the field and what is wrong, in words a person can act on.

    >>> parse_record({"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    Record(id='1', images=[], messages=[Message(role='user', content='hi'), Message(role='assistant', content='yo')], extras={})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.errors import UsageValueError

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class EmbeddedImage:
    """An image whose bytes are in the record (a Parquet / Arrow image column), not a path under the image folder.
    ``name`` says where it came from, e.g. ``train-00001.parquet#row=17/image[0]``; decoded only when used
    (``llava.data.images.open_image_ref``)."""

    data: bytes = field(repr=False)
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass
class Record:
    id: str
    images: list[str | EmbeddedImage]
    messages: list[Message]
    extras: dict[str, Any] = field(default_factory=dict)
    video: str | None = None  # a video file or a directory of frames, relative to --video_folder (llava/data/video.py)

    @property
    def num_image_placeholders(self) -> int:
        return sum(m.content.count(DEFAULT_IMAGE_TOKEN) for m in self.messages)


ORIGIN_KEY = "__origin__"  # set by stores of embedded-image rows: "file.parquet#row=17", named in image errors


class RecordError(UsageValueError):
    """A record that cannot be trained on. ``kind`` is a stable machine-readable problem name."""

    def __init__(self, kind: str, record_id: str, field_name: str, message: str):
        self.kind = kind
        self.record_id = record_id
        self.field = field_name
        super().__init__(f"record {record_id!r}, field {field_name!r}: {message}")


def _record_id(raw: Any, index: int | None) -> str:
    if isinstance(raw, dict) and raw.get("id") is not None:
        return str(raw["id"])
    return f"#{index}" if index is not None else "<no id>"


def parse_record(raw: Any, index: int | None = None) -> Record:
    """Validate one raw record and normalise roles to system/user/assistant.

    ``index`` is the record's position in its file, used as its name when it has no ``id``.
    """
    rid = _record_id(raw, index)
    if not isinstance(raw, dict):
        raise RecordError("bad_type", rid, "<record>", f"expected a JSON object, got {type(raw).__name__}")

    images = _parse_images(raw, rid)
    video = raw.get("video")
    if video is not None and (not isinstance(video, str) or not video):
        raise RecordError("bad_type", rid, "video", f"expected a path relative to --video_folder, got {_describe(video)}")
    convs = raw.get("conversations")
    if convs is None:
        raise RecordError("missing_conversations", rid, "conversations", "the record has no 'conversations' list")
    if not isinstance(convs, list) or not convs:
        raise RecordError("bad_type", rid, "conversations", f"expected a non-empty list, got {_describe(convs)}")

    messages: list[Message] = []
    n_images = 0  # the texts' <image> placeholders, and whether one holds a <video>: counted as each is read
    has_video_token = False
    for turn_index, turn in enumerate(convs):  # the field's name (conversations[k]) is formatted only on an error
        if not isinstance(turn, dict):
            raise RecordError("bad_type", rid, f"conversations[{turn_index}]",
                              f"expected an object with 'from' and 'value', got {_describe(turn)}")
        role_raw, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(role_raw.lower()) if isinstance(role_raw, str) else None
        if role is None:
            raise RecordError("bad_role", rid, f"conversations[{turn_index}].from",
                              f"role {role_raw!r} is not one of human/gpt (or user/assistant/system)")
        if not isinstance(value, str):
            raise RecordError("bad_type", rid, f"conversations[{turn_index}].value",
                              f"expected a string, got {_describe(value)}")
        if not value.strip():
            raise RecordError("empty_text", rid, f"conversations[{turn_index}].value", "the text is empty")
        n_images += value.count(DEFAULT_IMAGE_TOKEN)
        has_video_token = has_video_token or DEFAULT_VIDEO_TOKEN in value
        messages.append(Message(role, value))

    _check_roles(messages, rid)
    record = Record(
        id=rid,
        images=images,
        messages=messages,
        extras={k: v for k, v in raw.items()
                if k not in ("id", "image", "images", "conversations", "video", ORIGIN_KEY)},
        video=video,
    )
    if video is not None:
        record.messages = _video_placeholder(record.messages, len(images), rid)
    elif has_video_token:
        raise RecordError("video_token_mismatch", rid, "conversations",
                          f"the text has a {DEFAULT_VIDEO_TOKEN} placeholder but the record has no 'video'")
    n_placeholders = record.num_image_placeholders if video is not None else n_images  # the video's may differ
    if n_placeholders != len(images):
        raise RecordError(
            "image_token_mismatch",
            rid,
            "conversations",
            f"the text has {n_placeholders} {DEFAULT_IMAGE_TOKEN} placeholder(s) but the record lists "
            f"{len(images)} image(s); put exactly one {DEFAULT_IMAGE_TOKEN} per image where it belongs in the text",
        )
    return record


def _video_placeholder(messages: list[Message], n_images: int, rid: str) -> list[Message]:
    """A video record marks its video with ``<video>``, or with ``<image>`` as LLaVA-NeXT writes it (then it has no
    images, and its one ``<image>`` becomes ``<video>``). Exactly one ``<video>`` per video record."""
    n_video = sum(m.content.count(DEFAULT_VIDEO_TOKEN) for m in messages)
    n_image = sum(m.content.count(DEFAULT_IMAGE_TOKEN) for m in messages)
    if n_video == 0 and n_images == 0 and n_image == 1:
        messages = [Message(m.role, m.content.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN)) for m in messages]
        n_video = 1
    if n_video != 1:
        hint = (f"mark the video with {DEFAULT_VIDEO_TOKEN} (the images keep one {DEFAULT_IMAGE_TOKEN} each)" if n_images
                else f"put one {DEFAULT_IMAGE_TOKEN} (or {DEFAULT_VIDEO_TOKEN}) where the video belongs")
        raise RecordError("video_token_mismatch", rid, "conversations",
                          f"the text has {n_video} {DEFAULT_VIDEO_TOKEN} placeholder(s) for the record's one video; {hint}")
    return messages


def _parse_images(raw: dict, rid: str) -> list[str | EmbeddedImage]:
    if raw.get("image") is not None and raw.get("images") is not None:
        raise RecordError("bad_type", rid, "image", "the record has both 'image' and 'images'; use one of them")
    key = "images" if raw.get("images") is not None else "image"
    value = raw.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, (str, bytes, dict)) else value
    if not isinstance(values, list):
        raise RecordError("bad_type", rid, key, f"expected a path or a list of paths, got {_describe(value)}")
    origin = raw.get(ORIGIN_KEY) or f"record {rid}"
    refs = [_image_ref(v, f"{origin}/{key}[{k}]") for k, v in enumerate(values)]
    if not all(refs):
        raise RecordError("bad_type", rid, key, f"expected a path or a list of paths (or image bytes), got "
                          f"{_describe(value)}")
    return refs


def _image_ref(value: Any, name: str) -> str | EmbeddedImage | None:
    """A path (a non-empty string), embedded bytes (raw, or ``{"bytes": ..., "path": ...}`` as the ``datasets`` Image
    feature and LLaVA-OneVision-Data's Parquet store them; a null ``bytes`` with a path is that path), else None."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return EmbeddedImage(bytes(value), name)
    return value if isinstance(value, str) and value else None


def _check_roles(messages: list[Message], rid: str) -> None:
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            offset = len(messages) - len(body)
            raise RecordError(
                "bad_role_order",
                rid,
                f"conversations[{i + offset}].from",
                f"expected a {'human' if expected == 'user' else 'gpt'} turn here (turns must alternate human, gpt, "
                f"human, ...), got {m.role}",
            )
    if not any(m.role == "assistant" for m in body):
        raise RecordError("no_assistant_turn", rid, "conversations", "there is no gpt turn to learn from")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"

"""Preference records (DPO): the two record forms parsed and validated into a :class:`PreferenceRecord`.

    {"id": "1", "image": "a.jpg", "prompt": "What is it?", "chosen": "A red circle.", "rejected": "A blue square."}
    {"id": "2", "images": ["a.jpg"], "conversations": [
        {"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "chosen": "Red.", "rejected": "Blue."}]}
    {"id": "3", "video": "clips/a.mp4", "prompt": "Which way does it move?", "chosen": "Left.", "rejected": "Right."}

The first is LLaVA-NeXT's DPO record (``llava/train/train_dpo.py``: ``id``, ``image`` or ``images`` or ``video``,
``prompt``, ``chosen``, ``rejected``; the prompt's ``<image>`` is moved to the front, or added there when absent, as
LLaVA-NeXT does, and a video's ``<video>`` likewise); the second keeps multi-turn context, with ``chosen`` /
``rejected`` variants of the last assistant turn. Both become the context (ending with a user turn) and the two
answers. A record with an empty answer, identical answers, or anything ``parse_record`` refuses for an SFT record
(a video's placeholder included) is a :class:`RecordError` naming the record and the field. No torch here:
``llava data check`` reads these records without it; ``preference.py`` holds the dataset and the collator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.data.records import Message, Record, RecordError, parse_record


@dataclass
class PreferenceRecord:
    id: str
    images: list[str]
    context: list[Message]  # ends with a user turn
    chosen: str
    rejected: str
    video: str | None = None  # relative to --video_folder, decoded as for SFT (llava/data/video.py)

    def conversation(self, answer: str) -> list[Message]:
        return [*self.context, Message("assistant", answer)]

    def as_record(self, which: str = "chosen") -> Record:
        """The SFT record of one answer (what ``llava data check`` and the image checks read)."""
        return Record(self.id, self.images, self.conversation(getattr(self, which)), video=self.video)


def is_preference_record(raw: Any) -> bool:
    """A raw record of either preference form (``chosen`` at the top or in the last turn)."""
    if not isinstance(raw, dict):
        return False
    if "chosen" in raw or "rejected" in raw:
        return True
    convs = raw.get("conversations")
    return isinstance(convs, list) and bool(convs) and isinstance(convs[-1], dict) and "chosen" in convs[-1]


def parse_preference_record(raw: Any, index: int | None = None) -> PreferenceRecord:
    """Validate one preference record of either form; ``RecordError`` names the record id and the field."""
    rid = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else (
        f"#{index}" if index is not None else "<no id>")
    if not isinstance(raw, dict):
        raise RecordError("bad_type", rid, "<record>", f"expected a JSON object, got {type(raw).__name__}")
    if "conversations" in raw:
        convs = raw["conversations"]
        if not isinstance(convs, list) or not convs or not isinstance(convs[-1], dict):
            raise RecordError("bad_type", rid, "conversations", "expected a non-empty list of turns")
        last, where = convs[-1], f"conversations[{len(convs) - 1}]"
        chosen, rejected = last.get("chosen"), last.get("rejected")
        turns = [*convs[:-1], {"from": last.get("from", last.get("role")), "value": chosen}]
    else:
        where = ""
        prompt, chosen, rejected = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError("preference_missing", rid, "prompt", "a preference record needs a non-empty 'prompt' "
                              "(or a 'conversations' list whose last gpt turn has 'chosen' and 'rejected')")
        n_images, video = _count_images(raw), raw.get("video") is not None
        if (n_images or video) and DEFAULT_IMAGE_TOKEN not in prompt and DEFAULT_VIDEO_TOKEN not in prompt:
            # LLaVA-NeXT: "<image>\n" + prompt (a video record's <image> is its video: "<video>\n" here)
            prompt = (DEFAULT_IMAGE_TOKEN + "\n") * n_images + (DEFAULT_VIDEO_TOKEN + "\n") * video + prompt.strip()
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": chosen}]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        field_name = f"{where}.{name}" if where else name
        if value is None:
            raise RecordError("preference_missing", rid, field_name, f"the record has no '{name}' answer")
        if not isinstance(value, str):
            raise RecordError("bad_type", rid, field_name, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RecordError("preference_empty", rid, field_name, f"the '{name}' answer is empty")
    if chosen.strip() == rejected.strip():
        raise RecordError("preference_identical", rid, f"{where}.rejected" if where else "rejected",
                          "'chosen' and 'rejected' are the same answer: the pair teaches no preference")
    base = {k: v for k, v in raw.items() if k in ("id", "image", "images", "video")}
    record = parse_record({**base, "conversations": turns}, index)
    if record.messages[-1].role != "assistant":
        raise RecordError("bad_role_order", rid, where or "conversations", "the chosen / rejected turn must be a gpt turn")
    return PreferenceRecord(record.id, record.images, record.messages[:-1], chosen, rejected, record.video)


def _count_images(raw: dict) -> int:
    value = raw.get("images", raw.get("image"))
    return 0 if value is None else 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0

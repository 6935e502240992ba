"""Preference records (DPO): parse and validate them, a dataset of tokenized pairs, and the pair collator.

Two record forms are read:

    {"id": "1", "image": "a.jpg", "prompt": "What is it?", "chosen": "A red circle.", "rejected": "A blue square."}
    {"id": "2", "images": ["a.jpg"], "conversations": [
        {"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "chosen": "Red.", "rejected": "Blue."}]}

The first is LLaVA-NeXT's DPO record (``llava/train/train_dpo.py``: ``id``, ``image`` or ``images``, ``prompt``,
``chosen``, ``rejected``; the prompt's ``<image>`` is moved to the front, or added there when absent, as LLaVA-NeXT
does); the second keeps multi-turn context, with ``chosen`` / ``rejected`` variants of the last assistant turn. Both
become a :class:`PreferenceRecord`: the context (ending with a user turn) and the two answers. A record with an empty
answer, identical answers, or anything ``parse_record`` refuses for an SFT record is a :class:`RecordError` naming the
record and the field.

Each sample is the context + chosen and the context + rejected, templated and tokenized like an SFT conversation
(``tokenize.py``: one tokenization, the prompt's tokens unsupervised, the answer's supervised). The collator puts the
``n`` chosen rows first and the ``n`` rejected rows after them, padded to one width, and the images of the ``n`` pairs
once (``llava/model/preference_forward.py`` encodes them once and feeds both rows):

    collate = DataCollatorForPreference(pad_token_id=0)
    collate([{"chosen_input_ids": tensor([1, 5, 9]), "chosen_labels": tensor([-100, 5, 9]),
              "rejected_input_ids": tensor([1, 5, 7, 7]), "rejected_labels": tensor([-100, 5, 7, 7]),
              "pixel_values": x1, "index": 3}])
    # {"input_ids": [[1, 5, 9, 0], [1, 5, 7, 7]], "labels": [[-100, 5, 9, -100], [-100, 5, 7, 7]],
    #  "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1]], "pixel_values": x1, "pair_index": [3]}
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.anyres import AnyresLayout, process_anyres_images, read_image_sizes
from llava.data.collator import DataCollatorForSupervisedDataset, collate_images
from llava.data.dataset import process_images
from llava.data.images import ImageLoadError, expand2square, load_image_rgb
from llava.data.records import Message, Record, RecordError, parse_record
from llava.data.templates import ConversationTemplate
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.data.validate import DataError, ProblemLog, load_raw_records, record_image_problem

logger = logging.getLogger(__name__)


@dataclass
class PreferenceRecord:
    id: str
    images: list[str]
    context: list[Message]  # ends with a user turn
    chosen: str
    rejected: str

    def conversation(self, answer: str) -> list[Message]:
        return [*self.context, Message("assistant", answer)]

    def as_record(self, which: str = "chosen") -> Record:
        """The SFT record of one answer (what ``llava data check`` and the image checks read)."""
        return Record(self.id, self.images, self.conversation(getattr(self, which)))


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
    if raw.get("video") is not None:  # the pair dataset decodes images only (video trains in SFT, llava/data/video.py)
        raise RecordError("video_unsupported", rid, "video", "video preference pairs are not supported by llava dpo "
                          "yet; drop the pair or give its frames as 'images' with one <image> each")
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
        n_images = _count_images(raw)
        if n_images and prompt.count(DEFAULT_IMAGE_TOKEN) == 0:  # LLaVA-NeXT: "<image>\n" + prompt
            prompt = (DEFAULT_IMAGE_TOKEN + "\n") * n_images + prompt.strip()
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
    base = {k: v for k, v in raw.items() if k in ("id", "image", "images")}
    record = parse_record({**base, "conversations": turns}, index)
    if record.messages[-1].role != "assistant":
        raise RecordError("bad_role_order", rid, where or "conversations", "the chosen / rejected turn must be a gpt turn")
    return PreferenceRecord(record.id, record.images, record.messages[:-1], chosen, rejected)


def _count_images(raw: dict) -> int:
    value = raw.get("images", raw.get("image"))
    return 0 if value is None else 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0


class PreferenceDataset(Dataset):
    """Preference pairs -> ``{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, pixel_values
    [, image_sizes], index}``, images decoded on access. Records are parsed and both answers tokenized at
    construction (lengths exact; a pair with nothing supervised left in either answer is dropped and counted);
    invalid records stop construction (``--on_bad_sample error``) or are dropped and counted (``skip``)."""

    def __init__(self, data_path: str | os.PathLike, tokenizer, *, template: ConversationTemplate, image_processor,
                 image_folder: str | os.PathLike | None, image_token_id: int, num_image_tokens: int,
                 model_max_length: int, image_aspect_ratio: str = "square", mm_use_im_start_end: bool = False,
                 on_bad_sample: str = "error", anyres: AnyresLayout | None = None, show_progress: bool = True):
        self.tokenizer, self.template, self.image_processor = tokenizer, template, image_processor
        self.image_folder, self.image_token_id, self.num_image_tokens = image_folder, image_token_id, num_image_tokens
        self.model_max_length, self.image_aspect_ratio = model_max_length, image_aspect_ratio
        self.mm_use_im_start_end, self.anyres = mm_use_im_start_end, anyres
        self.problems, self.dropped = ProblemLog(), ProblemLog()
        raws = load_raw_records(data_path, self.problems)
        self.records: list[PreferenceRecord] = []
        self._lengths: list[int] = []
        for i, raw in enumerate(tqdm(raws, desc="preference pairs", disable=not show_progress)):
            try:
                record = parse_preference_record(raw, i)
            except RecordError as err:
                self.problems.add(err.kind, f"{data_path}: {err}", err.record_id)
                continue
            image_problem = record_image_problem(record.as_record(), image_folder)
            if image_problem:
                self.problems.add(image_problem[0], f"{data_path}: {image_problem[1]}", record.id)
                continue
            try:
                sizes = read_image_sizes(image_folder, record.images) if anyres and record.images else None
                chosen, rejected = self._tokenize(record, sizes)
            except SampleRejected as err:
                self.dropped.add(err.kind, f"record {record.id!r}: {err}", record.id)
                continue
            except ImageLoadError as err:
                self.problems.add("image_unreadable", f"{data_path}: record {record.id!r}: {err}", record.id)
                continue
            self.records.append(record)
            self._lengths.append(len(chosen.input_ids) + len(rejected.input_ids))
        if self.problems.counts:
            message = (f"{data_path}: {sum(self.problems.counts.values())} preference record(s) cannot be trained on"
                       f":\n{self.problems.report()}")
            if on_bad_sample == "error":
                raise DataError(message.replace(":\n", " (pass --on_bad_sample skip to drop them):\n", 1))
            logger.warning("dropping %s", message)
        if self.dropped.counts:
            logger.warning("dropping %d pair(s) that cannot train at --model_max_length %d:\n%s",
                           sum(self.dropped.counts.values()), model_max_length, self.dropped.report())
        if not self.records:
            raise DataError(f"{data_path}: no trainable preference record left")

    @classmethod
    def from_args(cls, data_path, model_args, data_args, training_args, built, template) -> PreferenceDataset:
        return cls(data_path, built.tokenizer, template=template, image_processor=built.image_processor,
                   image_folder=data_args.image_folder, image_token_id=built.image_token_id,
                   num_image_tokens=built.num_image_tokens, model_max_length=training_args.model_max_length,
                   image_aspect_ratio=data_args.image_aspect_ratio, mm_use_im_start_end=model_args.mm_use_im_start_end,
                   on_bad_sample=data_args.on_bad_sample, anyres=built.layout)

    def _tokenize(self, record: PreferenceRecord, sizes: list[tuple[int, int]] | None):
        n_tokens: int | list[int] = self.num_image_tokens
        if self.anyres is not None and record.images:
            n_tokens = self.anyres.record_image_tokens(sizes)
        return tuple(tokenize_conversation(record.conversation(answer), self.template, self.tokenizer,
                                           image_token_id=self.image_token_id, num_image_tokens=n_tokens,
                                           model_max_length=self.model_max_length,
                                           mm_use_im_start_end=self.mm_use_im_start_end)
                     for answer in (record.chosen, record.rejected))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """Tokens of both rows of each pair."""
        return list(self._lengths)

    @property
    def modality_lengths(self) -> list[int]:
        return [n if r.images else -n for n, r in zip(self._lengths, self.records)]

    def bad_samples_report(self) -> dict[str, Any]:
        return {"invalid_records": self.problems.as_dict(), "cannot_train": self.dropped.as_dict(),
                "failed_during_training": ProblemLog().as_dict()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        images = [load_image_rgb(self.image_folder, rel)[0] for rel in record.images]
        item: dict[str, Any] = {"pixel_values": None, "index": i}
        if self.anyres is not None:
            chosen, rejected = self._tokenize(record, [(im.height, im.width) for im in images])
            if images:
                item.update(process_anyres_images(self.image_processor, images))
        else:
            chosen, rejected = self._tokenize(record, None)
            if images:
                if self.image_aspect_ratio == "pad":
                    fill = tuple(int(x * 255) for x in self.image_processor.image_mean)
                    images = [expand2square(im, fill) for im in images]
                item["pixel_values"] = process_images(self.image_processor, images, self.image_aspect_ratio)
        for name, sample in (("chosen", chosen), ("rejected", rejected)):
            item[f"{name}_input_ids"] = torch.tensor(sample.input_ids, dtype=torch.long)
            item[f"{name}_labels"] = torch.tensor(sample.labels, dtype=torch.long)
        return item


@dataclass
class DataCollatorForPreference:
    """``n`` pairs -> ``2n`` padded rows (chosen rows, then rejected rows), the ``n`` pairs' images once, and
    ``pair_index`` (each pair's dataset index: the key of precomputed reference log-probs)."""

    pad_token_id: int
    batch_num_images: bool = False  # LlavaOnevision: images per pair

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected") for p in pairs]
        batch = DataCollatorForSupervisedDataset(self.pad_token_id)(rows)
        batch.update(collate_images(pairs, self.batch_num_images))
        batch["pair_index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
        return batch

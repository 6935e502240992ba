"""Preference pairs (DPO): a dataset of tokenized pairs and the pair collator (the records:
``preference_records.py``).

Each sample is the context + chosen and the context + rejected, templated and tokenized like an SFT conversation
(``tokenize.py``: one tokenization, the prompt's tokens unsupervised, the answer's supervised). The collator puts the
``n`` chosen rows first and the ``n`` rejected rows after them, padded to one width, and the images of the ``n`` pairs
once (``llava/model/preference_forward.py`` encodes them once and feeds both rows). A pair's video (``--video_folder``)
is decoded by the SFT dataset's code (``video.load_record_video``: the run's ``--frames_upbound`` / ``--video_fps`` /
``--force_sample``), its ``<video>`` expanded to the SFT count, and the collator carries the ``n`` pairs' videos once
as ``pixel_values_videos``, as the SFT collator does:

    collate = DataCollatorForPreference(pad_token_id=0)
    collate([{"chosen_input_ids": tensor([1, 5, 9]), "chosen_labels": tensor([-100, 5, 9]),
              "rejected_input_ids": tensor([1, 5, 7, 7]), "rejected_labels": tensor([-100, 5, 7, 7]),
              "pixel_values": x1, "index": 3}])
    # {"input_ids": [[1, 5, 9, 0], [1, 5, 7, 7]], "labels": [[-100, 5, 9, -100], [-100, 5, 7, 7]],
    #  "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1]], "pixel_values": x1, "pair_index": [3]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from llava.data.anyres import AnyresLayout, process_anyres_images, read_image_sizes
from llava.data.collator import DataCollatorForSupervisedDataset, collate_images, collate_videos
from llava.data.dataset import process_images
from llava.data.images import ImageLoadError, expand2square, load_image_rgb
from llava.data.index import (
    IndexSettings,
    _image_dirs_unchanged,
    _mtime_ns,
    cached_digest,
    default_cache_dir,
    index_key,
    local_main_first,
    open_records,
)
from llava.data.preference_records import (  # noqa: F401  (is_preference_record: this module's public name too)
    PreferenceRecord,
    is_preference_record,
    parse_preference_record,
)
from llava.data.records import Message, RecordError
from llava.data.templates import ConversationTemplate
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.data.validate import DataError, ProblemLog, load_raw_records, record_image_problem
from llava.data.video import (
    VideoInfo,
    VideoLayout,
    VideoLoadError,
    load_record_video,
    probe_video,
    sample_frame_indices,
    video_messages,
)

logger = logging.getLogger(__name__)


PAIR_INDEX_FORMAT = 2


@dataclass
class PairIndex:
    """Which raw records train (``keep``, ascending), both rows' token counts, modality, and what was refused."""

    keep: np.ndarray
    chosen_lengths: np.ndarray
    rejected_lengths: np.ndarray
    has_image: np.ndarray
    has_video: np.ndarray
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, message, record id): invalid records
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # valid pairs that cannot train
    image_dirs: dict[str, int] = field(default_factory=dict)  # directory -> mtime_ns when indexed
    from_cache: bool = False


def tokenize_pair(record: PreferenceRecord, template, tokenizer, s: IndexSettings,
                  sizes: list[tuple[int, int]] | None, video: tuple[VideoInfo, list[int]] | None = None):
    """The chosen and the rejected row of a pair, each tokenized as an SFT conversation (anyres: image token counts
    from ``sizes``; a video: ``(info, sampled frame indices)``, its ``<video>`` expanded to the SFT dataset's count
    and ``--add_time_instruction``'s sentence added as there)."""
    n_tokens: int | list[int] = s.num_image_tokens
    if s.anyres is not None and record.images:
        n_tokens = s.anyres.record_image_tokens(sizes)
    video_kwargs = {}
    if video is not None:
        video_kwargs = dict(video_token_id=s.video_token_id, num_video_tokens=s.video.video_tokens(len(video[1])))
    return tuple(tokenize_conversation(_video_text(record.conversation(answer), video, s.video), template, tokenizer,
                                       image_token_id=s.image_token_id, num_image_tokens=n_tokens,
                                       model_max_length=s.model_max_length, mm_use_im_start_end=s.mm_use_im_start_end,
                                       **video_kwargs)
                 for answer in (record.chosen, record.rejected))


def _video_text(messages: list[Message], video, layout: VideoLayout | None) -> list[Message]:
    return messages if video is None else video_messages(messages, video[0], video[1], layout)


def probe_pair_video(record: PreferenceRecord, s: IndexSettings) -> tuple[VideoInfo, list[int]]:
    """The pair's video metadata and sampled frames (container metadata, no decoding), as the SFT index reads them."""
    info = probe_video(s.video_folder, record.video)
    return info, sample_frame_indices(info.frames, info.fps, s.video.sampling)


def index_pairs(raws, data_path, tokenizer, template, s: IndexSettings, show_progress: bool = True) -> PairIndex:
    """Parse and validate every record, check its images (``stat``; anyres reads the headers) and tokenize both of
    its answers: the pairs that train and the exact token count of each row."""
    keep, chosen_n, rejected_n, has_image, has_video, problems, dropped, dirs = [], [], [], [], [], [], [], set()
    for i, raw in enumerate(tqdm(raws, desc="preference pairs", disable=not show_progress)):
        try:
            record = parse_preference_record(raw, i)
        except RecordError as err:
            problems.append((err.kind, f"{data_path}: {err}", err.record_id))
            continue
        image_problem = record_image_problem(record.as_record(), s.image_folder)
        if image_problem:
            problems.append((image_problem[0], f"{data_path}: {image_problem[1]}", record.id))
            continue
        if s.image_folder:
            dirs.update(os.path.dirname(os.path.join(s.image_folder, rel)) for rel in record.images
                        if isinstance(rel, str))
        if record.video is not None and (s.video is None or s.video_folder is None):
            problems.append(("video_not_enabled", f"{data_path}: record {record.id!r} has a video but --video_folder "
                             f"is not set (video training needs it)", record.id))
            continue
        try:
            video = probe_pair_video(record, s) if record.video is not None else None
        except VideoLoadError as err:
            problems.append((f"video_{err.kind}", f"{data_path}: record {record.id!r}: {err}", record.id))
            continue
        if video is not None:
            dirs.add(os.path.dirname(os.path.join(s.video_folder, record.video.rstrip("/"))))
        try:
            sizes = read_image_sizes(s.image_folder, record.images) if s.anyres and record.images else None
            chosen, rejected = tokenize_pair(record, template, tokenizer, s, sizes, video)
        except SampleRejected as err:
            dropped.append((err.kind, f"record {record.id!r}: {err}", record.id))
            continue
        except ImageLoadError as err:
            problems.append(("image_unreadable", f"{data_path}: record {record.id!r}: {err}", record.id))
            continue
        keep.append(i)
        chosen_n.append(len(chosen.input_ids))
        rejected_n.append(len(rejected.input_ids))
        has_image.append(bool(record.images))
        has_video.append(video is not None)
    return PairIndex(np.asarray(keep, np.int64), np.asarray(chosen_n, np.int32), np.asarray(rejected_n, np.int32),
                     np.asarray(has_image, bool), np.asarray(has_video, bool), problems, dropped, {d: _mtime_ns(d) for d in sorted(dirs)})


class _Problems(list):
    """``(kind, message, record id)`` entries, with ``ProblemLog``'s ``add`` (what ``load_raw_records`` calls)."""

    def add(self, kind: str, message: str, record_id: str | None = None) -> None:
        self.append((kind, message, record_id))


def pair_index_key(data_path, digest: str, tokenizer, template, s: IndexSettings) -> str:
    """The SFT index's key (data, tokenizer, template, settings, indexing code) + the path (named in the messages)
    and the source of this module and preference_records.py."""
    parts = {"pairs": PAIR_INDEX_FORMAT, "index": index_key(digest, tokenizer, template, s), "path": str(data_path),
             "code": hashlib.sha256(Path(__file__).read_bytes()
                                    + Path(__file__).with_name("preference_records.py").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_or_build_pair_index(data_path, tokenizer, template, s: IndexSettings, *, cache_dir,
                             show_progress: bool = True):
    """``(raw records, PairIndex)``. With ``cache_dir``: the records memory-mapped (``index.open_records``) and the
    index read from ``<cache_dir>/pairs-<key>.npz`` when its key and image directories still match (a restart
    stats the data file and reads that file: no record is parsed or tokenized), else built and written there."""
    if not cache_dir or not Path(data_path).exists():  # (a missing path: load_raw_records' error)
        bad_lines = _Problems()
        raws = load_raw_records(data_path, bad_lines)
        index = index_pairs(raws, data_path, tokenizer, template, s, show_progress)
        index.problems[:0] = bad_lines
        return raws, index
    digest = cached_digest(data_path, cache_dir)
    raws = open_records(data_path, cache_dir, digest)
    key = pair_index_key(data_path, digest, tokenizer, template, s)
    path = Path(cache_dir) / f"pairs-{key}.npz"
    if path.is_file():
        index = _read_pair_index(path, key)
        if index is not None and _image_dirs_unchanged(index.image_dirs):
            return raws, index
    index = index_pairs(raws, data_path, tokenizer, template, s, show_progress)
    index.problems[:0] = [("invalid_json", message, rid) for rid, message in getattr(raws, "bad_lines", [])]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, "problems": index.problems, "dropped": index.dropped, "image_dirs": index.image_dirs}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, keep=index.keep, chosen_lengths=index.chosen_lengths, rejected_lengths=index.rejected_lengths,
                 has_image=index.has_image, has_video=index.has_video, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("could not cache the preference index in %s: %s", path.parent, err)
    return raws, index


def _read_pair_index(path: Path, key: str) -> PairIndex | None:
    try:
        with np.load(path) as f:
            meta = json.loads(f["meta"].tobytes().decode())
            if meta.get("key") != key:
                return None
            return PairIndex(f["keep"], f["chosen_lengths"], f["rejected_lengths"], f["has_image"], f["has_video"],
                             [tuple(p) for p in meta["problems"]], [tuple(p) for p in meta["dropped"]],
                             meta["image_dirs"], from_cache=True)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("could not read the preference index %s (%s): rebuilding", path, err)
        return None


class PreferenceDataset(Dataset):
    """Preference pairs -> ``{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, pixel_values
    [, image_sizes], index}``, images decoded on access. Records are parsed and both answers tokenized once
    (lengths exact; a pair with nothing supervised left in either answer is dropped and counted), and with
    ``index_cache_dir`` that index is cached (:func:`load_or_build_pair_index`: a restart tokenizes nothing);
    invalid records stop construction (``--on_bad_sample error``) or are dropped and counted (``skip``)."""

    def __init__(self, data_path: str | os.PathLike, tokenizer, *, template: ConversationTemplate, image_processor,
                 image_folder: str | os.PathLike | None, image_token_id: int, num_image_tokens: int,
                 model_max_length: int, image_aspect_ratio: str = "square", mm_use_im_start_end: bool = False,
                 on_bad_sample: str = "error", anyres: AnyresLayout | None = None, show_progress: bool = True,
                 index_cache_dir: str | os.PathLike | None = None, video: VideoLayout | None = None,
                 video_folder: str | os.PathLike | None = None, video_token_id: int | None = None):
        self.tokenizer, self.template, self.image_processor = tokenizer, template, image_processor
        self.image_folder, self.image_aspect_ratio, self.anyres = image_folder, image_aspect_ratio, anyres
        self.video = video  # --video_folder: a pair's video decoded and counted as the SFT dataset does it
        self.settings = IndexSettings(image_folder=None if image_folder is None else str(image_folder),
                                      image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                                      model_max_length=model_max_length, mm_use_im_start_end=mm_use_im_start_end,
                                      anyres=anyres, video=video,
                                      video_folder=None if video_folder is None else str(video_folder),
                                      video_token_id=video_token_id if video is not None else None)
        self.raw, index = load_or_build_pair_index(data_path, tokenizer, template, self.settings,
                                                   cache_dir=index_cache_dir, show_progress=show_progress)
        self.index_from_cache = index.from_cache
        self.problems, self.dropped = ProblemLog(), ProblemLog()
        for kind, message, record_id in index.problems:
            self.problems.add(kind, message, record_id)
        for kind, message, record_id in index.dropped:
            self.dropped.add(kind, message, record_id)
        self._keep, self._has_image, self._has_video = index.keep, index.has_image, index.has_video
        self.chosen_lengths, self.rejected_lengths = index.chosen_lengths, index.rejected_lengths
        if self.problems.counts:
            message = (f"{data_path}: {sum(self.problems.counts.values())} preference record(s) cannot be trained on"
                       f":\n{self.problems.report()}")
            if on_bad_sample == "error":
                raise DataError(message.replace(":\n", " (pass --on_bad_sample skip to drop them):\n", 1))
            logger.warning("dropping %s", message)
        if self.dropped.counts:
            logger.warning("dropping %d pair(s) that cannot train at --model_max_length %d:\n%s",
                           sum(self.dropped.counts.values()), model_max_length, self.dropped.report())
        if not len(self._keep):
            raise DataError(f"{data_path}: no trainable preference record left")

    @classmethod
    def from_args(cls, data_path, model_args, data_args, training_args, built, template) -> PreferenceDataset:
        """Built by the local main process first (it computes and caches the index), then by the other ranks."""
        cache = data_args.index_cache_dir
        with local_main_first():
            return cls(data_path, built.tokenizer, template=template, image_processor=built.image_processor,
                       image_folder=data_args.image_folder, image_token_id=built.image_token_id,
                       num_image_tokens=built.num_image_tokens, model_max_length=training_args.model_max_length,
                       image_aspect_ratio=data_args.image_aspect_ratio,
                       mm_use_im_start_end=model_args.mm_use_im_start_end, on_bad_sample=data_args.on_bad_sample,
                       anyres=built.layout, video=built.video, video_folder=data_args.video_folder,
                       video_token_id=getattr(built.model.config, "video_token_id", None),
                       index_cache_dir=(default_cache_dir() / "index" if cache is None else None
                                                             if str(cache).lower() in ("none", "") else cache))

    def record(self, i: int) -> PreferenceRecord:
        """Pair ``i``, parsed from its raw record."""
        return parse_preference_record(self.raw[int(self._keep[i])], int(self._keep[i]))

    @property
    def records(self) -> list[PreferenceRecord]:
        """Every pair, parsed (all of them: for small sets)."""
        return [self.record(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self._keep)

    @property
    def lengths(self) -> list[int]:
        """Tokens of both rows of each pair."""
        return (self.chosen_lengths.astype(np.int64) + self.rejected_lengths).tolist()

    @property
    def modality_lengths(self) -> list[int]:
        lengths = np.asarray(self.lengths)
        return np.where(self._has_image | self._has_video, lengths, -lengths).tolist()

    @property
    def modalities(self) -> list[int] | None:
        """With video on, the grouped sampler's modality per pair (0 text, 1 images, 2 a video, 3 both), as the SFT
        dataset's; None otherwise."""
        return None if self.video is None else (self._has_video * 2 + self._has_image).tolist()

    def bad_samples_report(self) -> dict[str, Any]:
        return {"invalid_records": self.problems.as_dict(), "cannot_train": self.dropped.as_dict(),
                "failed_during_training": ProblemLog().as_dict()}

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.record(i)
        images = [load_image_rgb(self.image_folder, rel)[0] for rel in record.images]
        item: dict[str, Any] = {"pixel_values": None, "index": i}
        video = None
        if record.video is not None:  # decoded by the SFT dataset's code, with the run's video flags
            info, indices, item["pixel_values_videos"] = load_record_video(
                self.settings.video_folder, record.video, self.video, self.image_processor, record.id)
            video = (info, indices)
        if self.anyres is not None:
            chosen, rejected = tokenize_pair(record, self.template, self.tokenizer, self.settings,
                                             [(im.height, im.width) for im in images], video)
            if images:
                item.update(process_anyres_images(self.image_processor, images))
        else:
            chosen, rejected = tokenize_pair(record, self.template, self.tokenizer, self.settings, None, video)
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
    """``n`` pairs -> ``2n`` padded rows (chosen rows, then rejected rows), the ``n`` pairs' images and videos once
    (``pixel_values_videos`` as the SFT collator makes it), and ``pair_index`` (each pair's dataset index: the key of
    precomputed reference log-probs)."""

    pad_token_id: int
    batch_num_images: bool = False  # LlavaOnevision: images per pair
    join_videos: bool = False  # LlavaNextVideo: every video's frames as one (llava/data/collator.py)

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for side in ("chosen", "rejected") for p in pairs]
        batch = DataCollatorForSupervisedDataset(self.pad_token_id)(rows)
        batch.update(collate_images(pairs, self.batch_num_images))
        batch.update(collate_videos(pairs, self.join_videos))
        batch["pair_index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
        return batch

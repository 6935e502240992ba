"""LazySupervisedDataset: LLaVA records -> ``{input_ids, labels, pixel_values}``, images decoded on access.

    ds = LazySupervisedDataset.from_args(data_path, model_args, data_args, training_args, built, template)
    ds[0]  # {"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values": FloatTensor[n_img, 3, H, W] | None}

At construction every record is parsed and its text tokenized once (no image is opened) so that ``lengths`` and
``modality_lengths`` are exact token counts after templating and image expansion, and samples that can never
train (image tokens beyond ``model_max_length``, nothing supervised) are dropped and counted up front. Records
that fail validation stop construction with a report (``--on_bad_sample error``) or are dropped and counted
(``skip``). Sources: a JSON list, JSONL (one record a line), or a ``datasets`` dataset saved with
``save_to_disk``.

An image that fails in ``__getitem__`` (deleted or unreadable after construction) is replaced by the next good sample
and counted in ``runtime_failures`` (the trainer writes ``bad_samples.json``). With ``--dataloader_num_workers > 0``
those counts live in the worker processes: each failure is still logged as a warning there, but the file only holds
the main process's counts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llava.data.anyres import AnyresLayout, process_anyres_images, read_image_sizes
from llava.data.images import ImageLoadError, expand2square, open_image_ref
from llava.data.index import IndexSettings, default_cache_dir, local_main_first
from llava.data.records import Record, parse_record
from llava.data.sources import mixture_table, open_sources, source_specs, take_rows
from llava.data.templates import ConversationTemplate
from llava.data.tokenize import tokenize_conversation
from llava.data.validate import DataError, ProblemLog, image_problem_kind
from llava.data.video import (
    VideoLayout,
    VideoLoadError,
    load_record_video,
    video_messages,
)

logger = logging.getLogger(__name__)


class LazySupervisedDataset(Dataset):
    def __init__(
        self,
        data_path: str | os.PathLike,
        tokenizer,
        *,
        template: ConversationTemplate,
        image_processor,
        image_folder: str | os.PathLike | None,
        image_token_id: int,
        num_image_tokens: int,
        model_max_length: int,
        image_aspect_ratio: str = "square",
        mm_use_im_start_end: bool = False,
        on_bad_sample: str = "error",
        show_progress: bool = True,
        index_cache_dir: str | os.PathLike | None = None,
        index_workers: int = 1,
        anyres: AnyresLayout | None = None,
        video: VideoLayout | None = None,
        video_folder: str | os.PathLike | None = None,
        video_token_id: int | None = None,
        seed: int = 0,
        data_flag: str = "--data_path",
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.model_max_length = model_max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.mm_use_im_start_end = mm_use_im_start_end
        self.anyres = anyres  # image tokens per image from its size (the index reads headers, no decode)
        self.video = video  # a video's tokens from its sampled frame count (the index reads container metadata)
        self.video_folder = None if video_folder is None else str(video_folder)
        self.video_token_id = video_token_id
        self.runtime_failures = ProblemLog()  # images that turned bad during the run; the sample was replaced
        self._failed: set[int] = set()
        # records, lengths, modality and validation (llava/data/validate.py, as `llava data check`): from the shared
        # index (llava/data/index.py), computed once and cached by content, tokenizer, template and settings
        # sources (llava/data/sources.py): the one --data_path, or each entry of a mixture YAML, each with its own
        # cached index; the dataset holds (source number, raw row) per sample
        specs = source_specs(data_path, None if image_folder is None else str(image_folder),
                             None if video_folder is None else str(video_folder), flag=data_flag)
        self.sources, indexes = self._load_index(specs, index_cache_dir, index_workers, show_progress)
        self.raw = self.sources[0].store
        self.sources_from_cache = [index.from_cache for index in indexes]  # per source: index read, not built
        self.index_from_cache = all(self.sources_from_cache)
        mix = take_rows(self.sources, indexes, seed)
        del indexes
        self.problems = ProblemLog()  # records that fail validation
        for src in {id(src.store): src for src in self.sources}.values():
            for record_id, message in src.store.bad_lines:
                self.problems.add("invalid_json", message, record_id)
        for kind, message, record_id in mix.problems:
            self.problems.add(kind, message, record_id)
        self.dropped = ProblemLog()  # samples that are valid data but cannot train (too long, nothing supervised)
        for kind, message, record_id in mix.dropped:
            self.dropped.add(kind, message, record_id)
        self._source = mix.source
        self._keep = mix.rows
        self._lengths = mix.lengths
        self._has_image = mix.has_image
        self._has_video = mix.has_video
        logger.info("%s: %d sample(s) from %d source(s):\n%s", data_path, len(self._keep), len(self.sources),
                    mixture_table(self.sources))
        if self.problems.counts:
            if on_bad_sample == "error":
                raise DataError(
                    f"{data_path}: {sum(self.problems.counts.values())} record(s) cannot be trained on "
                    f"(pass --on_bad_sample skip to drop them):\n{self.problems.report()}"
                )
            logger.warning("dropping %d bad record(s) of %s:\n%s", sum(self.problems.counts.values()), data_path,
                           self.problems.report())
        if self.dropped.counts:
            logger.warning("dropping %d sample(s) that cannot train at --model_max_length %d:\n%s",
                           sum(self.dropped.counts.values()), model_max_length, self.dropped.report())
        if not len(self._keep):
            raise DataError(f"{data_path}: no trainable record left")

    def _load_index(self, specs, cache_dir, workers: int, show_progress: bool):
        """Per source: raw records memory-mapped from Arrow (or read in place: Parquet, `datasets`) and the cached
        index when ``cache_dir`` is given; else the records in memory and the index computed here. Each source's
        index has its own image and video folders (``open_sources`` sets them from the source)."""
        settings = IndexSettings(image_folder=None, image_token_id=self.image_token_id,
                                 num_image_tokens=self.num_image_tokens, model_max_length=self.model_max_length,
                                 mm_use_im_start_end=self.mm_use_im_start_end, anyres=self.anyres, video=self.video,
                                 video_folder=None, video_token_id=self.video_token_id)
        return open_sources(specs, settings, self.tokenizer, self.template, cache_dir=cache_dir, workers=workers,
                            show_progress=show_progress)

    @classmethod
    def from_args(cls, data_path, model_args, data_args, training_args, built, template, **overrides) -> LazySupervisedDataset:
        """Built by the local main process first (it computes and caches the index), then by the other ranks."""
        cache = data_args.index_cache_dir
        kwargs = dict(
            index_cache_dir=(default_cache_dir() / "index" if cache is None  # the default: cached
                             else None if str(cache).lower() in ("none", "") else cache),
            index_workers=data_args.index_workers,
            template=template,
            image_processor=built.image_processor,
            image_folder=data_args.image_folder,
            image_token_id=built.image_token_id,
            num_image_tokens=built.num_image_tokens,
            model_max_length=training_args.model_max_length,
            image_aspect_ratio=data_args.image_aspect_ratio,
            mm_use_im_start_end=model_args.mm_use_im_start_end,
            on_bad_sample=data_args.on_bad_sample,
            anyres=built.layout,
            video=built.video,
            video_folder=data_args.video_folder,
            video_token_id=getattr(built.model.config, "video_token_id", None) if built.video is not None else None,
            seed=training_args.seed,
        )
        kwargs.update(overrides)
        with local_main_first():
            return cls(data_path, built.tokenizer, **kwargs)

    def _tokenize(self, record: Record, sizes: list[tuple[int, int]] | None = None):
        n_tokens: int | list[int] = self.num_image_tokens
        if self.anyres is not None and record.images and (sizes is not None or self.image_folder):
            n_tokens = self.anyres.record_image_tokens(sizes or read_image_sizes(self.image_folder, record.images))
        return tokenize_conversation(
            record.messages,
            self.template,
            self.tokenizer,
            image_token_id=self.image_token_id,
            num_image_tokens=n_tokens,
            model_max_length=self.model_max_length,
            mm_use_im_start_end=self.mm_use_im_start_end,
        )

    def __len__(self) -> int:
        return len(self._keep)

    @property
    def lengths(self) -> list[int]:
        """Token count of each sample after templating and image expansion."""
        return self._lengths.tolist()

    @property
    def modality_lengths(self) -> list[int]:
        """Token counts, negative for text-only samples (the modality-grouped sampler's input)."""
        return self.modality_length_array.tolist()

    @property
    def modality_length_array(self) -> np.ndarray:
        """``modality_lengths`` as an int32 array (what the trainer's sampler takes: no Python int per sample)."""
        return np.where(self._has_image | (self._has_video if self._has_video is not None else False), self._lengths,
                        -self._lengths).astype(np.int32, copy=False)

    @property
    def modalities(self) -> list[int] | None:
        """With video on, the grouped sampler's modality per sample: 0 text-only, 1 images, 2 a video, 3 images and a
        video (each runs its own tower path: under ZeRO-3 every rank of a step must run the same one); None otherwise
        (the sign of ``modality_lengths`` says it)."""
        array = self.modality_array
        return None if array is None else array.tolist()

    @property
    def modality_array(self) -> np.ndarray | None:
        """``modalities`` as an int8 array (None without video)."""
        if self.video is None or self._has_video is None:
            return None
        return self._has_video.astype(np.int8) * 2 + self._has_image.astype(np.int8)

    def record(self, i: int) -> Record:
        j = int(self._keep[i])
        return parse_record(self.sources[self._source[i]].store[j], j)

    def sample_image_folder(self, i: int) -> str | None:
        """The image folder of sample ``i``'s source (``--image_folder`` unless its mixture entry gives one)."""
        return self.sources[self._source[i]].image_folder

    def sample_video_folder(self, i: int) -> str | None:
        """The video folder of sample ``i``'s source (``--video_folder`` unless its mixture entry gives one)."""
        return self.sources[self._source[i]].video_folder

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | None]:
        """Sample ``i``; when its image fails now (deleted, disk error) the next good index is returned instead and
        the failure counted in ``runtime_failures`` (never a crash, never a fully masked sample)."""
        for step in range(len(self)):
            j = (i + step) % len(self)
            if j in self._failed:
                continue
            try:
                return self._load(j)
            except (ImageLoadError, OSError) as err:
                kind = ("video_" + err.kind if isinstance(err, VideoLoadError) else image_problem_kind(err)
                        if isinstance(err, ImageLoadError) else "io_error")
                self._failed.add(j)
                self.runtime_failures.add(kind, str(err))
                logger.warning("skipping sample %d (replaced by the next good one): %s", j, err)
        raise DataError(f"every sample failed to load; last failures:\n{self.runtime_failures.report()}")

    def bad_samples_report(self) -> dict[str, Any]:
        """What was left out, by kind: invalid records, samples that cannot train, images that failed mid-run."""
        return {"invalid_records": self.problems.as_dict(), "cannot_train": self.dropped.as_dict(),
                "failed_during_training": self.runtime_failures.as_dict()}

    def _load(self, i: int) -> dict[str, torch.Tensor | None]:
        record = self.record(i)
        folder = self.sample_image_folder(i)
        if record.video is not None:
            return self._load_video(record, folder, self.sample_video_folder(i))
        if self.anyres is not None:
            return self._load_anyres(record, folder)
        sample = self._tokenize(record)
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": self.load_pixel_values(record, folder),
        }

    def _load_anyres(self, record: Record, folder=None) -> dict[str, torch.Tensor | None]:
        """anyres: ``pixel_values`` ``[n_images, views, 3, S, S]`` and ``image_sizes`` ``[n_images, 2]`` from the native
        image processor; the token counts come from the decoded images' sizes."""
        images = self._open_images(record, folder)
        sample = self._tokenize(record, [(im.height, im.width) for im in images])
        item = {"input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
                "labels": torch.tensor(sample.labels, dtype=torch.long), "pixel_values": None}
        if images:
            item.update(process_anyres_images(self.image_processor, images))
        return item

    def _load_video(self, record: Record, folder=None, video_folder=None) -> dict[str, torch.Tensor | None]:
        """A record with a video: its sampled frames decoded (seeking, resized to the tower's input as decoded) into
        ``pixel_values_videos`` ``[1, frames, 3, S, S]``; its images (OneVision / LlavaNext anyres) beside them. The
        video is under ``video_folder`` (its source's: a mixture entry's own, else ``--video_folder``)."""
        layout = self.video
        video_folder = self.video_folder if video_folder is None else str(video_folder)
        if layout is None:
            raise VideoLoadError("missing", record.video, f"record {record.id!r} has a video but --video_folder is not set")
        info, indices, pixel_values_videos = load_record_video(video_folder, record.video, layout,
                                                               self.image_processor, record.id)
        images = self._open_images(record, folder)
        n_tokens: int | list[int] = self.num_image_tokens
        if images and self.anyres is not None:
            n_tokens = self.anyres.record_image_tokens([(im.height, im.width) for im in images])
        sample = tokenize_conversation(
            video_messages(record.messages, info, indices, layout), self.template, self.tokenizer,
            image_token_id=self.image_token_id, num_image_tokens=n_tokens, model_max_length=self.model_max_length,
            mm_use_im_start_end=self.mm_use_im_start_end, video_token_id=self.video_token_id,
            num_video_tokens=layout.video_tokens(len(indices)))
        item = {"input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
                "labels": torch.tensor(sample.labels, dtype=torch.long), "pixel_values": None,
                "pixel_values_videos": pixel_values_videos}
        if images:
            item.update(process_anyres_images(self.image_processor, images))
        return item

    def _open_images(self, record: Record, folder=None) -> list:
        """The record's images decoded (paths under ``folder``, default ``--image_folder``; embedded bytes here, in
        the DataLoader worker); an error names the record id (and an embedded image's source file and row)."""
        folder = self.image_folder if folder is None else folder
        images = []
        for rel in record.images:
            try:
                image, _ = open_image_ref(folder, rel)
            except ImageLoadError as err:
                raise ImageLoadError(err.kind, err.path, f"{err.detail} (record {record.id!r})",
                                     image_folder=err.image_folder) from err
            images.append(image)
        return images

    def load_pixel_values(self, record: Record, folder=None) -> torch.Tensor | None:
        if not record.images:
            return None
        images = []
        for image in self._open_images(record, folder):
            if self.image_aspect_ratio == "pad":
                image = expand2square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
            images.append(image)
        return process_images(self.image_processor, images, self.image_aspect_ratio)


def process_images(image_processor, images: list, image_aspect_ratio: str = "square") -> torch.Tensor:
    """PIL images -> ``[n, 3, H, W]`` float tensor; ``square`` resizes to the tower's input size directly."""
    if image_aspect_ratio == "square":
        size = _input_size(image_processor)
        images = [im.resize((size, size), resample=3) if im.size != (size, size) else im for im in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def _input_size(image_processor) -> int:
    crop = getattr(image_processor, "crop_size", None)
    size = crop if crop else image_processor.size
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge"))
    return int(getattr(size, "height", None) or getattr(size, "shortest_edge", None) or size)


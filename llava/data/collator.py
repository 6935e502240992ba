"""Pad a list of samples into one batch; stack every image of the batch into one ``pixel_values``.

    collate = DataCollatorForSupervisedDataset(pad_token_id=0)
    collate([{"input_ids": tensor([1, 5, 9]), "labels": tensor([-100, 5, 9]), "pixel_values": x1},   # x1: [1,3,H,W]
             {"input_ids": tensor([1, 7]), "labels": tensor([-100, 7]), "pixel_values": None}])
    # {"input_ids": [[1, 5, 9], [1, 7, 0]], "labels": [[-100, 5, 9], [-100, 7, -100]],
    #  "attention_mask": [[1, 1, 1], [1, 1, 0]], "pixel_values": x1}    # images in batch order, [n_images,3,H,W]

``LlavaForConditionalGeneration`` scatters image features into the image tokens in order, so concatenating each
sample's images in batch order is what it expects; text-only batches carry no ``pixel_values``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.constants import IGNORE_INDEX


@dataclass
class DataCollatorForSupervisedDataset:
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    batch_num_images: bool = False  # LlavaOnevision: images per sample (several images: base views only)
    join_videos: bool = False  # LlavaNextVideo: every video's frames as one (no newline: the same features)

    def __call__(self, instances: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(x["input_ids"]) for x in instances)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(instances)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for row, x in enumerate(instances):
            t = len(x["input_ids"])
            input_ids[row, :t] = x["input_ids"]
            labels[row, :t] = x["labels"]
            attention_mask[row, :t] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        batch.update(collate_images(instances, self.batch_num_images))
        batch.update(collate_videos(instances, self.join_videos))
        return batch


@dataclass
class DataCollatorWithPacking:
    """Padding-free batches: the samples of a batch concatenated into rows of at most ``max_length`` tokens.

        collate = DataCollatorWithPacking(pad_token_id=0, max_length=6)
        collate([{"input_ids": tensor([1, 5, 9]), "labels": tensor([-100, 5, 9]), "pixel_values": x1},
                 {"input_ids": tensor([1, 7]), "labels": tensor([-100, 7]), "pixel_values": None},
                 {"input_ids": tensor([1, 8, 8, 4]), "labels": tensor([-100, -100, 8, 4]), "pixel_values": x2}])
        # {"input_ids":    [[1, 5, 9, 1, 7], [1, 8, 8, 4, 0]],       # rows as wide as the longest row
        #  "labels":       [[-100, 5, 9, -100, 7], [-100, -100, 8, 4, -100]],
        #  "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]],
        #  "pixel_values": cat([x1, x2])}                          # images in token order; no attention_mask

    Rows are the fewest that hold the batch at ``max_length`` each, balanced in length (:meth:`rows_of`); images
    are concatenated in the order their tokens appear (row by row), which is the order in which the model scatters
    image features into image tokens. Position ids restart at 0 for every
    sample and there is no ``attention_mask``: transformers' ``masking_utils`` then reads the sample boundaries from
    the position ids (sdpa/eager build a block-diagonal causal mask, flash-attention varlen derives ``cu_seqlens``),
    so attention never crosses samples. The tail padding of a short row is one more position run of its own, with
    ``IGNORE_INDEX`` labels. The first label of each sample is ``IGNORE_INDEX`` so the last token of one sample never
    predicts the first of the next; an unpacked batch never predicts position 0 either, so the per-token mean loss
    (and the Trainer's ``num_items_in_batch`` count over ``labels[..., 1:]``) is the same packed or padded.
    ``max_length=None`` packs the whole batch into one row.
    """

    pad_token_id: int
    max_length: int | None = None
    batch_num_images: bool = False
    join_videos: bool = False

    def rows_of(self, lengths: list[int]) -> list[list[int]]:
        """Sample indices of each row: the fewest rows of at most ``max_length`` tokens, balanced so that the rows
        (padded to the longest) waste little. Longest sample first into the shortest row; one more row if that
        overflows. Within a row samples keep batch order; rows are ordered by their first sample."""
        too_long = [i for i, n in enumerate(lengths) if self.max_length is not None and n > self.max_length]
        if too_long:
            raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packing "
                             f"max_length {self.max_length}")
        if self.max_length is None:
            return [list(range(len(lengths)))]
        k = max(1, -(-sum(lengths) // self.max_length))
        while True:
            rows: list[list[int]] = [[] for _ in range(k)]
            used = [0] * k
            for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
                r = min(range(k), key=used.__getitem__)
                rows[r].append(i)
                used[r] += lengths[i]
            if max(used) <= self.max_length:
                return sorted((sorted(row) for row in rows if row), key=lambda row: row[0])
            k += 1

    def __call__(self, instances: list[dict]) -> dict[str, torch.Tensor]:
        rows = self.rows_of([len(x["input_ids"]) for x in instances])
        width = max(sum(len(instances[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ordered = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                x = instances[i]
                t = len(x["input_ids"])
                input_ids[r, start : start + t] = x["input_ids"]
                labels[r, start : start + t] = x["labels"]
                labels[r, start] = IGNORE_INDEX
                position_ids[r, start : start + t] = torch.arange(t)
                ordered.append(x)
                start += t
            position_ids[r, start:] = torch.arange(width - start)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        batch.update(collate_images(ordered, self.batch_num_images))
        batch.update(collate_videos(ordered, self.join_videos))
        return batch


def collate_images(instances: list[dict], batch_num_images: bool = False) -> dict[str, torch.Tensor]:
    """Every image of the batch in sample order: ``pixel_values`` ``[n, 3, H, W]`` (LLaVA-1.5), or for anyres
    ``[n, views, 3, S, S]`` with the views zero-padded to the batch's largest (the native model keeps the first
    views of each image, counted from ``image_sizes`` ``[n, 2]``) and, for OneVision, ``batch_num_images``."""
    with_images = [x for x in instances if x.get("pixel_values") is not None]
    if not with_images:
        return {}
    pixels = [x["pixel_values"] for x in with_images]
    if pixels[0].dim() == 4:
        return {"pixel_values": torch.cat(pixels, dim=0)}
    views = max(p.shape[1] for p in pixels)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, views - p.shape[1])) for p in pixels]
    out = {"pixel_values": torch.cat(padded, dim=0), "image_sizes": torch.cat([x["image_sizes"] for x in with_images])}
    if batch_num_images:
        out["batch_num_images"] = torch.tensor([len(x["image_sizes"]) for x in with_images], dtype=torch.long)
    return out



def collate_videos(instances: list[dict], join: bool = False) -> dict[str, torch.Tensor]:
    """Every video of the batch in sample order as ``pixel_values_videos`` ``[videos, frames, 3, S, S]`` (the native
    models scatter each video's features into its ``<video>`` tokens in that order). LlavaOnevision appends one newline
    per video, so its videos must share a frame count (``--force_sample``; checked at start-up); ``join`` (LlavaNextVideo,
    no newline, frames pooled one by one) gives ``[1, all frames, 3, S, S]``, equal features for any frame counts."""
    videos = [x["pixel_values_videos"] for x in instances if x.get("pixel_values_videos") is not None]
    if not videos:
        return {}
    if join:
        return {"pixel_values_videos": torch.cat(videos, dim=1)}
    frames = {v.shape[1] for v in videos}
    if len(frames) > 1:
        raise ValueError(f"videos of {sorted(frames)} frames in one batch: LlavaOnevision takes one frame count per "
                         f"batch (--force_sample True gives every video --frames_upbound frames)")
    return {"pixel_values_videos": torch.cat(videos, dim=0)}

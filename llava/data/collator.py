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
        images = [x["pixel_values"] for x in instances if x.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images, dim=0)
        return batch

"""Length- and modality-grouped sample orders (the original LLaVA's samplers, as pure functions).

Grouping samples of similar length into the same step wastes less padding; grouping by modality keeps
image-text and text-only samples in separate optimizer steps, as LLaVA does. Every function here takes an
explicit ``torch.Generator``, so an order is a pure function of (lengths, batch_size, world_size, seed).

    >>> g = torch.Generator().manual_seed(0)
    >>> order = modality_length_grouped_indices([5, -3, 7, -2], batch_size=1, world_size=2, generator=g)

How the trainer uses it (``LLaVATrainer``): transformers.Trainer / accelerate cut the sampler's order into
consecutive batches of ``per_device_train_batch_size`` and give batch ``k`` to process ``k % num_processes``;
with gradient accumulation one optimizer step consumes ``per_device_batch * num_processes * grad_accum``
consecutive indices. So the trainer passes ``batch_size = per_device_train_batch_size`` and
``world_size = num_processes * gradient_accumulation_steps``: one *megabatch* (``batch_size * world_size``
consecutive indices) is exactly one optimizer step across all ranks, and each of its ``world_size`` chunks is
one micro-batch of one rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = [
    "LengthGroupedSampler",
    "length_grouped_indices",
    "modality_length_grouped_indices",
    "split_to_even_chunks",
]


def _check_sizes(batch_size: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1:
        raise ValueError(
            f"batch_size and world_size must be >= 1, got batch_size={batch_size}, world_size={world_size}"
        )


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split ``indices`` (sorted by length, longest first) into chunks of ``batch_size`` with balanced totals.

    Greedy, as LLaVA's ``split_to_even_chunks``: each index goes to the open chunk with the smallest running
    total length; a chunk closes when it holds its capacity. Capacities are ``batch_size`` for all chunks but
    the last, which takes the remainder — so a full megabatch gives ``world_size`` chunks of ``batch_size`` and
    an incomplete one gives chunks that line up with the data loader's consecutive batches.
    """
    n = len(indices)
    num_chunks = -(-n // batch_size)
    capacities = [batch_size] * num_chunks
    if num_chunks:
        capacities[-1] = n - batch_size * (num_chunks - 1)
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    open_chunks = list(range(num_chunks))
    for index in indices:
        target = min(open_chunks, key=lambda c: (totals[c], c))
        chunks[target].append(index)
        totals[target] += lengths[index]
        if len(chunks[target]) == capacities[target]:
            open_chunks.remove(target)
    return chunks


def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A permutation of ``range(len(lengths))`` grouped so each megabatch holds similar lengths.

    A random permutation (from ``generator``) is cut into megabatches of ``batch_size * world_size``; each
    megabatch is sorted by length, longest first, and split into ``world_size`` chunks of ``batch_size`` with
    balanced total length (:func:`split_to_even_chunks`); the chunks are concatenated. The last megabatch may
    be incomplete. ``lengths`` must be non-negative (use :func:`modality_length_grouped_indices` for signed ones).
    """
    _check_sizes(batch_size, world_size)
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(
                f"length_grouped_indices: lengths[{i}] = {length} is negative; signed (modality) lengths "
                "need modality_length_grouped_indices / group_by_modality=True"
            )
    megabatch_size = batch_size * world_size
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    order: list[int] = []
    for start in range(0, len(permutation), megabatch_size):
        # Sort by length descending; ties keep the random order (sorted() is stable).
        megabatch = sorted(permutation[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, batch_size):
            order.extend(chunk)
    return order


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A permutation in which every full megabatch (one optimizer step) holds a single modality.

    ``lengths`` are signed: ``> 0`` a multimodal sample, ``< 0`` a text-only one (its length is the absolute
    value); ``0`` is invalid. Each modality is ordered with :func:`length_grouped_indices` and cut into
    megabatches of ``batch_size * world_size``; the full megabatches of both modalities are shuffled together,
    and the (at most two) incomplete last megabatches go at the end, multimodal first — so only the tail, fewer
    than ``2 * batch_size * world_size`` indices, can mix modalities. Works when every sample has one modality.
    """
    _check_sizes(batch_size, world_size)
    for i, length in enumerate(lengths):
        if length == 0:
            raise ValueError(
                f"modality_length_grouped_indices: lengths[{i}] is 0; a modality length must be > 0 "
                "(with image) or < 0 (text only)"
            )
    megabatch_size = batch_size * world_size
    full: list[list[int]] = []
    tail: list[int] = []
    for sign in (1, -1):
        members = [i for i, length in enumerate(lengths) if length * sign > 0]
        if not members:
            continue
        member_lengths = [abs(lengths[i]) for i in members]
        shuffled = [members[j] for j in length_grouped_indices(member_lengths, batch_size, world_size, generator)]
        n_full = len(shuffled) // megabatch_size
        full.extend(shuffled[k * megabatch_size : (k + 1) * megabatch_size] for k in range(n_full))
        tail.extend(shuffled[n_full * megabatch_size :])
    order = [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]]
    return order + tail


class LengthGroupedSampler(Sampler[int]):
    """Yields a length- (or modality-and-length-) grouped order of dataset indices, new each epoch.

    Args:
        batch_size: per-device micro-batch size (``per_device_train_batch_size``).
        world_size: ``num_processes * gradient_accumulation_steps`` — so that one megabatch of
            ``batch_size * world_size`` consecutive indices is one optimizer step over all ranks (see the
            module docstring for how Trainer/accelerate hand batches to processes).
        lengths: per-sample lengths; signed (``modality_lengths``) when ``group_by_modality``.
        group_by_modality: keep image and text-only samples in separate optimizer steps.
        seed: the order of epoch ``e`` is drawn from ``torch.Generator().manual_seed(seed + e)``.

    Every process must build the sampler with the same arguments; each then yields the same global order,
    which accelerate shards.
    """

    def __init__(
        self,
        batch_size: int,
        world_size: int,
        lengths: Sequence[int],
        *,
        group_by_modality: bool,
        seed: int,
    ) -> None:
        _check_sizes(batch_size, world_size)
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (called by Trainer/accelerate each epoch)."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """The full order for the current epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        group = modality_length_grouped_indices if self.group_by_modality else length_grouped_indices
        return group(self.lengths, self.batch_size, self.world_size, generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.lengths)

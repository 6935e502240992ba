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

import numpy as np
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
    lengths: Sequence[int] | np.ndarray, batch_size: int, world_size: int, generator: torch.Generator
) -> np.ndarray:
    """A permutation of ``range(len(lengths))`` grouped so each megabatch holds similar lengths.

    A random permutation (from ``generator``) is cut into megabatches of ``batch_size * world_size``; each
    megabatch is sorted by length, longest first (ties keep the permutation's order), and split into ``world_size``
    chunks of ``batch_size`` with balanced total length (:func:`split_to_even_chunks`); the chunks are concatenated.
    The last megabatch may be incomplete. ``lengths`` must be non-negative (use
    :func:`modality_length_grouped_indices` for signed ones). Computed on arrays (millions of samples: no Python
    object per sample); the greedy split runs one step per megabatch position, over all full megabatches at once.
    """
    _check_sizes(batch_size, world_size)
    lengths = _as_int_array(lengths)
    negative = np.flatnonzero(lengths < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(
            f"length_grouped_indices: lengths[{i}] = {lengths[i]} is negative; signed (modality) lengths "
            "need modality_length_grouped_indices / group_by_modality=True"
        )
    n = len(lengths)
    megabatch_size = batch_size * world_size
    # drawn in the index type itself (the same permutation and generator state as int64's: torch's CPU randperm is
    # one algorithm for every dtype), so no int64 copy of the whole permutation is made
    order = torch.randperm(n, generator=generator, dtype=torch.int32 if n < 2**31 else torch.int64).numpy()
    n_full = n // megabatch_size
    full = order[: n_full * megabatch_size].reshape(n_full, megabatch_size)  # a view: sorted and split in place
    step = max(1, (1 << 16) // megabatch_size)  # megabatches per block: the temporaries stay a few MiB
    for r in range(0, n_full, step):
        rows = full[r : r + step]
        # each megabatch sorted by length, longest first; a stable sort: ties keep the permutation's order
        rows[:] = np.take_along_axis(rows, np.argsort(-lengths[rows].astype(np.int64), axis=1, kind="stable"), 1)
        if world_size > 1:
            rows[:] = _split_full_megabatches(rows, lengths, batch_size, world_size)
    rest = order[n_full * megabatch_size :]
    rest = sorted(rest.tolist(), key=lambda i: lengths[i], reverse=True)
    order[n_full * megabatch_size :] = [i for chunk in split_to_even_chunks(rest, lengths, batch_size) for i in chunk]
    return order


def _as_int_array(values) -> np.ndarray:
    """An integer array as given (no copy for one), else a new int64 array."""
    array = np.asarray(values).reshape(-1)
    return array if array.dtype.kind in "iu" else array.astype(np.int64)


def _index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _split_full_megabatches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, world_size: int) -> np.ndarray:
    """:func:`split_to_even_chunks` of every row (a full megabatch, longest first) at once: position by position,
    each row's index goes to its open chunk with the smallest running total (the lowest chunk on a tie)."""
    n_rows = len(rows)
    totals = np.zeros((n_rows, world_size), np.int64)
    counts = np.zeros((n_rows, world_size), np.int64)
    out = np.empty((n_rows, world_size, batch_size), rows.dtype)
    row = np.arange(n_rows)
    closed = np.iinfo(np.int64).max
    for j in range(rows.shape[1]):
        target = np.where(counts < batch_size, totals, closed).argmin(axis=1)  # argmin: the first (lowest) chunk
        out[row, target, counts[row, target]] = rows[:, j]
        totals[row, target] += lengths[rows[:, j]]
        counts[row, target] += 1
    return out.reshape(n_rows, world_size * batch_size)


def modality_length_grouped_indices(
    lengths: Sequence[int] | np.ndarray, batch_size: int, world_size: int, generator: torch.Generator,
    modalities: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """A permutation in which every full megabatch (one optimizer step) holds a single modality.

    ``lengths`` are signed: ``> 0`` a multimodal sample, ``< 0`` a text-only one (its length is the absolute
    value); ``0`` is invalid. Each modality is ordered with :func:`length_grouped_indices` and cut into
    megabatches of ``batch_size * world_size``; the full megabatches of both modalities are shuffled together,
    and the (at most two) incomplete last megabatches go at the end, multimodal first — so only the tail, fewer
    than ``2 * batch_size * world_size`` indices, can mix modalities. Works when every sample has one modality.
    ``modalities`` (one id per sample, e.g. 0 text, 1 image, 2 video) groups by those ids instead of the sign, the
    highest id first in the tail.
    """
    _check_sizes(batch_size, world_size)
    lengths = _as_int_array(lengths)
    zero = np.flatnonzero(lengths == 0)
    if zero.size:
        raise ValueError(
            f"modality_length_grouped_indices: lengths[{int(zero[0])}] is 0; a modality length must be > 0 "
            "(with image) or < 0 (text only)"
        )
    n = len(lengths)
    megabatch_size = batch_size * world_size
    full: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    if modalities is None:
        keys, key_order = lengths > 0, [True, False]
    else:
        keys = np.asarray(modalities).reshape(-1)
        key_order = np.unique(keys)[::-1].tolist()
    positions = np.arange(n, dtype=_index_dtype(n))  # boolean selection of it: no int64 array of positions
    for key in key_order:
        members = positions[keys == key]
        if not members.size:
            continue
        member_lengths = lengths[members]
        np.abs(member_lengths, out=member_lengths)
        members = members[length_grouped_indices(member_lengths, batch_size, world_size, generator)]
        del member_lengths
        n_full = len(members) // megabatch_size
        full.append(members[: n_full * megabatch_size].reshape(n_full, megabatch_size))
        tail.append(members[n_full * megabatch_size :])
    del positions
    n_blocks = sum(len(f) for f in full)
    picks = torch.randperm(n_blocks, generator=generator).numpy()
    order = np.empty(n, _index_dtype(n))
    first = np.cumsum([0] + [len(f) for f in full])  # block k of the concatenation: full[j][k - first[j]]
    for j, blocks in enumerate(full):  # the shuffled position of every block, filled source by source
        at = np.flatnonzero((picks >= first[j]) & (picks < first[j + 1]))
        order[: n_blocks * megabatch_size].reshape(n_blocks, megabatch_size)[at] = blocks[picks[at] - first[j]]
    order[n_blocks * megabatch_size :] = np.concatenate(tail) if tail else []
    return order


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
        modalities: Sequence[int] | None = None,
    ) -> None:
        _check_sizes(batch_size, world_size)
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = _as_int_array(lengths)  # an array: no Python int per sample
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.modalities = None if modalities is None else np.asarray(modalities).reshape(-1)  # 0 text, 1 image, ...
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (called by Trainer/accelerate each epoch)."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """The full order for the current epoch (an int64 array)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_modality:
            return modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator,
                                                   self.modalities)
        return length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)

    def __iter__(self) -> Iterator[int]:
        return map(int, self.indices())  # Python ints one at a time, never a list of all of them

    def __len__(self) -> int:
        return len(self.lengths)

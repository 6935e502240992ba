"""Properties of the length- and modality-grouped sample orders: `pytest tests/data/test_samplers.py`.

Each property is recomputed directly from the output (a permutation, single-modality megabatches, balanced
chunks), never by calling the code under test a second way; and the orders equal those of LLaVA's per-sample
Python code (the project's implementation before it moved to arrays, written out below as the reference).
"""

from __future__ import annotations

import random

import pytest
import torch

from llava.data.samplers import (
    LengthGroupedSampler,
    length_grouped_indices,
    modality_length_grouped_indices,
)

SIZES = [(n, b, w) for n in (0, 1, 2, 7, 16, 33, 100) for b in (1, 2, 3, 4) for w in (1, 2, 3, 8)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_lengths(n: int, seed: int, *, text_share: float = 0.3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 500) * (-1 if rng.random() < text_share else 1) for _ in range(n)]


@pytest.mark.parametrize(("n", "batch", "world"), SIZES)
def test_length_grouped_is_a_permutation(n: int, batch: int, world: int) -> None:
    lengths = [abs(x) for x in _random_lengths(n, seed=n)]
    order = length_grouped_indices(lengths, batch, world, _gen(0))
    assert sorted(order) == list(range(n))


@pytest.mark.parametrize(("n", "batch", "world"), SIZES)
@pytest.mark.parametrize("text_share", [0.0, 0.3, 1.0])
def test_modality_grouped_is_a_permutation(n: int, batch: int, world: int, text_share: float) -> None:
    lengths = _random_lengths(n, seed=n, text_share=text_share)
    order = modality_length_grouped_indices(lengths, batch, world, _gen(0))
    assert sorted(order) == list(range(n))


@pytest.mark.parametrize("function", [length_grouped_indices, modality_length_grouped_indices])
def test_same_seed_same_order_other_seed_other_order(function) -> None:
    lengths = _random_lengths(200, seed=1)
    if function is length_grouped_indices:
        lengths = [abs(x) for x in lengths]
    first = function(lengths, 4, 2, _gen(7)).tolist()
    assert function(lengths, 4, 2, _gen(7)).tolist() == first
    assert function(lengths, 4, 2, _gen(8)).tolist() != first


def _megabatches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize(("n_image", "n_text", "batch", "world"), [(50, 30, 2, 3), (64, 16, 4, 2), (7, 5, 1, 4)])
@pytest.mark.parametrize("seed", range(5))
def test_every_full_megabatch_has_one_modality(n_image: int, n_text: int, batch: int, world: int, seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(n_image)] + [-rng.randint(1, 300) for _ in range(n_text)]
    rng.shuffle(lengths)
    size = batch * world
    order = modality_length_grouped_indices(lengths, batch, world, _gen(seed))
    n_full = n_image // size + n_text // size
    megabatches = _megabatches(order, size)
    for megabatch in megabatches[:n_full]:
        assert len({lengths[i] > 0 for i in megabatch}) == 1, megabatch
    # Only the two incomplete remainders, in the tail, may share a step.
    assert len(order) - n_full * size == n_image % size + n_text % size
    # Both modalities' full megabatches are shuffled together, not one modality after the other.
    kinds = [lengths[mb[0]] > 0 for mb in megabatches[:n_full]]
    assert kinds.count(True) == n_image // size and kinds.count(False) == n_text // size


def test_modality_megabatches_interleave_across_seeds() -> None:
    lengths = [10] * 40 + [-10] * 40
    firsts = {lengths[modality_length_grouped_indices(lengths, 2, 2, _gen(s))[0]] > 0 for s in range(20)}
    assert firsts == {True, False}


@pytest.mark.parametrize("sign", [1, -1])
def test_single_modality_works(sign: int) -> None:
    lengths = [sign * (i % 17 + 1) for i in range(45)]
    order = modality_length_grouped_indices(lengths, 2, 4, _gen(3))
    assert sorted(order) == list(range(45))


def test_zero_length_names_the_index() -> None:
    with pytest.raises(ValueError, match=r"lengths\[2\]"):
        modality_length_grouped_indices([3, -4, 0, 5], 1, 1, _gen(0))


def test_negative_length_without_modality_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        length_grouped_indices([3, -4], 1, 1, _gen(0))


def _check_balanced_chunks(order: list[int], lengths: list[int], batch: int, world: int, n_full: int) -> None:
    size = batch * world
    for start in range(0, n_full * size, size):
        megabatch = order[start : start + size]
        chunks = [megabatch[k * batch : (k + 1) * batch] for k in range(world)]
        totals = [sum(abs(lengths[i]) for i in chunk) for chunk in chunks]
        assert max(totals) - min(totals) <= max(abs(lengths[i]) for i in megabatch), (totals, chunks)


@pytest.mark.parametrize(("batch", "world"), [(1, 4), (2, 2), (3, 4), (4, 8), (8, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_chunks_are_length_balanced(batch: int, world: int, seed: int) -> None:
    rng = random.Random(seed)
    # Mixed scales make unbalanced splits likely if the balancing were missing.
    lengths = [rng.choice([rng.randint(1, 10), rng.randint(500, 2000)]) for _ in range(batch * world * 6 + 3)]
    size = batch * world
    order = length_grouped_indices(lengths, batch, world, _gen(seed))
    _check_balanced_chunks(order, lengths, batch, world, n_full=len(lengths) // size)
    signed = [x if rng.random() < 0.6 else -x for x in lengths]
    n_full = sum(x > 0 for x in signed) // size + sum(x < 0 for x in signed) // size  # the tail may mix remainders
    order = modality_length_grouped_indices(signed, batch, world, _gen(seed))
    _check_balanced_chunks(order, signed, batch, world, n_full=n_full)


def test_megabatches_are_drawn_from_the_permutation_and_sorted() -> None:
    """Each megabatch holds exactly the indices of the matching slice of the generator's permutation."""
    lengths = [(i * 37) % 101 + 1 for i in range(30)]
    batch, world = 2, 3
    size = batch * world
    order = length_grouped_indices(lengths, batch, world, _gen(11))
    permutation = torch.randperm(len(lengths), generator=_gen(11)).tolist()
    for k, megabatch in enumerate(_megabatches(order, size)):
        assert sorted(megabatch) == sorted(permutation[k * size : (k + 1) * size])
        # Greedy balancing hands out the longest first: each chunk's first item is among the `world` longest.
        longest = sorted((lengths[i] for i in megabatch), reverse=True)[:world]
        firsts = [lengths[megabatch[c * batch]] for c in range(len(megabatch) // batch)]
        assert sorted(firsts, reverse=True) == longest[: len(firsts)]


def test_each_step_is_sorted_into_chunks_longest_first() -> None:
    """Within a step the longest sample of each chunk is among the `world` longest of the step (LLaVA's greedy)."""
    lengths = [1, 1000, 2, 900, 3, 800, 4, 700]
    order = length_grouped_indices(lengths, 2, 4, _gen(0))
    assert sorted(lengths[order[c * 2]] for c in range(4)) == [700, 800, 900, 1000]
    assert sorted(lengths[order[c * 2 + 1]] for c in range(4)) == [1, 2, 3, 4]


@pytest.mark.parametrize("group_by_modality", [False, True])
def test_sampler_matches_pure_function_and_changes_per_epoch(group_by_modality: bool) -> None:
    lengths = _random_lengths(97, seed=5)
    if not group_by_modality:
        lengths = [abs(x) for x in lengths]
    function = modality_length_grouped_indices if group_by_modality else length_grouped_indices
    sampler = LengthGroupedSampler(3, 4, lengths, group_by_modality=group_by_modality, seed=42)
    assert len(sampler) == 97
    epoch0 = list(sampler)
    assert epoch0 == function(lengths, 3, 4, _gen(42)).tolist()
    assert list(sampler) == epoch0  # iterating again without set_epoch repeats the order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 == function(lengths, 3, 4, _gen(43)).tolist()
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(97))
    other = LengthGroupedSampler(3, 4, lengths, group_by_modality=group_by_modality, seed=7)
    assert list(other) != epoch0


def test_sampler_in_a_dataloader_gives_single_modality_steps() -> None:
    """Simulate accelerate: batches of `per_device` go round-robin to processes; a step = world*accum batches."""
    per_device, processes, accum = 2, 2, 2
    lengths = [5] * 48 + [-5] * 40
    sampler = LengthGroupedSampler(per_device, processes * accum, lengths, group_by_modality=True, seed=0)
    loader = torch.utils.data.DataLoader(list(range(len(lengths))), batch_size=per_device, sampler=sampler)
    batches = [b.tolist() for b in loader]
    per_step = processes * accum
    for s in range(0, len(batches) - len(batches) % per_step, per_step):
        step = [i for b in batches[s : s + per_step] for i in b]
        assert len({lengths[i] > 0 for i in step}) == 1


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_indices([1, 2], 0, 1, _gen(0))
    with pytest.raises(ValueError, match="world_size"):
        LengthGroupedSampler(1, 0, [1], group_by_modality=False, seed=0)


# ---------------------------------------------------------------- the per-sample reference (lists, one index at a time)

def _ref_split(indices, lengths, batch_size):
    n = len(indices)
    num_chunks = -(-n // batch_size)
    capacities = [batch_size] * num_chunks
    if num_chunks:
        capacities[-1] = n - batch_size * (num_chunks - 1)
    chunks = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    open_chunks = list(range(num_chunks))
    for index in indices:
        target = min(open_chunks, key=lambda c: (totals[c], c))
        chunks[target].append(index)
        totals[target] += lengths[index]
        if len(chunks[target]) == capacities[target]:
            open_chunks.remove(target)
    return chunks


def _ref_length_grouped(lengths, batch_size, world_size, generator):
    megabatch_size = batch_size * world_size
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    order = []
    for start in range(0, len(permutation), megabatch_size):
        megabatch = sorted(permutation[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in _ref_split(megabatch, lengths, batch_size):
            order.extend(chunk)
    return order


def _ref_modality_grouped(lengths, batch_size, world_size, generator, modalities=None):
    megabatch_size = batch_size * world_size
    full, tail = [], []
    keys = [1 if length > 0 else -1 for length in lengths] if modalities is None else list(modalities)
    for key in (1, -1) if modalities is None else sorted(set(keys), reverse=True):
        members = [i for i, k in enumerate(keys) if k == key]
        if not members:
            continue
        member_lengths = [abs(lengths[i]) for i in members]
        shuffled = [members[j] for j in _ref_length_grouped(member_lengths, batch_size, world_size, generator)]
        n_full = len(shuffled) // megabatch_size
        full.extend(shuffled[k * megabatch_size : (k + 1) * megabatch_size] for k in range(n_full))
        tail.extend(shuffled[n_full * megabatch_size :])
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + tail


@pytest.mark.parametrize(("n", "batch", "world"), [*SIZES, (1000, 4, 2), (997, 3, 16), (513, 16, 1), (2000, 1, 64)])
def test_orders_equal_the_per_sample_reference(n: int, batch: int, world: int) -> None:
    """Same generator state in, same order out: length-grouped, modality-grouped (signs), and with modality ids
    (video runs); few distinct lengths (many ties) as well as many. The generator is left in the same state too."""
    for seed in range(3):
        signed = _random_lengths(n, seed=seed + n)
        rng = random.Random(seed)
        tied = [rng.choice([3, 3, 7, -3, -7]) for _ in range(n)]
        for lengths in (signed, tied):
            plain = [abs(x) for x in lengths]
            g, ref_g = _gen(seed), _gen(seed)
            assert length_grouped_indices(plain, batch, world, g).tolist() == _ref_length_grouped(plain, batch, world,
                                                                                                   ref_g)
            assert modality_length_grouped_indices(lengths, batch, world, g).tolist() == _ref_modality_grouped(
                lengths, batch, world, ref_g)
            ids = [rng.randrange(4) for _ in range(n)]
            assert modality_length_grouped_indices(lengths, batch, world, g, ids).tolist() == _ref_modality_grouped(
                lengths, batch, world, ref_g, ids)
            assert torch.equal(g.get_state(), ref_g.get_state())


def test_sampler_takes_arrays_and_yields_python_ints() -> None:
    import numpy as np

    lengths = _random_lengths(300, seed=9)
    sampler = LengthGroupedSampler(2, 3, np.asarray(lengths, np.int32), group_by_modality=True, seed=1,
                                   modalities=np.asarray([x > 0 for x in lengths], np.int8))
    order = list(sampler)
    assert all(type(i) is int for i in order)
    assert order == _ref_modality_grouped(lengths, 2, 3, _gen(1), [int(x > 0) for x in lengths])

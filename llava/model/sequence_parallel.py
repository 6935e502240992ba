"""Sequence parallelism (Ulysses): one long sample's language-model work split over N processes.

    from llava.model.sequence_parallel import use_sequence_parallel
    use_sequence_parallel(model, 2)   # training forwards: each rank of a group of 2 runs half of the sequence
    use_sequence_parallel(model, 1)   # off: the stock sdpa path again (done before saving)

The ranks of one sequence-parallel group hold the same batch. The vision tower and projector run on each rank's own
share of the batch's tower inputs (images, anyres crops, video frames: the rows the tower gets stacked along dim 0),
and the projected features are all-gathered over the group (``_GatherRows``, below), so every rank merges the whole
batch's features into the embeddings as without sequence parallelism; a pre-hook on the language model then keeps
rank r's slice ``r`` of the N equal slices of the merged sequence (and of its position ids, which stay those of the
whole sequence, so RoPE is unchanged). In every attention layer ``q/k/v [b, heads, T/N, d]`` go through an
all-to-all to ``[b, heads/N, T, d]`` (each rank: all positions, a slice of the heads), attention runs over the whole
sequence with the same boundaries as without sequence parallelism (causal; packed rows cut into their samples, the
sizes read from the whole row's position ids), and a second all-to-all brings ``[b, heads, T/N, d]`` back. This is
DeepSpeed's Ulysses algorithm (``deepspeed.runtime.sequence_parallel.ulysses_sp``, Arctic long-sequence training)
written here: its ``register_with_transformers`` replaces the global attention entry and drops the masks, so
packed-sample boundaries would be lost, and the model package imports no DeepSpeed.

Labels are shifted on the whole sequence before the split (``shift_labels``, transformers' own convention, read
by the stock loss and by ``supervised_head.py``), so the last position of a slice is trained on the first token of
the next. The loss of a rank is its slice's summed cross-entropy over the whole micro-batch's supervised-token
count, times N: ranks average their gradients over the world (DeepSpeed / DDP), and N ranks each holding 1/N of
one sample's gradient must sum, not average. The Trainer's ``num_items_in_batch`` (summed over ranks that share a
batch) is divided by N for the same reason; without it the count is all-reduced over the group.

The tower's rows ``R`` are padded to ``N * c`` (``c = ceil(R / N)``; copies of the last row, so every rank runs
the tower on ``c`` rows, as ZeRO-3's parameter gathers need) and rank r runs the tower and projector on rows
``[r * c, (r + 1) * c)``. A pre-hook on the tower takes the share; a hook on the projector all-gathers its
output and keeps the first R rows, in order, so what follows the projector (anyres unpadding and newlines,
OneVision's per-frame bilinear pooling and per-video newline; LlavaNextVideo's pooling runs before the
projector, per frame, on the share) sees every whole image / frame as before. A frozen tower runs its share as
it ran the whole batch (its weights take no gradient); its features are gathered all the same. The all-gather's
backward is a reduce-scatter (the sum over the group's ranks of their gradients for the gathered rows, each rank
keeping its own chunk), so the tower and projector gradients average to one process's. Why: let ``L_r`` be rank
r's loss (its slice, times N, as above), so ``sum_r L_r = N * L`` with ``L`` one process's loss, and DeepSpeed
steps with the mean ``(1/N) sum_r g_r`` of the ranks' gradients. Each rank r holds its own copy ``F^r`` of the
gathered features, built from the chunks ``F_j`` (chunk j computed on rank j); its backward (the attention
all-to-alls carry the other ranks' terms) leaves on that copy ``G_r = d(sum_s L_s)/dF^r``. Since every copy is
made of the same chunks, ``d(sum_s L_s)/dF_j = sum_r G_r[j]``: the reduce-scatter, which hands rank j exactly
that. Its tower and projector backward then give ``g_j = d(sum_s L_s)/dF_j * dF_j/dtheta``; the chunks partition
the features, so ``sum_j g_j = d(sum_s L_s)/dtheta = N * dL/dtheta`` and the mean over the ranks is
``dL/dtheta``, one process's gradient -- the same argument that holds the language model's weights. Keeping only
``G_j[j]`` (a plain slice, no sum) would drop the terms of the other ranks' copies.

Right padding only (``DataCollatorForSupervisedDataset`` pads right): the padding mask is dropped and attention is
causal over the whole row, exact for every real token (``causal_padding.py`` says why). The sequence is padded to a
multiple of N (ids that are no image token, labels ``-100``, positions continuing the row). Eval, predict and
generation are not split. Held by ``tests/model/test_sequence_parallel.py`` (2 ranks vs 1 process: loss and
gradients, images / anyres crops / video frames, each rank's tower rows counted),
``tests/train/test_sequence_parallel_train.py`` and ``tests/train/test_sequence_parallel_video.py`` (one group of 2
processes, or 2 groups of 2, vs 1 process: losses and weights, under ZeRO-1/2/3).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from llava.constants import IGNORE_INDEX
from llava.errors import UsageValueError
from llava.model.causal_padding import is_right_padding
from llava.model.packed_attention import packed_sdpa_attention_forward, packed_sdpa_mask, sample_sizes

SP_SDPA = "llava_sp_sdpa"
SP_KWARG = "llava_sequence_parallel"  # the group and the whole row's sample sizes, handed to every attention call
_ATTR = "_llava_sequence_parallel"


class _SeqAllToAll(torch.autograd.Function):
    """``[b, h, T/N, d]`` (all heads, this rank's positions) <-> ``[b, h/N, T, d]`` (a slice of heads, every
    position), over ``group``; each direction's backward is the other direction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, not ctx.to_heads), None, None


def _all_to_all(x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
    n = dist.get_world_size(group)
    b, h, s, d = x.shape
    if to_heads:  # send head slice j to rank j; receive every rank's positions for my heads
        send = x.reshape(b, n, h // n, s, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)
    send = x.reshape(b, h, n, s // n, d).permute(2, 0, 1, 3, 4).contiguous()  # position slice i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, n * h, s // n, d)


class _GatherRows(torch.autograd.Function):
    """Each rank's ``[c, ...]`` rows -> every rank's, stacked in rank order ``[N * c, ...]`` (an all-gather over
    ``group``); the backward is a reduce-scatter: the sum over the ranks of the stacked rows' gradients, each rank
    keeping its own chunk (the module docstring says why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        chunks = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(chunks, x.contiguous(), group=group)
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad):
        chunks = [c.contiguous() for c in grad.chunk(dist.get_world_size(ctx.group))]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=ctx.group)  # sums by default
        return out, None


class SequenceParallelContext:
    """What one training forward's attention calls need: the group and the whole row's sample sizes."""

    def __init__(self, group, sizes: list[list[int]] | None):
        self.group, self.sizes = group, sizes


def sp_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """``query/key/value``: ``[batch, heads, T/N, head_dim]``; returns ``([batch, T/N, heads, head_dim], None)``.
    Without a sequence-parallel context (eval, generation): the packed / stock sdpa path."""
    ctx: SequenceParallelContext | None = kwargs.pop(SP_KWARG, None)
    if ctx is None:
        return packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, is_causal=is_causal, **kwargs)
    q, k, v = (_SeqAllToAll.apply(t, ctx.group, True) for t in (query, key, value))
    gqa = q.shape[1] != k.shape[1]
    dropout = dropout if module.training else 0.0
    if ctx.sizes is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
    else:  # packed rows: causal attention inside each sample (split/cat, as packed_attention.py says why)
        rows = []
        for row_sizes, qr, kr, vr in zip(ctx.sizes, q.split(1), k.split(1), v.split(1)):
            rows.append(torch.cat([
                F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True,
                                               enable_gqa=gqa)
                for qs, ks, vs in zip(qr.split(row_sizes, 2), kr.split(row_sizes, 2), vr.split(row_sizes, 2))], dim=2))
        out = torch.cat(rows, dim=0)
    out = _SeqAllToAll.apply(out, ctx.group, False)
    return out.transpose(1, 2).contiguous(), None


class _SequenceParallelState:
    def __init__(self, group, size: int, rank: int, filler_ids: tuple[int, ...]):
        self.group, self.size, self.rank, self.filler_ids = group, size, rank, filler_ids
        self.context: SequenceParallelContext | None = None  # set by the model's pre-hook for one forward
        self.share_media = False  # in a split forward, before the language model: the tower runs on a share
        self.media_rows: list[int] = []  # the whole tower batch's rows of each tower call the projector gathers
        self.handles: list = []


def _filler_id(input_ids: torch.Tensor, media_ids: tuple[int, ...]) -> int:
    """A token id of the batch that is no image / video token (what the sequence is padded with)."""
    flat = input_ids.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    for media in media_ids:
        keep &= flat != media
    return int(flat[keep][0]) if bool(keep.any()) else 0


def _split_batch(state: _SequenceParallelState, module, args, kwargs):
    """Pre-hook of the Llava model: pad to a multiple of N, shift the labels on the whole row and keep this rank's
    slice of them, scale the token count, drop the (right-)padding mask; the language model's pre-hook splits."""
    state.context, state.share_media, state.media_rows = None, False, []
    labels, input_ids = kwargs.get("labels"), kwargs.get("input_ids")
    if not module.training or labels is None or kwargs.get("past_key_values") is not None:
        return None
    if input_ids is None or args:
        raise RuntimeError("sequence parallelism splits training forwards called with input_ids= and labels= keywords")
    mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None:
        if not is_right_padding(mask) or not bool((labels[~mask.bool()] == IGNORE_INDEX).all()):
            raise RuntimeError("sequence parallelism needs right-padded batches with -100 labels on the pads")
    n, (b, length) = state.size, input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(b, length)
    pad = -length % n
    if pad:
        input_ids = F.pad(input_ids, (0, pad), value=_filler_id(input_ids, state.filler_ids))
        labels = F.pad(labels, (0, pad), value=IGNORE_INDEX)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + torch.arange(1, pad + 1,
                                                                                     device=position_ids.device)], 1)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    shard = shifted.chunk(n, dim=1)[state.rank].contiguous()
    num_items = kwargs.get("num_items_in_batch")
    if num_items is None:  # the whole micro-batch's supervised count, from every slice
        num_items = (shard != IGNORE_INDEX).sum().to(torch.float32)
        dist.all_reduce(num_items, group=state.group)
    num_items = num_items / n  # gradients are averaged over ranks; a group's N slices must add up (see docstring)
    state.context = SequenceParallelContext(state.group, sample_sizes(position_ids, b))
    state.share_media = True
    return args, {**kwargs, "input_ids": input_ids, "labels": labels, "attention_mask": None,
                  "position_ids": position_ids, "shift_labels": shard, "num_items_in_batch": num_items}


def _split_sequence(state: _SequenceParallelState, module, args, kwargs):
    """Pre-hook of the language model: this rank's slice of the merged embeddings and of the position ids."""
    ctx, state.context, state.share_media = state.context, None, False
    if ctx is None:
        return None
    if state.media_rows:
        raise RuntimeError("sequence parallelism: the vision tower ran on this rank's share of the images, but no "
                           "projector call gathered the features")
    embeds, position_ids = kwargs["inputs_embeds"], kwargs["position_ids"]
    rank, n = state.rank, state.size
    # a copy, not a view: the whole row's embeddings are freed once the slice is taken
    return args, {**kwargs, "inputs_embeds": embeds.chunk(n, dim=1)[rank].clone(),
                  "position_ids": position_ids.chunk(n, dim=1)[rank], SP_KWARG: ctx}


def _tower_share(state: _SequenceParallelState, module, args, kwargs):
    """Pre-hook of the vision tower in a split forward: its input rows (images / crops / frames, dim 0), padded to
    ``N * c`` with copies of the last row, and this rank's ``c`` of them."""
    if not state.share_media:
        return None
    pixels = args[0] if args else kwargs["pixel_values"]
    rows, n = pixels.shape[0], state.size
    per_rank = -(-rows // n)
    if per_rank * n > rows:
        pixels = torch.cat([pixels, pixels[-1:].expand(per_rank * n - rows, *pixels.shape[1:])])
    share = pixels[state.rank * per_rank : (state.rank + 1) * per_rank]
    state.media_rows.append(rows)
    if args:
        return (share, *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": share}


def _gather_features(state: _SequenceParallelState, module, args, output):
    """Hook of the projector after a tower call on a share: every rank's projected rows, in order, the padding
    dropped."""
    if not state.media_rows:
        return None
    rows = state.media_rows.pop(0)
    if output.shape[0] != -(-rows // state.size):
        raise RuntimeError(f"sequence parallelism: the projector got {output.shape[0]} rows of the tower's share of "
                           f"{rows}, not the share")
    return _GatherRows.apply(output, state.group)[:rows]


def check_sequence_parallel(text_config, size: int, world_size: int) -> None:
    """Start-up refusals: N must divide the world size and the language model's query and key/value heads."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    if world_size % size:
        raise UsageValueError(f"--sequence_parallel_size {size} must divide the number of processes ({world_size})")
    if heads % size or kv_heads % size:
        raise UsageValueError(f"--sequence_parallel_size {size} must divide the language model's attention heads "
                              f"({heads}) and key/value heads ({kv_heads})")


def sequence_parallel_groups(size: int) -> tuple[object, int, int]:
    """Consecutive ranks form a group: returns (this rank's group, its rank in the group, its data-parallel rank).
    Every rank creates every group (``new_group`` is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine, rank % size, rank // size


def use_sequence_parallel(model, size: int) -> bool:
    """Split the (possibly PEFT-wrapped) Llava model's training forwards over groups of ``size`` ranks, or undo
    (``size`` <= 1: hooks removed, the language model back on ``sdpa``). Returns whether it is on."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    language_model = llava.model.language_model
    state: _SequenceParallelState | None = llava.__dict__.pop(_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        language_model.set_attn_implementation("sdpa")
        llava.config.text_config._attn_implementation = "sdpa"
    if size <= 1:
        return False
    if not dist.is_initialized():
        raise UsageValueError(f"--sequence_parallel_size {size} needs a multi-process launch (deepspeed / torchrun)")
    check_sequence_parallel(llava.config.text_config, size, dist.get_world_size())
    AttentionInterface.register(SP_SDPA, sp_attention_forward)
    AttentionMaskInterface.register(SP_SDPA, packed_sdpa_mask)  # no mask for split forwards; sdpa's otherwise
    group, rank, _ = sequence_parallel_groups(size)
    media = tuple(int(i) for i in (getattr(llava.config, "image_token_id", None),
                                   getattr(llava.config, "video_token_id", None)) if i is not None)
    state = _SequenceParallelState(group, size, rank, media)
    state.handles = [
        llava.register_forward_pre_hook(lambda m, a, k: _split_batch(state, m, a, k), with_kwargs=True, prepend=True),
        language_model.register_forward_pre_hook(lambda m, a, k: _split_sequence(state, m, a, k), with_kwargs=True),
        llava.model.vision_tower.register_forward_pre_hook(lambda m, a, k: _tower_share(state, m, a, k),
                                                           with_kwargs=True, prepend=True),
        llava.model.multi_modal_projector.register_forward_hook(lambda m, a, o: _gather_features(state, m, a, o)),
    ]
    language_model.set_attn_implementation(SP_SDPA)
    llava.config.text_config._attn_implementation = SP_SDPA
    llava.__dict__[_ATTR] = state
    return True


def data_parallel_rank_and_size(size: int) -> tuple[int, int]:
    """This process's data-parallel rank and the data-parallel size when groups of ``size`` ranks share a batch."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank // size, world // size


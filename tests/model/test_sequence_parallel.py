"""Sequence parallelism's model side (``llava/model/sequence_parallel.py``) in 2 processes (gloo) vs 1 without it.

Each rank builds the same tiny Llava (Llama LM, grouped-query heads 4 / 2 kv, CLIP tower), runs one training
forward + backward of a batch with images on its half of the sequence; the losses of the two ranks average to the
1-process loss, and the gradients, averaged over the ranks as DeepSpeed / DDP average them, equal the 1-process
gradients (fp32, <= 1e-5): padded (odd length, so the sequence is padded to a multiple of 2) and packed rows, the
supervised head and the stock loss. The vision side the same way on batches whose tower rows are odd in number:
Llava with 3 images, LlavaNext anyres crops, LlavaOnevision with an anyres image and 3 videos of 3 frames,
LlavaNextVideo with 3 videos, trainable and frozen towers; each rank's tower is counted to run on its half of the
rows (rounded up), where one process runs all of them. Plus the start-up refusals.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llava.constants import IGNORE_INDEX
from llava.errors import UsageValueError
from llava.model.sequence_parallel import check_sequence_parallel, use_sequence_parallel
from llava.model.supervised_head import use_supervised_head

VOCAB, IMAGE_TOKEN, VIDEO_TOKEN, N_IMAGE = 128, 127, 126, 16
ZERO2, ZERO3 = (str(Path(__file__).resolve().parents[2] / "zero_configs" / f"zero{s}.json") for s in (2, 3))  # CLIP 32 px / patch 8: 16 tokens per image


def build_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=IMAGE_TOKEN,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=N_IMAGE)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.config.use_cache = model.config.text_config.use_cache = False
    return model.train()


def batch(packed: bool) -> dict[str, torch.Tensor]:
    """Two rows of 75 tokens, an image in each; padded (row 1 ends in 9 pads) or packed (row 0: samples of 40 + 35)."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB - 1, (2, 75), generator=g)
    input_ids[:, 2 : 2 + N_IMAGE] = IMAGE_TOKEN
    labels = input_ids.clone()
    labels[:, : 2 + N_IMAGE] = IGNORE_INDEX
    labels[:, 30:34] = IGNORE_INDEX
    out = {"input_ids": input_ids, "labels": labels,
           "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
    if packed:
        position_ids = torch.arange(75).repeat(2, 1)
        position_ids[0, 40:] = torch.arange(35)
        labels[0, 40] = IGNORE_INDEX
        out["position_ids"] = position_ids
    else:
        mask = torch.ones(2, 75, dtype=torch.long)
        mask[1, 66:] = 0
        labels[1, 66:] = IGNORE_INDEX
        input_ids[1, 66:] = 0
        out["attention_mask"] = mask
    return out


def loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for packed in (False, True):
            for head in (True, False):
                model = build_model()
                use_supervised_head(model, head)
                assert use_sequence_parallel(model, 2)
                loss, grads = loss_and_grads(model, batch(packed))
                dist.all_reduce(loss)
                for g in grads.values():
                    dist.all_reduce(g)
                if rank == 0:
                    results[(packed, head)] = (loss / 2, {n: g / 2 for n, g in grads.items()})
                use_sequence_parallel(model, 1)
                assert model.config.text_config._attn_implementation == "sdpa"
    finally:
        dist.destroy_process_group()


def run_two_ranks(target=_rank) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(target, args=(port, results), nprocs=2, join=True)
        return dict(results)


def test_two_ranks_equal_one_process_padded_and_packed():
    results = run_two_ranks()
    assert len(results) == 4
    for (packed, head), (loss, grads) in results.items():
        model = build_model()
        use_supervised_head(model, head)
        inputs = batch(packed)
        if packed:  # the 1-process reference: stock sdpa over a packed row (transformers' block-diagonal mask)
            assert inputs["position_ids"][0, 40] == 0
        ref_loss, ref_grads = loss_and_grads(model, inputs)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5, msg=f"packed={packed} head={head}")
        assert set(grads) == set(ref_grads)
        assert any("vision_tower" in n for n in grads) and any("projector" in n for n in grads)
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5, msg=f"{name} packed={packed}")


GRID = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres pinpoints of the 32-px tower: up to 2 x 2 crops


def build_media_model(kind: str):
    """A tiny model of the family ``kind`` on build_model's language model and tower (seeded the same)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    if kind == "llava":
        return build_model()
    base = build_model().config
    common = dict(text_config=base.text_config.to_dict(), vision_config=base.vision_config.to_dict(),
                  image_token_index=IMAGE_TOKEN, vision_feature_select_strategy="default", vision_feature_layer=-1,
                  image_grid_pinpoints=GRID)
    if kind == "next":
        config, cls = LlavaNextConfig(**common, image_seq_length=N_IMAGE), LlavaNextForConditionalGeneration
    elif kind == "onevision":
        config = LlavaOnevisionConfig(**common, video_token_index=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9")
        cls = LlavaOnevisionForConditionalGeneration
    else:
        config = LlavaNextVideoConfig(**common, video_token_index=VIDEO_TOKEN, image_seq_length=N_IMAGE,
                                      spatial_pool_mode="average", spatial_pool_stride=2, video_seq_length=4)
        cls = LlavaNextVideoForConditionalGeneration
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config)
    model.config.use_cache = model.config.text_config.use_cache = False
    return model.train()


def media_batch(model, kind: str) -> dict[str, torch.Tensor]:
    """Two right-padded rows of 101 tokens (row 1 ends in 6 pads) holding the images / videos of ``kind``, as many
    image / video tokens as the model makes features for them (counted by its own feature functions)."""
    g = torch.Generator().manual_seed(3)
    pixels = {}
    if kind == "llava":  # 3 images: one in row 0, two in row 1
        pixels["pixel_values"] = torch.randn(3, 3, 32, 32, generator=g)
        rows = [[(IMAGE_TOKEN, N_IMAGE)], [(IMAGE_TOKEN, N_IMAGE), (IMAGE_TOKEN, N_IMAGE)]]
    else:
        videos = 0 if kind == "next" else 3  # 3 videos of 3 frames: one in row 0, two in row 1
        if videos:
            pixels["pixel_values_videos"] = torch.randn(videos, 3, 3, 32, 32, generator=g)
        if kind != "next_video":  # anyres images of two sizes: 3 + 2 crops (LlavaNext), one image of 3 (OneVision)
            sizes = [[30, 60], [20, 20]] if kind == "next" else [[30, 60]]
            pixels["pixel_values"] = torch.randn(len(sizes), 3, 3, 32, 32, generator=g)
            pixels["image_sizes"] = torch.tensor(sizes)
        with torch.no_grad():
            image = ([len(f) for f in model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"])
                      .pooler_output] if "pixel_values" in pixels else [])
            video = (model.model.get_video_features(pixels["pixel_values_videos"]).pooler_output.shape[1]
                     if videos else 0)
        spans = [(IMAGE_TOKEN, n) for n in image] + [(VIDEO_TOKEN, video)] * videos
        rows = [spans[:1] + spans[2:3], spans[1:2] + spans[3:]] if kind == "onevision" else [spans[:1], spans[1:]]
    length = 101
    input_ids = torch.randint(1, VIDEO_TOKEN - 1, (2, length), generator=g)
    labels = input_ids.clone()
    for r, row in enumerate(rows):
        at = 2
        for token, count in row:
            input_ids[r, at : at + count] = token
            labels[r, : at + count] = IGNORE_INDEX
            at += count + 3
        assert at < length - 8, (kind, at)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 6 :] = 0
    input_ids[1, length - 6 :] = 0
    labels[1, length - 6 :] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, **pixels}


MEDIA_CASES = [("llava", False), ("llava", True), ("next", False), ("onevision", False), ("onevision", True),
               ("next_video", False)]  # (family, frozen tower)


def media_loss_and_grads(kind: str, frozen: bool, sp: bool):
    """(loss, gradients, the rows of each tower call) of one forward + backward of ``media_batch``."""
    model = build_media_model(kind)
    model.model.vision_tower.requires_grad_(not frozen)
    inputs = media_batch(model, kind)
    rows = []
    handle = model.model.vision_tower.get_input_embeddings().register_forward_hook(  # the patch embedding
        lambda m, a, out: rows.append(out.shape[0]))
    if sp:
        assert use_sequence_parallel(model, 2)
    loss, grads = loss_and_grads(model, inputs)
    handle.remove()
    return loss, grads, rows


def _rank_media(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for kind, frozen in MEDIA_CASES:
            loss, grads, rows = media_loss_and_grads(kind, frozen, sp=True)
            dist.all_reduce(loss)
            for g in grads.values():
                dist.all_reduce(g)
            results[(kind, frozen, rank)] = rows
            if rank == 0:
                results[(kind, frozen)] = (loss / 2, {n: g / 2 for n, g in grads.items()})
    finally:
        dist.destroy_process_group()


def test_each_rank_encodes_its_share_of_the_images_and_frames():
    """Tower rows split over the 2 ranks (odd counts: the last share padded), the features gathered: the loss and
    every gradient (tower, projector, image_newline, LM) of the 2 ranks equal one process's."""
    results = run_two_ranks(_rank_media)
    for kind, frozen in MEDIA_CASES:
        case = f"{kind} frozen={frozen}"
        loss, grads = results[(kind, frozen)]
        ref_loss, ref_grads, ref_rows = media_loss_and_grads(kind, frozen, sp=False)
        assert any(n % 2 for n in ref_rows), (case, ref_rows)  # an odd number of tower rows in a call
        for rank in (0, 1):  # each rank's tower ran on its half, rounded up; one process on every row
            assert results[(kind, frozen, rank)] == [-(-n // 2) for n in ref_rows], (case, rank, ref_rows)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5, msg=case)
        assert set(grads) == set(ref_grads)
        assert any("projector" in n for n in grads)
        assert any("vision_tower" in n for n in grads) != frozen, case
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-5, msg=f"{name} {case}")


def test_refusals_name_the_flag():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(UsageValueError, match="--sequence_parallel_size 2 must divide the language model's attention"):
        check_sequence_parallel(config, 2, 2)
    with pytest.raises(UsageValueError, match=r"must divide the number of processes \(3\)"):
        check_sequence_parallel(LlamaConfig(num_attention_heads=4, num_key_value_heads=4), 2, 3)
    check_sequence_parallel(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), 2, 4)
    with pytest.raises(UsageValueError, match="needs a multi-process launch"):
        use_sequence_parallel(build_model(), 2)


@pytest.mark.parametrize(("extra", "message"), [
    ([], "does not support: no --deepspeed"),
    (["--deepspeed", ZERO3, "--training_stage", "dpo"], "does not support: --training_stage dpo"),
    (["--deepspeed", ZERO2, "--packing", "True", "--packing_attention", "mask"], "--packing_attention mask"),
    (["--deepspeed", ZERO2, "--attn_implementation", "eager"], "--attn_implementation must be sdpa, got eager"),
    (["--deepspeed", ZERO2, "--backend", "megatron"], r"--sequence_parallel_size \(Ulysses"),
])
def test_flag_refusals_are_one_line(extra, message):
    from llava.train.args import parse_args

    argv = ["--model_name_or_path", "m", "--vision_tower", "v", "--data_path", "d.json", "--output_dir", "o",
            "--sequence_parallel_size", "2", *extra]
    with pytest.raises(UsageValueError, match=message) as err:
        model_args, data_args, training_args, backend_args = parse_args(argv, with_backend=True)
        if backend_args.backend == "megatron":
            from llava.megatron.backend.megatron_args import check_megatron_combinations

            check_megatron_combinations(model_args, data_args, training_args, backend_args)
    assert "\n" not in str(err.value)

"""Per-rank vision-tower work of a video batch under sequence parallelism: every rank of a group encoding every
frame (the tower's work repeated on each rank) vs each rank its share, as training runs
(``llava/model/sequence_parallel.py``).

    PYTHONPATH=. python scripts/bench_sp_tower.py --frames 16 --sp 2

A LlavaOnevision of a tiny Llama language model (2 layers, width 64) and a trainable CLIP tower (``--image_size``,
``--patch``, ``--tower_width``, ``--tower_layers``), fp32, one training forward + backward of ``--videos`` videos of
``--frames`` frames (their pooled features, then 64 answer tokens) in one sequence-parallel group of ``--sp`` ranks
(gloo, one thread each). Two modes alternate ``--steps`` times in the same processes: ``all`` (the tower's share
hook passes every row through and the projector gathers nothing, so each rank encodes the whole batch) and ``share``
(each rank its ``ceil(rows / sp)``). Per rank and mode: the rows its tower encoded; the tower's and projector's
FLOPs of forward + backward (``torch.utils.flop_counter``, one extra step); the median seconds from the tower's call
to the projector's gathered output (forward) and of the whole step. Prints one JSON line per rank and mode, then
one with the ratios share / all (the slowest rank's seconds); the two modes' losses are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

VOCAB, IMAGE_TOKEN, VIDEO_TOKEN = 256, 255, 254


def build_model(args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=65536,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=args.tower_width, intermediate_size=4 * args.tower_width,
                              num_hidden_layers=args.tower_layers, num_attention_heads=max(1, args.tower_width // 64),
                              image_size=args.image_size, patch_size=args.patch)
    config = LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                  vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.config.use_cache = model.config.text_config.use_cache = False
    return model.train()


def build_batch(model, args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    videos = torch.randn(args.videos, args.frames, 3, args.image_size, args.image_size, generator=g)
    side = args.image_size // args.patch
    per_video = args.frames * ((side + 1) // 2) ** 2 + 1  # OneVision: bilinear pooling by 2, one newline per video
    ids = []
    for _ in range(args.videos):
        ids += [1, 2] + [VIDEO_TOKEN] * per_video
    ids += torch.randint(3, VIDEO_TOKEN - 1, (64,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    labels = input_ids.clone()
    labels[:, : len(ids) - 64] = -100
    return {"input_ids": input_ids, "labels": labels, "pixel_values_videos": videos}


def _rank(rank: int, port: int, args, results) -> None:
    import llava.model.sequence_parallel as sp_module
    from llava.model.sequence_parallel import use_sequence_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.sp)
    mode = {"share": True}
    share_hook = sp_module._tower_share  # the hooks call it by its module name: "all" passes every row through
    sp_module._tower_share = lambda *a: share_hook(*a) if mode["share"] else None
    model = build_model(args)
    data = build_batch(model, args)
    assert use_sequence_parallel(model, args.sp)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    rows, started, spans = [], [], []
    tower.get_input_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    tower.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
    projector.register_forward_hook(lambda m, a, out: spans.append(time.perf_counter() - started[-1]))
    dist.all_reduce(torch.zeros(1))  # gloo's buffers warmed up before anything is timed

    def step():
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(**data).loss
        loss.backward()
        return loss.item(), time.perf_counter() - t0

    out = {}
    for name in ("all", "share"):  # FLOPs by module, one step each (not timed)
        mode["share"] = name == "share"
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        counts = counter.get_flop_counts()
        flops = {part: sum(sum(v.values()) for k, v in counts.items() if k.endswith(f"model.{part}"))
                 for part in ("vision_tower", "multi_modal_projector")}
        out[name] = {"rank": rank, "mode": name, "tower_rows": rows[-1],
                     "tower_flops": flops["vision_tower"], "projector_flops": flops["multi_modal_projector"],
                     "step_s": [], "tower_fwd_s": []}
    for _ in range(args.steps):
        for name in ("all", "share"):
            mode["share"] = name == "share"
            loss, seconds = step()
            out[name]["loss"] = round(loss, 6)
            out[name]["step_s"].append(seconds)
            out[name]["tower_fwd_s"].append(spans[-1])
    for entry in out.values():
        entry["step_s"] = round(statistics.median(entry["step_s"]), 3)
        entry["tower_fwd_s"] = round(statistics.median(entry["tower_fwd_s"]), 3)
        results[(rank, entry["mode"])] = entry
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--tower_width", type=int, default=192)
    p.add_argument("--tower_layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (alternating)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, args, results), nprocs=args.sp, join=True)
        lines = [results[k] for k in sorted(results.keys(), key=lambda k: (k[1], k[0]))]
    for line in lines:
        print(json.dumps(line))
    by_mode = {m: [x for x in lines if x["mode"] == m] for m in ("all", "share")}
    ratio = {"frames": args.videos * args.frames, "sp": args.sp}
    for key in ("tower_rows", "tower_flops", "projector_flops", "tower_fwd_s", "step_s"):
        share, every = (max(x[key] for x in by_mode[m]) for m in ("share", "all"))
        ratio[f"{key}_share_over_all"] = round(share / every, 3)
    for m in ("all", "share"):  # a rank's loss is its slice's, times sp: their mean is the whole sequence's
        ratio[f"loss_{m}"] = round(sum(x["loss"] for x in by_mode[m]) / args.sp, 6)
    print(json.dumps(ratio))
    return [*lines, ratio]


if __name__ == "__main__":
    main()

"""Training throughput benchmark: variants of one run, interleaved step blocks, one JSON line and a table.

    PYTHONPATH=. python scripts/bench_train.py --workdir /tmp/bench_mix --variants padded,packed \
        --steps 12 --block 3 --batch_size 8 --workers 1 [--profile packed_mask,packed]

``--workdir`` is made by ``python -m llava.demo.synthetic_mix`` (or here, on first use, with ``--size small|tiny``):
a LLaVA-665K-like JSONL mix, its images, and the benchmark model. Each variant is the real training path
(``llava.train.train.build_trainer`` with the variant's flags added: ``Trainer.get_train_dataloader`` with its
sampler, DataLoader workers and collator; ``Trainer.training_step`` with ``num_items_in_batch``; grad clipping;
the optimizer and scheduler), driven one step at a time so that variants alternate in blocks of ``--block`` steps
(A B, then B A, ...): machine noise hits every variant alike, and the figure to quote is the ratio to the first
variant. ``--warmup`` steps per variant are run first and not counted.

Per variant: real (non-pad) tokens/s and samples/s over wall time (data wait included), real tokens per CPU-second
of the training steps (the work a step costs, robust when other jobs share the cores), padding fraction (pad
slots / all slots), median step time, data-wait fraction (time blocked on the DataLoader / wall), MFU (useful FLOPs,
formula in ``llava/train/throughput.py``, over wall time, against the measured fp32 matmul peak), mean loss.
Also per variant: time to first step (building its trainer -- model, data index, DataLoader -- plus its first step,
imports excluded) and a step's peak memory (the most any one step's resident memory rose above what was resident
before it: Linux ``VmHWM`` reset through ``/proc/self/clear_refs``). Peak RSS is the process's (all variants live in
one process: run one variant alone for its own figure). ``trl`` is TRL's ``SFTTrainer`` on the same model, data and
settings (``scripts/bench_trl.py``; needs the ``bench`` extra). With
``--profile A,B`` one more step of each named variant (``--profile_rounds`` steps, interleaved, median per
component) is profiled and split by component. ``--video_mix N`` adds N tiny clips (made with PyAV) to the mix and
trains every variant with the OneVision video recipe (``--frames_upbound --video_frames``, forced): packed vs padded
for a video mix; ``video_frames`` counts the frames each variant's steps decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from llava.train.args import parse_args
from llava.train.throughput import COMPONENTS, FlopCounts, matmul_peak_flops, profile_step_by_component, sample_lengths
from llava.train.train import build_trainer

ANYRES = ["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad",
          "--image_grid_pinpoints", "(1x1),...,(2x2)"]
VARIANTS = {  # name: extra training flags
    "padded": [],
    "grouped": ["--group_by_modality_length", "True"],
    # megabatch of 8 batches, as 8 GPUs would see (the bench steps the optimizer every batch regardless)
    "grouped_x8": ["--group_by_modality_length", "True", "--gradient_accumulation_steps", "8"],
    "packed": ["--packing", "True"],
    "packed_mask": ["--packing", "True", "--packing_attention", "mask"],
    "packed_grouped": ["--packing", "True", "--group_by_modality_length", "True"],
    # LLaVA-NeXT anyres on the same mix: each image a grid of tower crops + base view, tokens by image size
    "anyres_padded": ANYRES,
    "anyres_packed": [*ANYRES, "--packing", "True"],
    "padded_lora": ["--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32"],
    "packed_lora": ["--packing", "True", "--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32"],
    "padded_stock_head": ["--supervised_head", "False"],  # the stock LM head + loss over every position
    "packed_stock_head": ["--packing", "True", "--supervised_head", "False"],
    "padded_masked": ["--skip_padding_mask", "False"],  # stock SDPA: padding mask, key/value heads repeated
    "packed_stock_rope": ["--packing", "True", "--fused_rope", "False"],  # transformers' apply_rotary_pos_emb
    "padded_fused_adamw": ["--optim", "adamw_torch_fused"],  # AdamW as one fused kernel (the default is LLaVA's loop)
    "trl": [],  # TRL's SFTTrainer on the same model, data and settings (scripts/bench_trl.py; the `bench` extra)
}
# --video_mix N: N clips join the mix and every variant trains the OneVision video recipe (its images anyres_max)
VIDEO_FLAGS = ["--mm_newline_position", "one_token", "--mm_spatial_pool_mode", "bilinear", "--mm_spatial_pool_stride",
               "2", "--force_sample", "True", "--image_aspect_ratio", "anyres_max_2", "--mm_patch_merge_type",
               "spatial_unpad", "--image_grid_pinpoints", "(1x1),...,(2x2)"]


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _cpu_seconds() -> float:
    """CPU time of this process, every thread (the step's compute; DataLoader workers are other processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> int | None:
    """Resident KiB now, after resetting the process's peak (VmHWM) to it; None where Linux's clear_refs is missing."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


class VariantRun:
    """One variant's trainer, optimizer and DataLoader iterator, stepped on demand; keeps per-step records."""

    def __init__(self, name: str, argv: list[str], seed: int):
        self.name = name
        self.started = time.perf_counter()
        model_args, data_args, training_args = parse_args(argv)
        transformers.set_seed(seed)
        if name == "trl":
            from bench_trl import build_trl_trainer

            self.trainer, self.built = build_trl_trainer(model_args, data_args, training_args)
        else:
            self.trainer, self.built = build_trainer(model_args, data_args, training_args)
        self.pad_id = self.built.tokenizer.pad_token_id
        self.trainer.create_optimizer_and_scheduler(num_training_steps=training_args.max_steps)
        self.trainer.current_gradient_accumulation_steps = 1
        self.model = self.trainer.model
        self.model.train()
        self.counts = FlopCounts.of(self.model, self.built.num_image_tokens)
        self.loader = iter(self.trainer.get_train_dataloader())
        self.records: list[dict] = []
        self.first_step_s: float | None = None
        self.step_peak_kib = 0
        self.init_s = time.perf_counter() - self.started

    def next_batch(self):
        batches, num_items = self.trainer.get_batch_samples(self.loader, 1, self.trainer.args.device)
        if not batches:  # epoch over: a new pass over the data
            self.loader = iter(self.trainer.get_train_dataloader())
            batches, num_items = self.trainer.get_batch_samples(self.loader, 1, self.trainer.args.device)
        return batches[0], num_items

    def compute(self, batch, num_items) -> float:
        trainer = self.trainer
        loss = trainer.training_step(self.model, batch, num_items)
        if trainer.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        self.model.zero_grad(set_to_none=True)
        return float(loss)

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        batch, num_items = self.next_batch()
        t1 = time.perf_counter()
        lengths = sample_lengths(batch, self.pad_id)
        n_images = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
        if "image_sizes" in batch:  # anyres: the tower runs on every crop and the base view
            n_images = sum(self.built.layout.num_views(int(h), int(w)) for h, w in batch["image_sizes"].tolist())
        videos = batch.get("pixel_values_videos")
        n_frames = 0 if videos is None else videos.shape[0] * videos.shape[1]
        n_images += n_frames  # the tower runs on every sampled frame
        before = reset_peak_rss()
        cpu0 = _cpu_seconds()
        loss = self.compute(batch, num_items)
        t2 = time.perf_counter()
        cpu = _cpu_seconds() - cpu0
        if before is not None:  # memory the step itself took above what was resident before it
            self.step_peak_kib = max(self.step_peak_kib, (_status_kib("VmHWM") or before) - before)
        if self.first_step_s is None:  # building the trainer (model, data index, DataLoader) + the first step
            self.first_step_s = self.init_s + t2 - t0
        if record:
            self.records.append({"wait": t1 - t0, "wall": t2 - t0, "real": sum(lengths), "samples": len(lengths),
                                 "supervised": int((batch["labels"][..., 1:] != -100).sum()), "cpu": cpu,
                                 "frames": n_frames, "slots": batch["input_ids"].numel(), "loss": loss,
                                 "flops": self.counts.step_flops(lengths, n_images)})

    def summary(self, peak: float) -> dict:
        r = self.records
        wall = sum(x["wall"] for x in r)
        return {
            "steps": len(r),
            "real_tokens_per_s": round(sum(x["real"] for x in r) / wall, 1),
            "real_tokens_per_cpu_s": round(sum(x["real"] for x in r) / sum(x["cpu"] for x in r), 1),
            "samples_per_s": round(sum(x["samples"] for x in r) / wall, 3),
            "padding_fraction": round(1 - sum(x["real"] for x in r) / sum(x["slots"] for x in r), 4),
            "step_time_median_s": round(statistics.median(x["wall"] for x in r), 3),
            "data_wait_fraction": round(sum(x["wait"] for x in r) / wall, 4),
            "mfu": round(sum(x["flops"] for x in r) / wall / peak, 4),
            "mean_loss": round(statistics.fmean(x["loss"] for x in r), 4),
            "supervised_tokens": sum(x["supervised"] for x in r),
            "video_frames": sum(x["frames"] for x in r),
            "time_to_first_step_s": round(self.first_step_s, 2),
            "step_peak_mib": round(self.step_peak_kib / 1024, 1),
        }

    def profile(self) -> dict[str, float]:
        t0 = time.perf_counter()
        batch, num_items = self.next_batch()
        wait_ms = (time.perf_counter() - t0) * 1000
        table = profile_step_by_component(self.model, lambda: self.compute(batch, num_items))
        return {"data_wait": round(wait_ms, 1), **table}


def ensure_workdir(workdir: Path, size: str, n: int) -> dict[str, Path]:
    from llava.demo.synthetic_mix import generate_mix, write_bench_models

    if not (workdir / "mix.jsonl").is_file():
        generate_mix(workdir, n)
    llm, vision = workdir / "models" / f"{size}-llama", workdir / "models" / f"{size}-clip-vision"
    if not llm.is_dir():
        write_bench_models(workdir, workdir / "mix.jsonl", size=size)
    return {"data_path": workdir / "mix.jsonl", "image_folder": workdir / "images", "llm": llm, "vision_tower": vision}


def add_video_records(workdir: Path, n: int, frames: int, seed: int = 0) -> dict[str, Path]:
    """``n`` clips (a dot moving left or right, 12 to 40 frames of 64 px at 8 fps, encoded with PyAV) under
    ``workdir/videos`` and ``mix_video{n}.jsonl``: the mix's records and ``n`` video records (one to four turns of
    LLaVA-Video-like Q&A), shuffled together; made once."""
    import random

    from llava.demo.moving_dots import moving_dot_frames, write_clip

    out = workdir / f"mix_video{n}.jsonl"
    if out.is_file():
        return {"data_path": out, "video_folder": workdir / "videos"}
    rng = random.Random(f"bench-video-{seed}")
    records = [json.loads(line) for line in (workdir / "mix.jsonl").read_text().splitlines() if line]
    questions = [("Which way does the dot move?", "{d}"), ("Describe the video.", "A {c} dot moves to the {d} over "
                  "{n} frames on a light grey background; nothing else changes."), ("How many dots are there?", "one"),
                 ("What colour is the dot?", "It is {c} in every frame.")]
    for i in range(n):
        direction, colour = rng.choice((1, -1)), rng.choice(("red", "green", "blue"))
        rgb = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 230)}[colour]
        length = rng.randint(max(frames, 12), 40)
        rel = f"clip_{i:05d}.mp4"
        if not (workdir / "videos" / rel).is_file():
            write_clip(workdir / "videos" / rel, moving_dot_frames(length, direction, size=64, colour=rgb), fps=8)
        words = {"d": "right" if direction > 0 else "left", "c": colour, "n": length}
        turns = []
        for k, (q, a) in enumerate(rng.sample(questions, rng.randint(1, len(questions)))):
            turns += [{"from": "human", "value": f"<video>\n{q}" if k == 0 else q},
                      {"from": "gpt", "value": a.format(**words)}]
        records.append({"id": f"video_{i:05d}", "video": rel, "conversations": turns})
    rng.shuffle(records)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"data_path": out, "video_folder": workdir / "videos"}


def base_argv(paths: dict, args) -> list[str]:
    video = (["--video_folder", str(paths["video_folder"]), "--frames_upbound", str(args.video_frames), *VIDEO_FLAGS]
             if args.video_mix else [])
    return ["--model_name_or_path", str(paths["llm"]), "--vision_tower", str(paths["vision_tower"]),
            "--version", "vicuna_v1", "--data_path", str(paths["data_path"]), *video,
            "--image_folder", str(paths["image_folder"]), "--output_dir", str(Path(args.workdir) / "out"),
            "--per_device_train_batch_size", str(args.batch_size), "--model_max_length", str(args.model_max_length),
            "--dataloader_num_workers", str(args.workers), "--max_steps", str(args.warmup + args.steps + 1),
            "--learning_rate", "1e-4", "--report_to", "none", "--use_cpu", "True", "--seed", str(args.seed),
            "--save_strategy", "no", "--on_bad_sample", "skip", *args.extra.split()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--size", choices=("small", "issue", "tiny"), default="small", help="benchmark model (made if missing)")
    p.add_argument("--n", type=int, default=2000, help="records in the mix (made if missing)")
    p.add_argument("--variants", default="padded,packed", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=12, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--block", type=int, default=3, help="steps of one variant before switching")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--model_max_length", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video_mix", type=int, default=0, help="add this many clips (made if missing) to the mix and "
                   "train the OneVision video recipe (images anyres_max_2)")
    p.add_argument("--video_frames", type=int, default=8, help="--frames_upbound with --video_mix (forced)")
    p.add_argument("--extra", default="", help="more training flags for every variant, one string")
    p.add_argument("--profile", default="", help="comma-separated variants: profile steps of each by component")
    p.add_argument("--profile_rounds", type=int, default=1, help="profiled steps per variant, interleaved; median")
    args = p.parse_args(argv)
    paths = ensure_workdir(Path(args.workdir), args.size, args.n)
    if args.video_mix:
        paths.update(add_video_records(Path(args.workdir), args.video_mix, args.video_frames, args.seed))
    names = args.variants.split(",")
    load0 = os.getloadavg()[0]
    runs = [VariantRun(name, base_argv(paths, args) + VARIANTS[name], args.seed) for name in names]
    peak = matmul_peak_flops()
    for run in runs:
        for _ in range(args.warmup):
            run.step(record=False)
    done, flip = 0, False
    while done < args.steps:  # the matmul peak is re-measured every block: the best is the least-disturbed one
        peak = max(peak, matmul_peak_flops())
        block = min(args.block, args.steps - done)
        for run in reversed(runs) if flip else runs:
            for _ in range(block):
                run.step(record=True)
        done, flip = done + block, not flip
        print(f"bench: {done}/{args.steps} steps of every variant", file=sys.stderr, flush=True)
    result = {"bench": "train", "model": str(paths["llm"].name), "batch_size": args.batch_size,
              "video_mix": args.video_mix, "load_1min": {"start": load0, "end": os.getloadavg()[0]},
              "model_max_length": args.model_max_length, "workers": args.workers, "threads": torch.get_num_threads(),
              "matmul_peak_gflops": round(peak / 1e9, 1),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "variants": {run.name: run.summary(peak) for run in runs}}
    base = result["variants"][names[0]]
    result["ratios"] = {f"{n}/{names[0]}": {k: round(result["variants"][n][k] / base[k], 3) if base[k] else None
                                            for k in ("real_tokens_per_s", "real_tokens_per_cpu_s", "samples_per_s",
                                                      "step_time_median_s")}
                        for n in names[1:]}
    if args.profile:
        rounds = [{name: runs[names.index(name)].profile() for name in args.profile.split(",")}
                  for _ in range(args.profile_rounds)]
        result["profile_ms"] = {name: {c: statistics.median(r[name][c] for r in rounds) for c in rounds[0][name]}
                                for name in rounds[0]}
    print(json.dumps(result))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    cols = ("real_tokens_per_s", "samples_per_s", "padding_fraction", "step_time_median_s", "data_wait_fraction", "mfu",
            "mean_loss", "time_to_first_step_s", "step_peak_mib")
    print(f"{'variant':16}" + "".join(f"{c:>20}" for c in cols))
    for name, v in result["variants"].items():
        print(f"{name:16}" + "".join(f"{v[c]:>20}" for c in cols))
    for name, r in result["ratios"].items():
        print(f"{name}: real tokens/s x{r['real_tokens_per_s']}, per CPU-second x{r['real_tokens_per_cpu_s']}, "
              f"samples/s x{r['samples_per_s']}")
    print(f"matmul peak {result['matmul_peak_gflops']} GFLOP/s, peak RSS {result['peak_rss_mib']} MiB, load "
          f"{result['load_1min']['start']:.1f} -> {result['load_1min']['end']:.1f}"
          + (f", {result['video_mix']} clips in the mix" if result["video_mix"] else ""))
    for name, table in result.get("profile_ms", {}).items():
        total = sum(table.values())
        print(f"{'profile: ' + name:28}{'ms':>10}{'share':>8}")
        for c in ("data_wait", *COMPONENTS):
            print(f"  {c:26}{table[c]:>10}{table[c] / total:>8.1%}")


if __name__ == "__main__":
    main()

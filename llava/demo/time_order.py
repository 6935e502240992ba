"""A task where time matters: `llava demo --video True` trains the same tiny models on clips and on single frames of
the same clips, and compares held-out accuracy.

    llava demo --video True --workdir demo_video

Each clip (``FRAMES`` frames of ``SIZE`` px, encoded with PyAV) asks one of two questions whose answer is the order
of its frames:

    direction  "Which way does the dot move?"   left | right   (a green bar crossing the frame, edge to edge)
    order      "Which colour came first?"       red | blue     (a still dot that turns from one colour to the other)

A clip answering ``left`` (``blue``) is a clip answering ``right`` (``red``) played backwards, drawn from the same
random stream: the set of frames is the same for both answers, so any single frame (or any order-blind view of the
frames) scores 50%. The video model (LlavaOnevision, all frames) must beat the single-frame model (the same model
trained on one random frame per clip, repeated to the clip's length) by a clear margin; the video model on shuffled
frames or blank frames must stay at chance, and on reversed frames it answers the opposite (near 0%).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModel

from llava.data.video import frames_to_pixel_values
from llava.demo.moving_dots import write_clip
from llava.demo.tiny_models import write_tiny_llm, write_tiny_vision_tower
from llava.serve.eval import format_table, normalize_answer
from llava.serve.predict import END_OF_TURN_TOKENS, Predictor
from llava.train.train import train

SIZE = 32  # frame side (px): the tiny tower's input, so frames are never resized
FRAMES = 4  # frames per clip, all sampled (--frames_upbound 4 --force_sample True)
PATCH = 16  # the tower's patch: 2 x 2 features per frame, pooled to one token per frame (bilinear, stride 2)
DOT = 12  # the dot's side and the bar's width (px)
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 230)}
QUESTIONS = {
    "direction": ("Which way does the dot move?", ("right", "left")),  # (forward answer, backward answer)
    "order": ("Which colour came first?", ("red", "blue")),
}


def _frame(x: int, y: int, colour: tuple[int, int, int], height: int = DOT) -> np.ndarray:
    frame = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    frame[y: y + height, x: x + DOT] = colour
    return frame


def clip_frames(kind: str, backward: bool, rng: random.Random) -> list[np.ndarray]:
    """The frames of one clip: drawn forward (dot moving right; red then blue), reversed when ``backward``."""
    if kind == "direction":  # a green bar, top to bottom, from one edge to the other
        start, end = rng.randint(0, 2), rng.randint(SIZE - DOT - 2, SIZE - DOT)
        frames = [_frame(round(start + (end - start) * t / (FRAMES - 1)), 0, COLOURS["green"], SIZE)
                  for t in range(FRAMES)]
    elif kind == "order":
        x, y, switch = rng.randint(0, SIZE - DOT), rng.randint(1, SIZE - DOT - 1), FRAMES // 2
        frames = [_frame(x, y, COLOURS["red"] if t < switch else COLOURS["blue"]) for t in range(FRAMES)]
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return frames[::-1] if backward else frames


def _record(rid: str, video: str, kind: str, answer: str) -> dict:
    question = QUESTIONS[kind][0]
    return {"id": rid, "video": video, "question_type": kind, "conversations": [
        {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}


def generate_time_order_dataset(out_dir: str | Path, *, n_train: int = 480, n_heldout: int = 160, seed: int = 0,
                                fps: int = 4) -> dict[str, Path]:
    """Clips under ``out_dir/videos`` and three record files: ``train`` (clips), ``train_single`` (for each training
    clip, a still clip of one random frame of it, repeated) and ``heldout`` (new clips). Kinds and answers are
    balanced in every split. ``{"video_folder", "train", "train_single", "heldout"}``."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {"video_folder": out_dir / "videos"}
    splits: dict[str, list[dict]] = {"train": [], "train_single": [], "heldout": []}
    for split, n, stream in (("train", n_train, "train"), ("heldout", n_heldout, "heldout")):
        rng = random.Random(f"time-order-{stream}-{seed}")
        for i in range(n):
            kind = ("direction", "order")[i % 2]
            backward = (i // 2) % 2 == 1
            answer = QUESTIONS[kind][1][int(backward)]
            frames = clip_frames(kind, backward, rng)
            rel = f"{split}/clip_{i:05d}.mp4"
            write_clip(paths["video_folder"] / rel, frames, fps=fps)
            splits[split].append(_record(f"{split}-{i}", rel, kind, answer))
            if split == "train":
                still = f"still/clip_{i:05d}.mp4"
                write_clip(paths["video_folder"] / still, [frames[rng.randrange(FRAMES)]] * FRAMES, fps=fps)
                splits["train_single"].append(_record(f"single-{i}", still, kind, answer))
    for name, records in splits.items():
        random.Random(f"time-order-shuffle-{name}-{seed}").shuffle(records)
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(records, indent=1) + "\n")
    return paths


@dataclass
class VideoDemoConfig:
    n_train: int = 384
    n_heldout: int = 160
    epochs: float = 4
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


def _train_argv(models: dict, data: dict, records: Path, out: Path, cfg: VideoDemoConfig) -> list[str]:
    return ["--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
            "--version", "chatml", "--data_path", str(records), "--video_folder", str(data["video_folder"]),
            "--mm_newline_position", "one_token", "--mm_spatial_pool_mode", "bilinear",
            "--mm_spatial_pool_stride", "2", "--frames_upbound", str(FRAMES), "--force_sample", "True",
            "--image_aspect_ratio", "anyres_max_2", "--mm_patch_merge_type", "spatial_unpad",
            "--image_grid_pinpoints", "(1x1),...,(2x2)", "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--output_dir", str(out), "--num_train_epochs", str(cfg.epochs),
            "--per_device_train_batch_size", str(cfg.batch_size), "--learning_rate", str(cfg.lr),
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03", "--logging_steps", "10",
            "--save_strategy", "no", "--report_to", "none", "--model_max_length", "512", "--seed", str(cfg.seed),
            "--use_cpu", "True", "--dataloader_num_workers", "0"]


def _permutations() -> list[tuple[int, ...]]:
    """Every order of the frames but forward and backward: the set is closed under reversal, so order-based
    answers come out right and wrong equally often."""
    identity = tuple(range(FRAMES))
    return [p for p in itertools.permutations(identity) if p not in (identity, identity[::-1])]


@torch.no_grad()
def _answers(predictor: Predictor, prompts: list[list[int]], pixels: list[torch.Tensor], batch: int = 64) -> list[str]:
    """Greedy answers; prompts of one length go together (they are the same question: no padding needed)."""
    tokenizer = predictor.processor.tokenizer
    stop = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS
                                       if t in tokenizer.get_vocab()]
    out: list[str] = [""] * len(prompts)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(tuple(ids), []).append(i)
    for ids, members in groups.items():
        for start in range(0, len(members), batch):
            chunk = members[start: start + batch]
            input_ids = torch.tensor([list(ids)] * len(chunk))
            generated = predictor.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values_videos=torch.cat([pixels[i] for i in chunk]), max_new_tokens=4, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
            for i, row in zip(chunk, generated):
                out[i] = tokenizer.decode(row[len(ids):], skip_special_tokens=True).strip()
    return out


def evaluate_time_order(video_model: Path, single_model: Path, data: dict, seed: int = 0) -> dict[str, dict]:
    """Held-out accuracy per question kind for the video model on real, shuffled, reversed and blank frames, and for
    the single-frame model on one random frame of each clip (repeated, as it was trained)."""
    records = json.loads(Path(data["heldout"]).read_text())
    video, single = Predictor.load(video_model), Predictor.load(single_model)
    rng = random.Random(f"time-order-eval-{seed}")
    perms = _permutations()
    prompts, real = [], []  # both models share the tokenizer and the tower's processor: one prompt, one pixels
    for rec in records:
        ids, pixels = video.video_prompt(data["video_folder"], rec["video"], QUESTIONS[rec["question_type"]][0])
        prompts.append(ids)
        real.append(pixels)
    blank = video.video_prompt(data["video_folder"], records[0]["video"], "")[1].clone()
    white = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    blank[0] = frames_to_pixel_values([white] * FRAMES, video.processor.image_processor)
    conditions = {
        "video model, frames in order": (video, real),
        "video model, frames shuffled": (video, [p[:, list(rng.choice(perms))] for p in real]),
        "video model, frames reversed": (video, [p.flip(1) for p in real]),
        "video model, blank frames": (video, [blank] * len(real)),
        "single-frame model, one frame": (single, [p[:, [rng.randrange(FRAMES)] * FRAMES] for p in real]),
    }
    results = {}
    for name, (predictor, pixels) in conditions.items():
        answers = _answers(predictor, prompts, pixels)
        correct: dict[str, list[bool]] = {}
        for rec, answer in zip(records, answers):
            gold = rec["conversations"][-1]["value"]
            correct.setdefault(rec["question_type"], []).append(normalize_answer(answer) == normalize_answer(gold))
        acc = {kind: sum(v) / len(v) for kind, v in sorted(correct.items())}
        acc["overall"] = sum(sum(v) for v in correct.values()) / len(records)
        results[name] = {"accuracy": acc, "answers": answers}
    return results


def write_position_aware_tower(out_dir: Path, seed: int = 0, position_std: float = 0.3) -> Path:
    """The tiny CLIP tower (``SIZE`` px input, ``PATCH`` px patches) with its position embeddings drawn at
    ``position_std``, the scale of a patch's own embedding: CLIP's init (std 0.02) leaves a random tower's features
    nearly blind to where a patch is, which a trained tower is not; "which side is the dot on" needs it."""
    write_tiny_vision_tower(out_dir, image_size=SIZE, patch_size=PATCH, seed=seed)
    tower = CLIPVisionModel.from_pretrained(out_dir)
    positions = tower.base_model.embeddings.position_embedding.weight
    with torch.no_grad():
        positions.copy_(torch.randn(positions.shape, generator=torch.Generator().manual_seed(seed)) * position_std)
    tower.save_pretrained(out_dir)
    return out_dir


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def run_video_demo(workdir: str | Path, cfg: VideoDemoConfig | None = None) -> dict:
    """Generate the clips, train the video and the single-frame model from the same tiny models, evaluate, print
    the table and the cost; ``WORKDIR/video_demo_results.json`` holds both."""
    cfg = cfg or VideoDemoConfig()
    workdir = Path(workdir)
    wall0, cpu0, load0 = time.time(), _cpu_seconds(), os.getloadavg()[0]
    print("=== 1/4 drawing and encoding the clips (PyAV) ===", flush=True)
    data = generate_time_order_dataset(workdir / "data", n_train=cfg.n_train, n_heldout=cfg.n_heldout,
                                       seed=cfg.seed)
    print("=== 2/4 a tiny CLIP tower (32 px, 16 px patches) and a tiny Llama ===", flush=True)
    models = {"vision_tower": write_position_aware_tower(workdir / "models" / "tiny-clip-32", cfg.seed),
              "llm": write_tiny_llm(workdir / "models" / "tiny-llama",
                                    texts=[q for q, _ in QUESTIONS.values()] + [a for _, pair in QUESTIONS.values()
                                                                               for a in pair],
                                    vocab_size=512, seed=cfg.seed)}
    seconds = {}
    for name, records in (("video", data["train"]), ("single_frame", data["train_single"])):
        print(f"=== 3/4 training the {name.replace('_', '-')} model ===", flush=True)
        start = time.time()
        train(_train_argv(models, data, records, workdir / "out" / name, cfg))
        seconds[f"train {name}"] = time.time() - start
    print("=== 4/4 held-out accuracy ===", flush=True)
    start = time.time()
    results = evaluate_time_order(workdir / "out" / "video", workdir / "out" / "single_frame", data, cfg.seed)
    seconds["evaluate"] = time.time() - start
    rows = {name: r["accuracy"] for name, r in results.items()}
    cost = {"wall_s": time.time() - wall0, "cpu_s": _cpu_seconds() - cpu0, "load_start": load0,
            "load_end": os.getloadavg()[0], **{f"{k}_s": v for k, v in seconds.items()}}
    print(format_table(rows))
    print(f"chance: 50% (both questions are two-way, answers balanced); {len(rows)} conditions x {cfg.n_heldout} "
          f"held-out clips")
    print(f"cost: {cost['wall_s']:.0f} s wall, {cost['cpu_s']:.0f} CPU s, load {load0:.1f} -> {cost['load_end']:.1f}; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    summary = {"accuracy": rows, "cost": cost, "config": asdict(cfg)}
    (workdir / "video_demo_results.json").write_text(json.dumps(summary, indent=2))
    return summary

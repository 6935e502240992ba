"""A task where resolution matters: `llava demo --anyres True` trains the same tiny models with
``--image_aspect_ratio pad`` and ``anyres`` and compares held-out accuracy.

    llava demo --anyres True --workdir demo_anyres

Each image (128 or 192 px a side, multiples of the tiny tower's 64 px input) is filled with one fine pattern:
1-pixel ``horizontal`` stripes, ``vertical`` stripes, a 1-pixel ``checker`` board, or ``plain`` (the stripes' mean
grey). Brightness and contrast are random. Downscaled to the tower's 64 px (what ``pad`` feeds it, and anyres's base
view) every pattern averages to the same flat grey, so ``pad`` can only guess (25%); anyres's crops see the pixels.
Blank images must stay at chance for both.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from llava.demo.tiny_models import write_demo_models
from llava.serve.eval import evaluate, format_table
from llava.serve.predict import Predictor
from llava.train.train import train

PATTERNS = ("horizontal", "vertical", "checker", "plain")
SIDES = (128, 192)
QUESTION = "<image>\nWhat pattern fills the picture?"


def draw_pattern(pattern: str, height: int, width: int, rng: random.Random) -> Image.Image:
    """A ``height`` x ``width`` RGB image of ``pattern`` (1-pixel period 2), random mean and contrast."""
    mean, amp = rng.randint(90, 160), rng.randint(40, 80)
    ys, xs = np.mgrid[0:height, 0:width]
    phase = rng.randint(0, 1)
    if pattern == "horizontal":
        sign = (ys + phase) % 2
    elif pattern == "vertical":
        sign = (xs + phase) % 2
    elif pattern == "checker":
        sign = (xs + ys + phase) % 2
    else:
        sign = np.full((height, width), 0.5)
    grey = np.clip(mean + amp * (2 * sign - 1) / 2, 0, 255).astype(np.uint8)
    tint = np.array([rng.uniform(0.9, 1.1) for _ in range(3)])
    return Image.fromarray(np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8), "RGB")


def generate_fine_detail_dataset(out_dir: str | Path, *, n_train: int = 800, n_heldout: int = 200, seed: int = 0
                                 ) -> dict[str, Path]:
    """``{"image_folder", "train", "heldout_qa"}``: one question per image, patterns balanced, sizes random."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"image_folder": out_dir}
    for split, n, offset in (("train", n_train, 0), ("heldout_qa", n_heldout, 10**6)):
        rng = random.Random(seed + offset)
        records = []
        for i in range(n):
            pattern = PATTERNS[i % len(PATTERNS)]
            height, width = rng.choice(SIDES), rng.choice(SIDES)
            name = f"images/{split}_{i:05d}.png"
            draw_pattern(pattern, height, width, rng).save(out_dir / name)
            records.append({"id": f"{split}-{i}", "image": name, "question_type": "pattern", "conversations": [
                {"from": "human", "value": QUESTION}, {"from": "gpt", "value": pattern}]})
        rng.shuffle(records)
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1) + "\n")
    return paths


@dataclass
class AnyresDemoConfig:
    n_train: int = 400
    n_heldout: int = 120
    epochs: float = 4
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0


def run_anyres_demo(workdir: str | Path, cfg: AnyresDemoConfig | None = None) -> dict:
    """Train pad and anyres on the fine-detail data from the same tiny models; held-out accuracy, real and blank."""

    cfg = cfg or AnyresDemoConfig()
    workdir = Path(workdir)
    data = generate_fine_detail_dataset(workdir / "data", n_train=cfg.n_train, n_heldout=cfg.n_heldout, seed=cfg.seed)
    models = write_demo_models(workdir, data, seed=cfg.seed)
    results: dict = {}
    for mode in ("pad", "anyres"):
        layout = (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad",
                   "--image_grid_pinpoints", "(1x1),...,(3x3)"] if mode == "anyres" else ["--image_aspect_ratio", "pad"])
        out = workdir / "out" / mode
        start = time.time()
        trainer = train(["--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
                         "--version", "vicuna_v1", "--data_path", str(data["train"]),
                         "--image_folder", str(data["image_folder"]), *layout, "--output_dir", str(out),
                         "--num_train_epochs", str(cfg.epochs), "--per_device_train_batch_size", str(cfg.batch_size),
                         "--learning_rate", str(cfg.lr), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03",
                         "--logging_steps", "20", "--save_strategy", "no", "--report_to", "none",
                         "--model_max_length", "512", "--seed", str(cfg.seed), "--use_cpu", "True"])
        seconds = time.time() - start
        lengths = trainer.train_dataset.lengths
        predictor = Predictor.load(out)
        rows = {
            f"{mode}: real images": evaluate(predictor, str(data["heldout_qa"]), str(data["image_folder"]),
                                             show_progress=False).accuracy(),
            f"{mode}: blank images": evaluate(predictor, str(data["heldout_qa"]), str(data["image_folder"]),
                                              blank_images=True, show_progress=False).accuracy(),
        }
        results[mode] = {"accuracy": rows, "seconds_per_step": seconds / max(1, trainer.state.global_step),
                         "tokens_per_sample": sum(lengths) / len(lengths)}
    table = format_table({k: v for mode in results.values() for k, v in mode["accuracy"].items()})
    print(table)
    for mode, r in results.items():
        print(f"{mode}: {r['seconds_per_step']:.2f} s/step, {r['tokens_per_sample']:.0f} tokens/sample")
    (workdir / "anyres_demo_results.json").write_text(json.dumps(results, indent=2))
    return results

"""`llava demo --dpo True`: preference tuning where it matters, on the shapes data (a few minutes on a 2-core CPU).

    llava demo --dpo True --workdir dpo_demo

1. the shapes dataset and the tiny models (as `llava demo`); stage 1 aligns the projector on captions;
2. SFT on colour questions answered with the right colour, in lower case half of the time and in upper case
   otherwise ("red" / "RED"): the model learns both styles about equally, so on held-out images the pairwise
   accuracy (log p(lower) > log p(upper)) sits near 50% and greedy answers mix the two styles;
3. DPO from that SFT checkpoint on pairs of the training images (chosen = lower case, rejected = upper case);
4. held-out table, SFT vs DPO: pairwise accuracy, greedy answers in lower / upper case, and the cost.

Not yet the demo the issue asks for (held-out pairwise accuracy from ~50% to >= 90% with greedy answers changed):
a first version preferred the right colour over the next one in the cycle, and with the few stage-1 steps it ran,
the tiny tower did not tell colours apart (one colour whatever the image); in this style version the upper-case
answer is several tokens, so SFT already ranks lower case first, and the DPO settings tried broke greedy answers.
Both need longer runs or other settings than were tried; the figures are in the issue's report.

Every step runs the project's real path (``llava.train.train.train`` with command-line flags; the pairwise accuracy
from ``llava/model/preference_forward.py``'s answer log-probs, greedy answers from ``llava/serve/predict.py``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from llava.data.preference import DataCollatorForPreference, PreferenceDataset
from llava.data.records import Message
from llava.data.templates import get_template
from llava.demo.shapes import generate_shapes_dataset
from llava.demo.tiny_models import write_demo_models
from llava.model.builder import build_llava_model, set_use_cache
from llava.model.model_args import ModelArguments
from llava.model.preference_forward import answer_logps, use_preference_forward
from llava.run_dir import PROJECTOR_FILE
from llava.serve.predict import Predictor
from llava.train.train import train

PROMPT = "What colour are the shapes?"
COLOUR_CYCLE = ("red", "green", "blue", "yellow")


def caption_colour(caption: str) -> str:
    """The colour word of a shapes caption ("two red circles on the left" -> "red")."""
    return next(w for w in caption.split() if w in COLOUR_CYCLE)


def write_demo_sets(data: dict, out: Path, seed: int) -> dict[str, Path]:
    """Mixed-answer SFT records, DPO pairs over the same training images, held-out pairs over held-out images."""
    rng = random.Random(seed)
    captions = json.loads(Path(data["stage1_captions"]).read_text())
    train_images = [(r["image"], caption_colour(r["conversations"][1]["value"])) for r in captions]
    heldout = [(r["image"], r["conversations"][1]["value"]) for r in json.loads(Path(data["heldout_qa"]).read_text())
               if r.get("question_type") == "colour"]
    sft = [{"id": f"sft{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + PROMPT},
        {"from": "gpt", "value": colour if rng.random() < 0.5 else colour.upper()}]}
        for i, (image, colour) in enumerate(train_images)]

    def pairs(items, tag):
        return [{"id": f"{tag}{i}", "image": image, "prompt": PROMPT, "chosen": colour, "rejected": colour.upper()}
                for i, (image, colour) in enumerate(items)]

    paths = {"sft": out / "sft_mixed.json", "pairs": out / "dpo_pairs.json", "heldout_pairs": out / "heldout_pairs.json"}
    paths["sft"].write_text(json.dumps(sft))
    paths["pairs"].write_text(json.dumps(pairs(train_images, "pair")))
    paths["heldout_pairs"].write_text(json.dumps(pairs(heldout, "heldout")))
    return paths


def pairwise_and_greedy(model_dir: Path, heldout_pairs: Path, image_folder: str) -> dict[str, float]:
    """Held-out pairwise accuracy (summed answer log-probs, chosen > rejected) and greedy answers in each style."""
    built = build_llava_model(ModelArguments(model_name_or_path=str(model_dir)))
    model = built.model.eval()
    set_use_cache(model, False)
    use_preference_forward(model)
    dataset = PreferenceDataset(heldout_pairs, built.tokenizer, template=get_template("vicuna_v1"),
                                image_processor=built.image_processor, image_folder=image_folder,
                                image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                                model_max_length=256, image_aspect_ratio="pad", show_progress=False)
    collate = DataCollatorForPreference(built.tokenizer.pad_token_id)
    wins = 0
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            batch = collate([dataset[i] for i in range(start, min(start + 16, len(dataset)))])
            chosen, rejected = answer_logps(model, batch)[0].chunk(2)
            wins += int((chosen > rejected).sum())
    predictor = Predictor.load(model_dir)
    lower = upper = right = 0
    records = json.loads(Path(heldout_pairs).read_text())
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        images = [[Image.open(Path(image_folder) / r["image"]).convert("RGB")] for r in chunk]
        said = predictor.generate([[Message("user", "<image>\n" + PROMPT)]] * len(chunk), images, max_new_tokens=4)
        for r, text in zip(chunk, said):
            text = text.strip().rstrip(".")
            lower += text.isalpha() and text.islower()
            upper += text.isalpha() and text.isupper()
            right += text.lower() == r["chosen"]
    n = len(records)
    return {"pairwise accuracy": wins / len(dataset), "greedy lower case": lower / n, "greedy upper case": upper / n,
            "greedy right colour": right / n}


def run_dpo_demo(workdir: str | Path, *, n_caption: int = 600, n_heldout: int = 400, sft_epochs: float = 6,
                 dpo_epochs: float = 2, batch_size: int = 16, seed: int = 0, stage1: bool = True) -> dict:
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    t0 = time.time()
    print("\n=== 1/4 data, tiny models, stage 1 (projector on captions) ===", flush=True)
    data = generate_shapes_dataset(workdir / "data", n_caption=n_caption, n_qa=64, n_heldout=n_heldout, seed=seed)
    models = write_demo_models(workdir, data, seed=seed)
    sets = write_demo_sets(data, workdir / "data", seed)
    common = ["--image_folder", str(data["image_folder"]), "--model_max_length", "256",
              "--per_device_train_batch_size", str(batch_size), "--logging_steps", "10", "--save_strategy", "no",
              "--report_to", "none", "--seed", str(seed), "--use_cpu", "True", "--dataloader_num_workers", "0",
              "--image_aspect_ratio", "pad"]
    stage1_dir = workdir / "out" / "pretrain"
    if stage1:
        train(common + ["--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
                        "--version", "plain", "--data_path", str(data["stage1_captions"]), "--tune_mm_mlp_adapter",
                        "True", "--num_train_epochs", "1", "--learning_rate", "1e-3", "--output_dir", str(stage1_dir)])
    timings["stage 1 s"] = time.time() - t0
    print("\n=== 2/4 SFT on mixed answers (lower case half of the time, upper case otherwise) ===", flush=True)
    t = time.time()
    sft = workdir / "out" / "sft_mixed"
    train(common + ["--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
                    "--version", "vicuna_v1", "--data_path", str(sets["sft"]),
                    *(["--pretrain_mm_mlp_adapter", str(stage1_dir / PROJECTOR_FILE)] if stage1 else []),
                    "--num_train_epochs", str(sft_epochs),
                    "--learning_rate", "1e-3", "--output_dir", str(sft)])
    timings["SFT s"] = time.time() - t
    print("\n=== 3/4 DPO: chosen = lower case, rejected = upper case ===", flush=True)
    t = time.time()
    dpo = workdir / "out" / "dpo"
    train(common + ["--model_name_or_path", str(sft), "--version", "vicuna_v1", "--data_path", str(sets["pairs"]),
                    "--training_stage", "dpo", "--beta", "0.1", "--dpo_alpha", "1.0", "--gamma", "0",
                    "--num_train_epochs", str(dpo_epochs), "--learning_rate", "2e-4", "--output_dir", str(dpo)])
    timings["DPO s"] = time.time() - t
    print("\n=== 4/4 held-out: SFT vs DPO ===", flush=True)
    rows = {name: pairwise_and_greedy(path, sets["heldout_pairs"], str(data["image_folder"]))
            for name, path in (("SFT (mixed answers)", sft), ("DPO", dpo))}
    timings["total s"] = time.time() - t0
    print(format_dpo_table(rows))
    print("cost: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    result = {"held_out": rows, "pairs": len(json.loads(Path(sets["heldout_pairs"]).read_text())), "seconds": timings}
    (workdir / "dpo_demo_results.json").write_text(json.dumps(result, indent=2))
    return result


def format_dpo_table(rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1%}" for v in row.values()) + " |" for name, row in rows.items()]
    return "\n".join(lines)

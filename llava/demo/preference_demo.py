"""`llava demo --dpo True`: preference tuning where it matters, on the shapes data (~3 minutes on a busy 2-core CPU).

    llava demo --dpo True --workdir dpo_demo

Each question about an image carries an instruction, "Answer in lower case." or "Answer with a capital letter.",
and has two answers, ``red`` and ``Red``: one token each (checked), so a pair differs in that token alone.

1. the shapes dataset and the tiny models (as `llava demo`; the tokenizer is trained on the SFT texts);
2. SFT on records whose answer case ignores the instruction: under each instruction, half of the answers are lower
   case and half capitalised. The SFT model cannot learn which case an instruction asks for, so whichever way it
   leans, it leans so under both: on held-out images asked with both instructions, the pairwise accuracy
   (log p(the case asked for) > log p(the other)) is 50% by construction;
3. DPO from that SFT checkpoint on pairs over the training images (chosen = the case the instruction asks for,
   rejected = the other): LLaVA-NeXT's objective with beta 0.1, gamma 0.2, and (``controls``) the same run with
   DPO alone (gamma 0) and with the SFT term alone (dpo_alpha 0);
4. held-out table: pairwise accuracy (all pairs and per instruction), the mean log-prob margin, how often greedy
   answers follow the instruction, a few greedy answers, the DPO training curves, and the cost.

Measured (docs/dpo.md, 200 held-out pairs): SFT 50% pairwise, greedy following the instruction 29%; DPO 100% and
100%; DPO alone also 100% pairwise but greedy collapses under "lower case" (likelihood displacement); the SFT term
alone 100% with half DPO's margin. The colour in both answers is the image's; no stage 1 runs, and the colour
is not what is measured. Earlier versions of this demo (right vs next colour; lower vs UPPER case) stalled for
reasons docs/dpo.md gives.

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
from transformers import AutoTokenizer

from llava.data.preference import DataCollatorForPreference, PreferenceDataset
from llava.data.records import Message
from llava.data.templates import get_template
from llava.demo.shapes import COLOURS, generate_shapes_dataset
from llava.demo.tiny_models import write_demo_models
from llava.model.builder import build_llava_model, set_use_cache
from llava.model.model_args import ModelArguments
from llava.model.preference_forward import answer_logps, use_preference_forward
from llava.serve.predict import Predictor
from llava.train.train import train

QUESTION = "What colour are the shapes?"
INSTRUCTIONS = {"lower": "Answer in lower case.", "capital": "Answer with a capital letter."}
CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def answer_in(form: str, colour: str) -> str:
    """``red`` or ``Red``: one token each (checked), so the pair differs in that token only."""
    return colour if form == "lower" else colour.capitalize()


def prompt_for(form: str) -> str:
    return f"{QUESTION} {INSTRUCTIONS[form]}"


def answer_form(text: str) -> str:
    """``lower``, ``capital`` or ``other``: the form of a greedy answer (one word)."""
    text = text.strip()
    if not text.isalpha():
        return "other"
    return "lower" if text.islower() else "capital" if text[0].isupper() and text[1:].islower() else "other"


def caption_colour(caption: str) -> str:
    """The colour word of a shapes caption ("two red circles on the left" -> "red")."""
    return next(w for w in caption.split() if w in COLOURS)


def _balanced_forms(rng: random.Random, n: int) -> list[str]:
    forms = ["lower", "capital"] * (n // 2) + ["lower"] * (n % 2)
    rng.shuffle(forms)
    return forms


def write_demo_sets(data: dict, out: Path, seed: int) -> dict[str, Path]:
    """SFT records (answer form independent of the instruction), DPO pairs over the same training images, held-out
    pairs (each held-out image asked with both instructions)."""
    rng = random.Random(f"dpo-demo-{seed}")
    captions = json.loads(Path(data["stage1_captions"]).read_text())
    train_images = [(r["image"], caption_colour(r["conversations"][1]["value"])) for r in captions]
    heldout = [(r["image"], r["conversations"][1]["value"]) for r in json.loads(Path(data["heldout_qa"]).read_text())
               if r.get("question_type") == "colour"]
    asked = _balanced_forms(rng, len(train_images))  # the instruction of each training image
    given = {form: iter(_balanced_forms(rng, asked.count(form))) for form in INSTRUCTIONS}  # per instruction: 50/50
    sft = [{"id": f"sft{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + prompt_for(form)},
        {"from": "gpt", "value": answer_in(next(given[form]), colour)}]}
        for i, ((image, colour), form) in enumerate(zip(train_images, asked))]

    def pair(tag: str, image: str, colour: str, form: str) -> dict:
        other = "capital" if form == "lower" else "lower"
        return {"id": tag, "image": image, "prompt": prompt_for(form), "chosen": answer_in(form, colour),
                "rejected": answer_in(other, colour), "asked": form}

    pairs = [pair(f"pair{i}", image, colour, form) for i, ((image, colour), form) in enumerate(zip(train_images, asked))]
    held = [pair(f"heldout{i}_{form}", image, colour, form)
            for i, (image, colour) in enumerate(heldout) for form in INSTRUCTIONS]
    paths = {"sft": out / "sft_any_form.json", "pairs": out / "dpo_pairs.json", "heldout_pairs": out / "heldout_pairs.json"}
    for name, records in (("sft", sft), ("pairs", pairs), ("heldout_pairs", held)):
        paths[name].write_text(json.dumps(records))
    return paths


def pairwise_and_greedy(model_dir: Path, heldout_pairs: Path, image_folder: str, n_examples: int = 4) -> dict:
    """Held-out pairwise accuracy (summed answer log-probs, chosen > rejected; all pairs and per instruction), the
    share of greedy answers in the form asked for, and the first ``n_examples`` greedy answers."""
    built = build_llava_model(ModelArguments(model_name_or_path=str(model_dir)))
    model = built.model.eval()
    set_use_cache(model, False)
    use_preference_forward(model)
    dataset = PreferenceDataset(heldout_pairs, built.tokenizer, template=get_template("vicuna_v1"),
                                image_processor=built.image_processor, image_folder=image_folder,
                                image_token_id=built.image_token_id, num_image_tokens=built.num_image_tokens,
                                model_max_length=256, image_aspect_ratio="pad", show_progress=False)
    records = json.loads(Path(heldout_pairs).read_text())
    by_id = {r["id"]: r for r in records}
    collate = DataCollatorForPreference(built.tokenizer.pad_token_id)
    wins, margins = {form: [] for form in INSTRUCTIONS}, []
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            idx = range(start, min(start + 32, len(dataset)))
            chosen, rejected = answer_logps(model, collate([dataset[i] for i in idx]))[0].chunk(2)
            margins += (chosen - rejected).tolist()
            for i, win in zip(idx, (chosen > rejected).tolist()):
                wins[by_id[dataset.record(i).id]["asked"]].append(win)
    predictor = Predictor.load(model_dir)
    followed, said_forms, examples = 0, {form: 0 for form in (*INSTRUCTIONS, "other")}, []
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        images = [[Image.open(Path(image_folder) / r["image"]).convert("RGB")] for r in chunk]
        said = predictor.generate([[Message("user", "<image>\n" + r["prompt"])] for r in chunk], images,
                                  max_new_tokens=16)
        for r, text in zip(chunk, said):
            form = answer_form(text)
            said_forms[form] += 1
            followed += form == r["asked"]
            if len(examples) < n_examples:
                examples.append({"prompt": r["prompt"], "image colour": r["chosen"].lower(),
                                 "greedy": text})
    n_all = sum(map(len, wins.values()))
    row = {"pairwise accuracy": sum(map(sum, wins.values())) / n_all}
    row.update({f"pairwise, {form} asked": sum(w) / max(1, len(w)) for form, w in wins.items()})
    row["mean margin (nats)"] = sum(margins) / len(margins)
    row["greedy follows instruction"] = followed / len(records)
    row.update({f"greedy says {form}": n / len(records) for form, n in said_forms.items()})
    return {"row": row, "examples": examples}


def demo_flags(data: dict, batch_size: int, seed: int) -> list[str]:
    return ["--image_folder", str(data["image_folder"]), "--model_max_length", "256", "--version", "vicuna_v1",
            "--per_device_train_batch_size", str(batch_size), "--logging_steps", "4", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(seed), "--use_cpu", "True", "--dataloader_num_workers", "0",
            "--image_aspect_ratio", "pad", "--disable_tqdm", "True"]


# the DPO runs from the SFT checkpoint: LLaVA-NeXT's objective dpo_alpha * DPO + gamma * SFT(chosen); the first is
# the demo, the others the controls (DPO alone: dpo_ov7b.sh's gamma 0; the SFT term alone: what DPO adds to it)
VARIANTS: dict[str, dict[str, float]] = {
    "DPO (beta 0.1, gamma 0.2)": {"dpo_alpha": 1.0, "gamma": 0.2},
    "control: DPO alone (gamma 0)": {"dpo_alpha": 1.0, "gamma": 0.0},
    "control: SFT term alone (dpo_alpha 0)": {"dpo_alpha": 0.0, "gamma": 0.2},
}


def run_dpo_demo(workdir: str | Path, *, n_train: int = 256, n_heldout: int = 100, sft_epochs: float = 5,
                 dpo_epochs: float = 3, batch_size: int = 16, sft_lr: float = 1e-3, dpo_lr: float = 5e-4,
                 beta: float = 0.1, seed: int = 0, controls: bool = True, quiet: bool = False) -> dict:
    """The demo; ``n_train`` training images (SFT records and DPO pairs), ``n_heldout`` held-out images (each
    asked with both instructions); ``controls``: also the two control runs of :data:`VARIANTS`. Returns (and writes
    to ``dpo_demo_results.json``) the table, greedy examples, DPO curves and timings."""
    workdir = Path(workdir)
    say = (lambda *_: None) if quiet else (lambda text: print(text, flush=True))
    timings: dict[str, float] = {}
    t0 = time.time()
    say("\n=== 1/4 data and tiny models ===")
    data = generate_shapes_dataset(workdir / "data", n_caption=n_train, n_qa=4, n_heldout=4 * n_heldout, seed=seed)
    sets = write_demo_sets(data, workdir / "data", seed)
    models = write_demo_models(workdir, [sets["sft"]], seed=seed)
    check_single_token_answers(models["llm"])
    common = demo_flags(data, batch_size, seed)
    timings["data + models s"] = time.time() - t0
    say("\n=== 2/4 SFT: each instruction answered half in lower case, half capitalised ===")
    t = time.time()
    runs = {"SFT (form ignores the instruction)": workdir / "out" / "sft_any_form"}
    train(common + ["--model_name_or_path", str(models["llm"]), "--vision_tower", str(models["vision_tower"]),
                    "--data_path", str(sets["sft"]), "--num_train_epochs", str(sft_epochs),
                    "--learning_rate", str(sft_lr), "--output_dir", str(runs["SFT (form ignores the instruction)"])])
    timings["SFT s"] = time.time() - t
    curves = {}
    for k, (name, weights) in enumerate(list(VARIANTS.items())[: None if controls else 1]):
        say(f"\n=== 3/4 {name}: chosen = the form the instruction asks for, rejected = the other ===")
        t = time.time()
        runs[name] = workdir / "out" / f"dpo{k}"
        trainer = train(common + ["--model_name_or_path", str(runs["SFT (form ignores the instruction)"]),
                                  "--data_path", str(sets["pairs"]), "--training_stage", "dpo", "--beta", str(beta),
                                  "--dpo_alpha", str(weights["dpo_alpha"]), "--gamma", str(weights["gamma"]),
                                  "--num_train_epochs", str(dpo_epochs), "--learning_rate", str(dpo_lr),
                                  "--output_dir", str(runs[name])])
        timings[f"{name} s"] = time.time() - t
        curves[name] = [{key: log[key] for key in ("step", *CURVE_KEYS) if key in log}
                        for log in trainer.state.log_history if "rewards/accuracies" in log]
    say("\n=== 4/4 held-out: SFT vs DPO ===")
    t = time.time()
    results = {name: pairwise_and_greedy(path, sets["heldout_pairs"], str(data["image_folder"]))
               for name, path in runs.items()}
    timings["evaluation s"] = time.time() - t
    timings["total s"] = time.time() - t0
    rows = {name: r["row"] for name, r in results.items()}
    examples = {name: r["examples"] for name, r in results.items()}
    say(format_dpo_table(rows))
    say(format_examples(examples))
    for name, curve in curves.items():
        say(f"{name} curve: " + "; ".join(", ".join(f"{k} {v:.3g}" for k, v in point.items()) for point in curve))
    say("cost: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    result = {"held_out": rows, "examples": examples, "pairs": len(json.loads(Path(sets["heldout_pairs"]).read_text())),
              "dpo_curves": curves, "seconds": timings}
    (workdir / "dpo_demo_results.json").write_text(json.dumps(result, indent=2))
    return result


def check_single_token_answers(llm_dir: Path) -> None:
    """Each answer (" red", " Red", ...) is one token of the demo tokenizer, so a pair differs in one token only
    (an answer of several tokens would be ranked lower by its length alone)."""
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    longer = [word for colour in COLOURS for form in INSTRUCTIONS for word in [answer_in(form, colour)]
              if len(tokenizer.tokenize(" " + word)) != 1]
    if longer:
        raise RuntimeError(f"the demo tokenizer splits the answers {longer}: the pairs would differ in length")


def format_dpo_table(rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" if "margin" in col else f"{v:.1%}" for col, v in row.items())
              + " |" for name, row in rows.items()]
    return "\n".join(lines)


def format_examples(examples: dict[str, list[dict]]) -> str:
    names = list(examples)
    lines = ["| prompt | image colour | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, first in enumerate(examples[names[0]]):
        said = " | ".join(repr(examples[name][i]["greedy"]) for name in names)
        lines.append(f"| {first['prompt']} | {first['image colour']} | {said} |")
    return "\n".join(lines)

"""Exact-match accuracy of a Llava checkpoint on held-out LLaVA records, per question type.

    llava eval --model out/finetune --data heldout_qa.json --image_folder data/ [--blank_images]

Each record's last gpt turn is the gold answer; the turns before it are the prompt. Records may carry a
``question_type`` field (the demo's colour/shape/position/count); accuracy is reported per type and overall.
``--blank_images`` replaces every image by a blank one of the same size: a model that really looks at the
image falls to chance there.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from llava.data.images import load_image_rgb
from llava.data.records import parse_record
from llava.data.validate import load_raw_records
from llava.errors import require_model_path, require_path
from llava.serve.predict import MODEL_HINT, Predictor, check_checkpoint_dir


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and extra whitespace: "Red." == "red"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class EvalResult:
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    predictions: list[dict] = field(default_factory=list)

    def accuracy(self) -> dict[str, float]:
        acc = {k: self.correct[k] / self.total[k] for k in sorted(self.total)}
        acc["overall"] = sum(self.correct.values()) / max(1, sum(self.total.values()))
        return acc


def evaluate(predictor: Predictor, data_path: str, image_folder: str | None, *, batch_size: int = 32,
             blank_images: bool = False, limit: int | None = None, show_progress: bool = True) -> EvalResult:
    raw = load_raw_records(data_path)
    n = len(raw) if limit is None else min(limit, len(raw))
    result = EvalResult()
    records = [parse_record(raw[i], i) for i in range(n)]
    bar = tqdm(total=n, desc="blank-image eval" if blank_images else "eval", disable=not show_progress)
    for start in range(0, n, batch_size):
        batch = records[start : start + batch_size]
        prompts, images, golds = [], [], []
        for rec in batch:
            last = max(i for i, m in enumerate(rec.messages) if m.role == "assistant")
            prompts.append(rec.messages[:last])
            golds.append(rec.messages[last].content)
            ims = [load_image_rgb(image_folder, p)[0] for p in rec.images]
            images.append([Image.new("RGB", im.size, (255, 255, 255)) for im in ims] if blank_images else ims)
        answers = predictor.generate(prompts, images, max_new_tokens=max(8, max(len(g.split()) for g in golds) * 4))
        for rec, gold, answer in zip(batch, golds, answers):
            kind = str(rec.extras.get("question_type", "all"))
            ok = normalize_answer(answer) == normalize_answer(gold)
            result.total[kind] += 1
            result.correct[kind] += int(ok)
            result.predictions.append({"id": rec.id, "type": kind, "gold": gold, "answer": answer, "correct": ok,
                                       "question": question_text(rec), "images": list(rec.images)})
        bar.update(len(batch))
    bar.close()
    return result


def question_text(record) -> str:
    """The record's last user turn, as the report page shows it (the gold answer is the turn after it)."""
    last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    users = [m.content for m in record.messages[:last] if m.role == "user"]
    return users[-1] if users else ""


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows of accuracies (e.g. {"real images": {...}, "blank images": {...}}) as a fixed-width table."""
    columns = sorted({k for r in rows.values() for k in r if k != "overall"}) + ["overall"]
    width = max(len(r) for r in rows) + 2
    lines = [" " * width + "".join(f"{c:>10}" for c in columns)]
    for name, acc in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{acc.get(c, float('nan')):>10.1%}" for c in columns))
    return "\n".join(lines)


def eval_main(args) -> int:
    print_results(run_eval(args), as_json=args.json)
    return 0


def run_eval(args) -> dict[str, EvalResult]:
    """``llava eval``'s work: inputs checked, checkpoint loaded, ``{"real images": ..., "blank images": ...}``."""
    check_checkpoint_dir(args.model)
    require_model_path("--model", args.model, hint=MODEL_HINT)
    require_path("--data", args.data, hint="give a LLaVA JSON/JSONL file of held-out records")
    if args.image_folder:
        require_path("--image_folder", args.image_folder, kind="dir", hint="give the directory the records' image "
                     "paths are relative to")
    predictor = Predictor.load(args.model, version=args.version)
    results = {"real images": evaluate(predictor, args.data, args.image_folder, batch_size=args.batch_size)}
    if args.blank_images:
        results["blank images"] = evaluate(predictor, args.data, args.image_folder, batch_size=args.batch_size,
                                           blank_images=True)
    return results


def print_results(results: dict[str, EvalResult], *, as_json: bool = False) -> dict[str, dict[str, float]]:
    """The accuracy table (and with ``as_json`` the same numbers as one JSON line); returns the rows."""
    rows = {name: result.accuracy() for name, result in results.items()}
    print(format_table(rows))
    if as_json:
        print(json.dumps(rows))
    return rows

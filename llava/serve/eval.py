"""Exact-match accuracy of a Llava checkpoint on held-out LLaVA records, per question type.

    llava eval --model out/finetune --data heldout_qa.json --image_folder data/ [--blank_images]
    llava eval --model out/video_run --data heldout.json --image_folder data/ --video_folder videos/
    llava eval --model out/finetune --data heldout.parquet          # images embedded in the rows

Each record's last gpt turn is the gold answer; the turns before it are the prompt. Records may carry a
``question_type`` field (the demo's colour/shape/position/count); accuracy is reported per type and overall.
``--blank_images`` replaces every image (and every sampled video frame) by a blank one of the same size: a model
that really looks at the image falls to chance there.

``--data`` is read as training reads ``--data_path``: a JSON list, JSONL, Parquet file(s) or a ``datasets`` directory;
an image is a path under ``--image_folder`` or bytes embedded in the row. A video record (``"video"``, alone or with
images) needs a LlavaOnevision / LlavaNextVideo checkpoint; its frames are sampled with the run's flags (the
checkpoint's ``llava_args.json``, or ``--frames_upbound`` ... given to ``llava eval``). Videos of different frame
counts are generated in separate batches (the native models take one frame count per ``pixel_values_videos``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from llava.data.images import ImageLoadError, open_image_ref
from llava.data.records import Record, parse_record
from llava.data.validate import load_raw_records
from llava.data.video import VideoLoadError
from llava.errors import UsagePathError, UsageValueError, require_model_path, require_path
from llava.serve.predict import MODEL_HINT, Predictor, SampledVideo, check_checkpoint_dir, video_overrides


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and extra whitespace: "Red." == "red"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@dataclass
class EvalResult:
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    predictions: list[dict] = field(default_factory=list)
    image_refs: list[list] = field(default_factory=list)  # per prediction: its image paths / EmbeddedImage (report)

    def accuracy(self) -> dict[str, float]:
        acc = {k: self.correct[k] / self.total[k] for k in sorted(self.total)}
        acc["overall"] = sum(self.correct.values()) / max(1, sum(self.total.values()))
        return acc


def evaluate(predictor: Predictor, data_path: str, image_folder: str | None, *, batch_size: int = 32,
             blank_images: bool = False, limit: int | None = None, show_progress: bool = True,
             video_folder: str | None = None) -> EvalResult:
    raw = load_raw_records(data_path)
    n = len(raw) if limit is None else min(limit, len(raw))
    result = EvalResult()
    records = [parse_record(raw[i], i) for i in range(n)]
    check_video_records(records, predictor, video_folder)
    with tqdm(total=n, desc="blank-image eval" if blank_images else "eval", disable=not show_progress) as bar:
        for start in range(0, n, batch_size):
            batch = records[start : start + batch_size]
            prompts, images, golds, videos = batch_inputs(predictor, batch, image_folder, video_folder, blank_images)
            max_new_tokens = max(8, max(len(g.split()) for g in golds) * 4)
            answers = generate_by_frame_count(predictor, prompts, images, videos, max_new_tokens)
            for rec, gold, answer, video in zip(batch, golds, answers, videos):
                kind = str(rec.extras.get("question_type", "all"))
                ok = normalize_answer(answer) == normalize_answer(gold)
                result.total[kind] += 1
                result.correct[kind] += int(ok)
                prediction = {"id": rec.id, "type": kind, "gold": gold, "answer": answer, "correct": ok,
                              "question": question_text(rec), "images": [str(ref) for ref in rec.images]}
                if video is not None:
                    prediction.update(video=rec.video, frames=list(video.indices), frame_times=video.times)
                result.predictions.append(prediction)
                result.image_refs.append(list(rec.images))
            bar.update(len(batch))
    return result


def batch_inputs(predictor, batch: list[Record], image_folder, video_folder, blank: bool) -> tuple[list, ...]:
    """Per record: the prompt (turns before the last gpt turn), its images, the gold answer, its sampled video."""
    prompts, images, golds, videos = [], [], [], []
    for rec in batch:
        last = max(i for i, m in enumerate(rec.messages) if m.role == "assistant")
        prompts.append(rec.messages[:last])
        golds.append(rec.messages[last].content)
        ims = open_record_images(rec, image_folder)
        images.append([Image.new("RGB", im.size, (255, 255, 255)) for im in ims] if blank else ims)
        videos.append(None if rec.video is None else open_record_video(predictor, rec, video_folder, blank))
    return prompts, images, golds, videos


def check_video_records(records: list[Record | dict], predictor, video_folder: str | None) -> None:
    """Before any sample is generated: a video record needs ``--video_folder`` and a checkpoint with a video path
    (``predictor`` None: the folder only; raw records are read by their ``id`` and ``video`` fields)."""
    rec = next((r for r in records if (r.get("video") if isinstance(r, dict) else r.video) is not None), None)
    if rec is None:
        return
    rid, video = (str(rec.get("id")), rec["video"]) if isinstance(rec, dict) else (rec.id, rec.video)
    if not video_folder:
        raise UsagePathError(f"record {rid!r} has a video ({video!r}) but --video_folder is not set; give the "
                             f"directory its path is relative to")
    if predictor is not None and not getattr(predictor, "has_video", True):
        raise UsageValueError(f"record {rid!r} has a video ({video!r}) but the checkpoint is a "
                              f"{predictor.model.config.model_type} model without a video path; evaluate a run trained "
                              f"with --video_folder (LlavaOnevision / LlavaNextVideo)")


def open_record_images(record: Record, image_folder: str | None) -> list[Image.Image]:
    """The record's images, decoded as training decodes them (a path under ``image_folder`` or embedded bytes); an
    error names the record."""
    images = []
    for ref in record.images:
        try:
            images.append(open_image_ref(image_folder, ref)[0])
        except ImageLoadError as err:
            raise ImageLoadError(err.kind, err.path, f"{err.detail} (record {record.id!r})",
                                 image_folder=err.image_folder) from err
    return images


def open_record_video(predictor, record: Record, video_folder: str | None, blank: bool) -> SampledVideo:
    """The record's video sampled as the checkpoint's run samples it; an error names the record."""
    try:
        return predictor.load_video(video_folder, record.video, blank=blank)
    except VideoLoadError as err:
        raise VideoLoadError(err.kind, err.path, f"{err.detail} (record {record.id!r})", video_folder=video_folder) from err


def generate_by_frame_count(predictor, prompts: list, images: list, videos: list, max_new_tokens: int) -> list[str]:
    """Answers in sample order. Without videos, one ``generate`` call; with videos, one per frame count (samples
    without a video join the first group), since ``pixel_values_videos`` holds one frame count."""
    if all(v is None for v in videos):
        return predictor.generate(prompts, images, max_new_tokens=max_new_tokens)
    groups: dict[int, list[int]] = {}
    first = next(v.pixels.shape[0] for v in videos if v is not None)
    for i, video in enumerate(videos):
        groups.setdefault(first if video is None else video.pixels.shape[0], []).append(i)
    answers: list[str] = [""] * len(prompts)
    for members in groups.values():
        got = predictor.generate([prompts[i] for i in members], [images[i] for i in members],
                                 max_new_tokens=max_new_tokens, videos=[videos[i] for i in members])
        for i, answer in zip(members, got):
            answers[i] = answer
    return answers


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
    require_path("--data", args.data, hint="give a LLaVA JSON/JSONL file, Parquet file(s) or a `datasets` directory "
                 "of held-out records")
    if args.image_folder:
        require_path("--image_folder", args.image_folder, kind="dir", hint="give the directory the records' image "
                     "paths are relative to")
    video_folder = getattr(args, "video_folder", None)
    if video_folder:
        require_path("--video_folder", video_folder, kind="dir", hint="give the directory the records' video paths "
                     "are relative to")
    check_video_records([r for r in load_raw_records(args.data) if isinstance(r, dict) and r.get("video")][:1],
                        None, video_folder)  # before the model loads
    predictor = Predictor.load(args.model, version=args.version, video_overrides=video_overrides(args))
    results = {"real images": evaluate(predictor, args.data, args.image_folder, batch_size=args.batch_size,
                                       video_folder=video_folder)}
    if args.blank_images:
        results["blank images"] = evaluate(predictor, args.data, args.image_folder, batch_size=args.batch_size,
                                           blank_images=True, video_folder=video_folder)
    return results


def print_results(results: dict[str, EvalResult], *, as_json: bool = False) -> dict[str, dict[str, float]]:
    """The accuracy table (and with ``as_json`` the same numbers as one JSON line); returns the rows."""
    rows = {name: result.accuracy() for name, result in results.items()}
    print(format_table(rows))
    if as_json:
        print(json.dumps(rows))
    return rows

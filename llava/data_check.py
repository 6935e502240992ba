"""``llava data check``: validate a dataset before training, with the training flags, and print its statistics.

    llava data check --data_path d.json --image_folder images --model_name_or_path LLM --vision_tower CLIP \
        --version vicuna_v1 --model_max_length 2048 [--json] [--workers 8] [--no_decode] [any other training flag]

Loads only the tokenizer (plus ``<image>``) and the vision tower's *config* (for the image-token count), reads
every record, tokenizes it exactly as training does, and opens every image in a thread pool (PIL releases the
GIL while decoding). Reports, per problem kind, the count, the first record ids and what is wrong. Exit code 1
when anything would stop ``--on_bad_sample error`` training (severity ``error``); samples training drops
(too long, nothing supervised) are ``dropped``, duplicate ids a ``warning``, converted/animated images ``note``.
The reading, the problem log and the image checks are ``llava/data/validate.py``, which the training dataset
runs too (existence and confinement only, no decode) before step 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from llava.data.anyres import read_image_sizes
from llava.data.images import DEFAULT_MAX_PIXELS, ImageLoadError
from llava.data.records import Record, RecordError, parse_record
from llava.data.sources import is_mixture_path, read_mixture, select_rows, source_specs
from llava.data.stores import parquet_files
from llava.data.templates import get_template
from llava.data.tokenize import SampleRejected, tokenize_conversation
from llava.data.validate import (
    DataError,
    ProblemLog,
    check_one_image,
    image_problem_kind,
    iter_jsonl,
    jsonl_error,
    load_raw_records,
    require_saved_dataset,
)
from llava.data.video import (
    VideoLoadError,
    decode_video_frames,
    probe_video,
    sample_frame_indices,
    video_messages,
)
from llava.data.video_flags import video_enabled, video_layout_from_flags
from llava.errors import ArgumentParser, UsageValueError, report_usage_errors, require_model_path, require_path

SEVERITY = {"duplicate_id": "warning", "image_tokens_exceed_max_length": "dropped", "no_supervised_tokens": "dropped",
            "image_converted": "note", "image_animated": "note"}  # every other kind is an "error"
ADVICE = {
    "invalid_json": "fix the line's JSON (one object per line in JSONL)",
    "image_missing": "check --image_folder and the record's image path (COCO 2014 vs 2017 names, .gif vs .jpg)",
    "image_absolute_path": "give image paths relative to --image_folder",
    "image_outside_folder": "keep images inside --image_folder",
    "image_tokens_exceed_max_length": "raise --model_max_length or use fewer images per sample",
    "duplicate_id": "give each record a unique id",
    "video_not_enabled": "pass --video_folder (the directory the records' video paths are relative to)",
    "video_tokens_exceed_max_length": "raise --model_max_length or lower --frames_upbound",
    "video_missing": "check --video_folder and the record's video path",
    "video_unreadable": "re-encode or drop the video (PyAV/FFmpeg cannot read it)",
    "video_too_large": "downscale the video (frames of at most 4096x4096 pixels)",
    "preference_identical": "give the pair two different answers (or drop it): it teaches no preference",
    "preference_empty": "give both answers of the pair some text",
    "preference_missing": "give 'prompt', 'chosen' and 'rejected' (or a last gpt turn with 'chosen' and 'rejected')",
}


@dataclass
class ProblemReport(ProblemLog):
    """The problem log with severities and statistics; ``exit_code`` 1 when training would stop."""

    stats: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 5
    values: dict[str, list] = field(default_factory=dict, repr=False)  # raw token lengths, image sizes: the page's histograms

    def severity(self, kind: str) -> str:
        return SEVERITY.get(kind, "error")

    @property
    def exit_code(self) -> int:
        return int(any(self.severity(k) == "error" for k in self.counts))

    def as_dict(self) -> dict[str, Any]:
        problems = {k: {"count": n, "severity": self.severity(k), "record_ids": self.ids[k],
                        "messages": self.examples[k], "advice": ADVICE.get(k)} for k, n in self.counts.most_common()}
        return {"ok": self.exit_code == 0, "problems": problems, "stats": self.stats}

    def text(self) -> str:
        lines = []
        for kind, info in self.as_dict()["problems"].items():
            lines.append(f"[{info['severity']}] {kind}: {info['count']} record(s), first: {', '.join(info['record_ids'])}")
            lines += [f"    - {m}" for m in info["messages"][:3]]
            if info["advice"]:
                lines.append(f"    fix: {info['advice']}")
        s = self.stats
        if s:
            taken = f" (taken of {s['available']} available)" if "available" in s else ""
            lines.append(f"records: {s['records']}{taken}, trainable: {s['trainable']}; modality mix: {s['modality']}")
            lines.append(f"images per sample: {s['images_per_sample']}")
            lines.append(f"token length percentiles (after templating and image expansion): {s['token_length']}; "
                         f"tokens in all: {s['tokens']:,}")
            lines.append(f"longer than --model_max_length {s['model_max_length']}: {s['over_max_length']} "
                         f"(truncated after their images: {s['truncated']}, dropped: {s['dropped']})")
            lines.append(f"image width/height percentiles: {s['image_width']} / {s['image_height']}")
        lines.append("OK: nothing would stop training" if self.exit_code == 0 else "FAILED: training would stop on the "
                     "errors above (fix them, or train with --on_bad_sample skip to drop those records)")
        return "\n".join(lines)


CHECK_BATCH = 4096  # records read, checked and their image results collected at a time


def iter_record_batches(data_path: str | Path, report: ProblemReport, take: np.ndarray | None = None,
                        batch: int | None = None) -> Iterator[list[tuple[str, Any]]]:
    """Lists of ``(name, raw)``, ``batch`` at a time: ``line N`` (JSONL, streamed line by line) or ``#i`` (a JSON
    list, Parquet, a ``datasets`` directory: read one batch of rows at a time); unreadable lines and files are
    reported as ``invalid_json``. ``take`` (a mixture entry's rows): only the records whose position is True."""
    path = Path(data_path)
    if path.suffix == ".jsonl" and path.is_file():
        named = _jsonl_named(path, report)
    else:
        try:
            raw = load_raw_records(path, report)
        except DataError as err:
            report.add("invalid_json", str(err), str(path))
            return
        named = ((f"#{i}", raw[i]) for i in range(len(raw)))
    if take is not None:
        named = (item for item, taken in zip(named, take) if taken)
    while chunk := list(itertools.islice(named, batch or CHECK_BATCH)):
        yield chunk


def _jsonl_named(path: Path, report: ProblemReport) -> Iterator[tuple[str, Any]]:
    for line_no, record, err in iter_jsonl(path):
        if err is None:
            yield f"line {line_no}", record
        else:
            report.add("invalid_json", jsonl_error(path, line_no, err), f"line {line_no}")


def count_records(data_path: str | Path) -> int:
    """The records ``iter_record_batches`` reads from ``data_path`` (a mixture entry's ``available``)."""
    path = Path(data_path)
    if path.suffix == ".jsonl" and path.is_file():
        return sum(1 for *_, err in iter_jsonl(path) if err is None)
    try:
        return len(load_raw_records(path, ProblemLog()))
    except DataError:
        return 0


def submit_image_checks(pool: ThreadPoolExecutor, record: Record, image_folder: str | None, *, decode: bool = True,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, str, Any]]:
    """Queue ``record``'s images on ``pool``: ``[(record id, path, future | None)]`` (None: no --image_folder)."""
    return [(record.id, rel, None if not image_folder and isinstance(rel, str) else  # embedded bytes need no folder
             pool.submit(check_one_image, image_folder, rel, decode, max_pixels)) for rel in record.images]


def collect_image_checks(pending: list[tuple[str, str, Any]], report: ProblemReport, *, progress: bool = True,
                         bad: set[str] | None = None, sizes: list | None = None) -> set[str]:
    """Report the results of :func:`submit_image_checks` in order; returns the ids of records with a bad image.
    ``bad`` and ``sizes`` carry over from earlier batches (then the caller sets the size statistics)."""
    bad = set() if bad is None else bad
    batch_sizes: list[tuple[int, int]] = []
    for rid, rel, future in tqdm(pending, desc="images", disable=not progress):
        if future is None:
            if rid not in bad:
                report.add("no_image_folder", f"record {rid!r} has images but --image_folder is not set", rid)
            bad.add(rid)
            continue
        size, notes = future.result()
        if isinstance(size, ImageLoadError):
            report.add(image_problem_kind(size), f"record {rid!r}: {size}", rid)
            bad.add(rid)
            continue
        if size is not None:
            batch_sizes.append(size)
        for note in notes:
            kind = "image_animated" if note.startswith("animated") else "image_converted"
            report.add(kind, f"record {rid!r}, image {rel!r}: {note}", rid)
    if sizes is not None:
        sizes.append(np.asarray(batch_sizes, np.int32).reshape(-1, 2))
        return bad
    report.values["image_size"] = batch_sizes
    if batch_sizes:
        arr = np.array(batch_sizes)
        report.stats["image_width"], report.stats["image_height"] = _percentiles(arr[:, 0]), _percentiles(arr[:, 1])
    return bad


def _percentiles(values) -> dict[str, int]:
    if len(values) == 0:
        return {}
    q = np.percentile(np.asarray(values), [0, 50, 90, 99, 100])
    return dict(zip(("min", "p50", "p90", "p99", "max"), (int(round(x)) for x in q)))


@dataclass
class TokenSetup:
    tokenizer: Any
    template: Any
    image_token_id: int
    num_image_tokens: int
    model_max_length: int
    mm_use_im_start_end: bool = False
    layout: Any = None  # AnyresLayout: each image's token count from its size (llava/data/anyres.py)
    image_folder: str | None = None
    video: Any = None  # VideoLayout (--video_folder): a video's tokens from its sampled frames (llava/data/video.py)
    video_folder: str | None = None
    video_token_id: int | None = None


def load_token_setup(args: argparse.Namespace) -> TokenSetup:
    """The tokenizer (with ``<image>``) and the image-token count from the vision tower's config; no weights."""
    # transformers and model/ (torch) load after the flags are checked: --help and flag errors stay fast
    from transformers import AutoConfig, AutoTokenizer

    # model/ imports torch: only once the flags are checked
    from llava.model.builder import add_multimodal_tokens, num_image_tokens, select_strategy, vision_model_class

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, use_fast=True)
    add_multimodal_tokens(tokenizer, args.mm_use_im_start_end, video=video_enabled(args))
    # model/ imports torch: only once the flags are checked
    from llava.model.anyres_model import ANYRES_MODEL_TYPES, anyres_layout, layout_from_config

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    layout = None
    if config.model_type in ANYRES_MODEL_TYPES:
        layout = layout_from_config(config)
        n = layout.base_tokens
    elif config.model_type == "llava":
        n = num_image_tokens(config.vision_config, config.vision_feature_select_strategy)
    else:
        if not args.vision_tower:
            raise UsageValueError(f"--model_name_or_path {args.model_name_or_path} is a language model, so "
                                  f"--vision_tower is required: give a CLIP or SigLIP directory")
        tower_type = AutoConfig.from_pretrained(args.vision_tower).model_type
        vision_config = vision_model_class(args.vision_tower, tower_type).config_class.from_pretrained(args.vision_tower)
        strategy = select_strategy(vision_config, args.mm_vision_select_feature)
        n = num_image_tokens(vision_config, strategy)
        layout = anyres_layout(args, vision_config, strategy)
    template = get_template(args.version, image_front=getattr(args, "image_placement", "front") == "front")
    setup = TokenSetup(tokenizer, template, tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN), n,
                       args.model_max_length, args.mm_use_im_start_end, layout, args.image_folder)
    if video_enabled(args):
        tower = getattr(config, "vision_config", None)
        if tower is None:
            tower_type = AutoConfig.from_pretrained(args.vision_tower).model_type
            tower = vision_model_class(args.vision_tower, tower_type).config_class.from_pretrained(args.vision_tower)
        setup.video = video_layout_from_flags(args, args, tower)
        setup.video_folder, setup.video_token_id = args.video_folder, tokenizer.convert_tokens_to_ids(DEFAULT_VIDEO_TOKEN)
    return setup


def check_dataset(data_path, image_folder, setup: TokenSetup, *, decode: bool = True, workers: int = 8,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, spec=None, seed: int = 42) -> ProblemReport:
    """Every check and statistic of ``llava data check`` on one dataset; with ``spec`` (a mixture entry,
    ``llava/data/sources.py``), on the rows its sampling strategy takes with ``seed``."""
    # the preference records (torch-free): not at the top, so `llava data check --help` stays light
    from llava.data.preference_records import is_preference_record, parse_preference_record

    report, image_log = ProblemReport(), ProblemReport()  # invalid lines / records first, then images (as reported)
    records_log = ProblemReport()
    take = None
    if spec is not None:
        available = count_records(data_path)
        take = np.zeros(available, bool)
        take[select_rows(spec, available, seed)] = True
    seen: dict[str, int] = {}  # record id -> how many of its records are trainable (duplicates, trainable count)
    n_images = Counter()
    kept = with_image = image_only = with_video = 0
    truncated = dropped = 0
    lengths: list[np.ndarray] = []  # one small array per batch: no Python int per record
    image_tokens: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    bad_images: set[str] = set()
    video_stats: list[dict] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))  # images decode while the main thread tokenizes
    earlier: list[tuple[str, str, Any]] = []  # the previous batch's image checks, collected after this batch
    i = 0
    bar = tqdm(desc="records", disable=not progress, total=None if take is None else int(take.sum()))
    for batch in iter_record_batches(data_path, report, take):
        pending: list[tuple[str, str, Any]] = []
        batch_lengths, batch_tokens = [], []
        for name, raw in batch:
            i += 1
            try:
                pair = parse_preference_record(raw, i - 1) if is_preference_record(raw) else None
                record = pair.as_record() if pair is not None else parse_record(raw, i - 1)
            except RecordError as err:
                records_log.add(err.kind, str(err), err.record_id)
                continue
            if record.id in seen:
                records_log.add("duplicate_id", f"record id {record.id!r} ({name}) appears more than once", record.id)
            seen.setdefault(record.id, 0)
            n_images[len(record.images)] += 1
            pending += submit_image_checks(pool, record, image_folder, decode=decode, max_pixels=max_pixels)
            video = None
            if record.video is not None:
                video = check_video(record, setup, decode=decode)
                if isinstance(video, tuple):
                    records_log.add(*video)
                    continue
                video_stats.append(video)
            # a preference pair trains both rows: each answer is tokenized and checked (lengths: one per row)
            rows = [("", record)] if pair is None else [(f" ({side} answer)", pair.as_record(side))
                                                        for side in ("chosen", "rejected")]
            row_lengths, which = [], ""
            try:
                for label, row in rows:
                    which = label  # named in the report when this row is refused
                    full = _tokenize(row, setup, 10**9, video)
                    row_lengths.append(len(full.input_ids))
                    if len(full.input_ids) > setup.model_max_length:
                        _tokenize(row, setup, setup.model_max_length, video)
                batch_lengths += row_lengths
                truncated += any(n > setup.model_max_length for n in row_lengths)
            except SampleRejected as err:
                batch_lengths += row_lengths  # the lengths measured before the drop count, as for any record
                dropped += 1
                records_log.add(err.kind, f"record {record.id!r}{which}: {err}", record.id)
                continue
            except ImageLoadError:  # anyres counts need the image's size; the image check reports the problem
                continue
            except ValueError as err:  # e.g. <image> not a special token: a setup error, reported per record
                records_log.add("tokenize_error", f"record {record.id!r}: {err}", record.id)
                continue
            kept += 1
            seen[record.id] += 1
            with_image += bool(record.images)
            image_only += bool(record.images) and record.video is None
            with_video += record.video is not None
            if setup.layout is not None and record.images:
                batch_tokens += image_token_counts(record, setup)
        lengths.append(np.asarray(batch_lengths, np.int64))
        image_tokens.append(np.asarray(batch_tokens, np.int64))
        collect_image_checks(earlier, image_log, progress=False, bad=bad_images, sizes=sizes)
        earlier = pending
        bar.update(len(batch))
    bar.close()
    with pool:
        collect_image_checks(earlier, image_log, progress=False, bad=bad_images, sizes=sizes)
    for log in (records_log, image_log):  # in the order the checks report them
        _merge_into(report, log)
    lengths, image_tokens = np.concatenate([np.zeros(0, np.int64), *lengths]), np.concatenate([np.zeros(0, np.int64), *image_tokens])
    report.values.update(token_length=lengths, image_tokens=image_tokens,
                         image_size=np.concatenate([np.zeros((0, 2), np.int32), *sizes]))
    if len(report.values["image_size"]):
        report.stats["image_width"] = _percentiles(report.values["image_size"][:, 0])
        report.stats["image_height"] = _percentiles(report.values["image_size"][:, 1])
    report.stats.update({
        "records": i, "trainable": kept - sum(seen.get(rid, 0) for rid in bad_images),
        "modality": {"image": with_image, "text_only": kept - with_image},
        "images_per_sample": {str(k): v for k, v in sorted(n_images.items())},
        "token_length": _percentiles(lengths), "tokens": int(lengths.sum()), "model_max_length": setup.model_max_length,
        "over_max_length": truncated + report.counts["image_tokens_exceed_max_length"]
        + report.counts["video_tokens_exceed_max_length"], "truncated": truncated,
        "dropped": dropped, "num_image_tokens": setup.num_image_tokens,
    })
    if setup.video is not None:
        report.stats["modality"] = {"image": image_only, "video": with_video,
                                    "text_only": kept - image_only - with_video}
        report.stats["video"] = {key: _percentiles([v[key] for v in video_stats])
                                 for key in ("frames", "sampled_frames", "tokens")}
        report.stats["video"]["duration_s"] = _percentiles([v["duration"] for v in video_stats])
    if setup.layout is not None:  # anyres: tokens per image depend on its size
        report.stats["image_tokens_per_image"] = _percentiles(image_tokens)
        report.stats["num_image_tokens"] = f"per image size ({setup.layout.vision_aspect_ratio})"
    report.stats.setdefault("image_width", {})
    report.stats.setdefault("image_height", {})
    if spec is not None:  # the rows the entry's sampling drew from (``records`` are the rows it took)
        report.stats["available"] = available
    return report


def _merge_into(report: ProblemReport, log: ProblemReport) -> None:
    """``log``'s problems added to ``report`` after its own, as if reported there in the same order."""
    for kind, n in log.counts.items():
        report.counts[kind] += n
        room = report.max_examples - len(report.examples.get(kind, []))
        report.examples.setdefault(kind, []).extend(log.examples[kind][:room])
        report.ids.setdefault(kind, []).extend(log.ids[kind][:room])


def image_token_counts(record: Record, setup: TokenSetup) -> list[int]:
    """Each image's token count: fixed (LLaVA-1.5), or from its size read from the header (anyres)."""
    if setup.layout is None or not record.images or (
            setup.image_folder is None and any(isinstance(r, str) for r in record.images)):
        return [setup.num_image_tokens] * len(record.images)

    return setup.layout.record_image_tokens(read_image_sizes(setup.image_folder, record.images))


def _tokenize(record: Record, setup: TokenSetup, max_length: int, video: dict | None = None):
    messages = record.messages if video is None else video_messages(record.messages, video["info"], video["indices"],
                                                                     setup.video)
    return tokenize_conversation(messages, setup.template, setup.tokenizer, image_token_id=setup.image_token_id,
                                 num_image_tokens=image_token_counts(record, setup) if record.images else
                                 setup.num_image_tokens, model_max_length=max_length,
                                 mm_use_im_start_end=setup.mm_use_im_start_end, video_token_id=setup.video_token_id,
                                 num_video_tokens=video["tokens"] if video else 0)


def check_video(record: Record, setup: TokenSetup, *, decode: bool = True) -> dict | tuple[str, str, str]:
    """A record's video: frames, duration, sampled frames and tokens from the container's metadata, the sampled
    frames decoded (unless ``decode`` is off); or the problem ``(video_<kind>, message, record id)``."""
    if setup.video is None:
        return ("video_not_enabled", f"record {record.id!r} has a video but --video_folder is not set", record.id)
    try:
        info = probe_video(setup.video_folder, record.video)
        indices = sample_frame_indices(info.frames, info.fps, setup.video.sampling)
        if decode:
            decode_video_frames(setup.video_folder, record.video, indices, size=setup.video.frame_size, info=info)
    except VideoLoadError as err:
        return (f"video_{err.kind}", f"record {record.id!r}: {err}", record.id)
    return {"info": info, "indices": indices, "frames": info.frames, "sampled_frames": len(indices),
            "duration": info.duration, "tokens": setup.video.video_tokens(len(indices))}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="llava data check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--vision_tower", default=None)
    p.add_argument("--version", default="vicuna_v1")
    p.add_argument("--model_max_length", type=int, default=2048)
    p.add_argument("--mm_use_im_start_end", type=_bool, default=False)
    p.add_argument("--image_placement", choices=("front", "keep"), default="front")
    p.add_argument("--mm_vision_select_feature", default="patch")
    p.add_argument("--image_aspect_ratio", default="square")
    p.add_argument("--image_grid_pinpoints", default=None)
    p.add_argument("--video_folder", default=None)
    p.add_argument("--frames_upbound", type=int, default=0)
    p.add_argument("--video_fps", type=float, default=1.0)
    p.add_argument("--force_sample", type=_bool, default=False)
    p.add_argument("--add_time_instruction", type=_bool, default=False)
    p.add_argument("--mm_newline_position", default="grid")
    p.add_argument("--mm_spatial_pool_mode", default="bilinear")
    p.add_argument("--mm_spatial_pool_stride", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--workers", type=int, default=8, help="threads decoding images")
    p.add_argument("--no_decode", action="store_true", help="check image existence and paths only")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--seed", type=int, default=42, help="a mixture's random:N sampling, as training's --seed")
    p.add_argument("--report", default=None, metavar="DIR", help="also write the report as an HTML page (DIR/index.html): "
                   "histograms, modality mix, each problem with its records and images; a mixture YAML: a row per "
                   "entry too")
    return p


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "y")


def check_main(argv: list[str]) -> int:
    """Parse the training-style flags (others ignored), check, print; returns the exit code."""
    if build_parser().parse_known_args(argv)[0].report:  # the page writer lives on the command side (llava/report)
        raise UsageValueError("--report: write the page with `llava data check ... --report DIR`")
    args, report = run_check(argv)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    return report.exit_code


def run_check(argv: list[str]) -> tuple[argparse.Namespace, ProblemReport]:
    """``llava data check``'s work: the flags parsed and checked, every record and image checked."""
    args, _ignored = build_parser().parse_known_args(argv)
    data = require_path("--data_path", args.data_path, hint="give a LLaVA JSON/JSONL file, Parquet file(s), a "
                        "`datasets` directory or a dataset-mixture YAML")
    if data.is_dir() and not parquet_files(data):
        require_saved_dataset(args.data_path)
    if is_mixture_path(args.data_path):  # the entries' keys, strategies and paths, before anything loads
        source_specs(args.data_path, args.image_folder, args.video_folder)
    if args.image_folder:
        require_path("--image_folder", args.image_folder, kind="dir",
                     hint="give the directory the records' image paths are relative to")
    require_model_path("--model_name_or_path", args.model_name_or_path,
                       hint="give the LLM or Llava checkpoint you will train (its tokenizer is used)")
    if args.vision_tower:
        require_model_path("--vision_tower", args.vision_tower, hint="give a CLIP or SigLIP directory")
    # model/ imports torch: only once the flags are checked
    from llava.model.builder import check_model_dirs

    check_model_dirs(args.model_name_or_path, args.vision_tower)
    setup = load_token_setup(args)
    if is_mixture_path(args.data_path):
        return args, check_mixture(args, setup)
    report = check_dataset(args.data_path, args.image_folder, setup, decode=not args.no_decode, workers=args.workers,
                           max_pixels=args.max_pixels, progress=not args.json)
    return args, report


@dataclass
class MixtureReport:
    """One :class:`ProblemReport` per mixture entry (``llava/data/sources.py``), checked on the rows it takes."""

    reports: list[tuple[Any, ProblemReport]]  # (SourceSpec, its report)

    @property
    def exit_code(self) -> int:
        return max(r.exit_code for _, r in self.reports)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.exit_code == 0, "sources": [
            {"entry": spec.entry, "json_path": spec.written, "sampling": spec.sampling, **report.as_dict()}
            for spec, report in self.reports]}

    def text(self) -> str:
        return "\n".join(f"== {spec.label}, sampling {spec.sampling}\n{report.text()}" for spec, report in self.reports)

    def combined(self) -> ProblemReport:
        """The whole mixture as one report (the page's histograms and problem lists): counts, record numbers and
        modality mixes summed over the entries, percentiles and histograms over all entries' values together."""
        reports = [r for _, r in self.reports]
        whole = ProblemReport(max_examples=sum(r.max_examples for r in reports))
        for r in reports:
            _merge_into(whole, r)
        whole.values = {key: np.concatenate([np.asarray(r.values[key]) for r in reports])
                        for key in ("token_length", "image_tokens", "image_size")}
        stats = [r.stats for r in reports]
        modality: dict[str, int] = {}
        per_sample: Counter = Counter()
        for s in stats:
            for key, n in s["modality"].items():
                modality[key] = modality.get(key, 0) + n
            per_sample.update(s["images_per_sample"])
        sizes = whole.values["image_size"]
        summed = ("available", "records", "trainable", "over_max_length", "truncated", "dropped", "tokens")
        whole.stats = {key: sum(s[key] for s in stats) for key in summed}
        whole.stats.update({
            "modality": modality, "images_per_sample": {k: per_sample[k] for k in sorted(per_sample, key=int)},
            "token_length": _percentiles(whole.values["token_length"]),
            "model_max_length": stats[0]["model_max_length"], "num_image_tokens": stats[0]["num_image_tokens"],
            "image_width": _percentiles(sizes[:, 0]), "image_height": _percentiles(sizes[:, 1])})
        if "image_tokens_per_image" in stats[0]:
            whole.stats["image_tokens_per_image"] = _percentiles(whole.values["image_tokens"])
        return whole


def check_mixture(args: argparse.Namespace, setup: TokenSetup) -> MixtureReport:
    """``llava data check mix.yaml``: each entry checked on the rows its sampling takes (``--seed``); exit code 1 when
    any entry would stop training."""
    reports = []
    for spec in read_mixture(args.data_path, image_folder=args.image_folder, video_folder=args.video_folder):
        own = replace(setup, image_folder=spec.image_folder, video_folder=spec.video_folder)
        report = check_dataset(spec.path, spec.image_folder, own,
                               decode=not args.no_decode, workers=args.workers, max_pixels=args.max_pixels,
                               progress=not args.json, spec=spec, seed=args.seed)
        reports.append((spec, report))
    return MixtureReport(reports)


if __name__ == "__main__":
    sys.exit(report_usage_errors("data check", lambda: check_main(sys.argv[1:])))

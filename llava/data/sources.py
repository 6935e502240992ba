"""Data sources and mixtures: one ``--data_path``, or LLaVA-NeXT's dataset-mixture YAML, as a list of sources.

    specs = source_specs("mix.yaml", image_folder="images")    # [SourceSpec], one per YAML entry
    rows = select_rows(specs[0], available=1000, seed=42)       # the raw rows the entry's sampling_strategy takes

The YAML is LLaVA-NeXT's (``llava/train/train.py``, ``LazySupervisedDataset.__init__``), read with the same meaning::

    datasets:
      - json_path: a.json                 # JSON, JSONL, Parquet file/directory, or a `datasets` directory
        sampling_strategy: first:1000     # all | first:N | end:N | random:N | first:N% | end:N% | random:N%
        image_folder: images_a            # optional (ours): this source's image root, else --image_folder
        video_folder: videos_a            # optional (ours): this source's video root, else --video_folder
        repeat: 2.5                       # optional (ours): the taken rows 2 times, plus a seeded half of them

- ``N%`` takes ``ceil(N * available / 100)`` records, as LLaVA-NeXT rounds; ``first``/``end``/``random`` never take
  more than the source holds (LLaVA-NeXT's slices): a larger N takes all of it. Upsampling is ``repeat``.
- ``random:N`` is the first N of a permutation of the source's rows drawn by
  ``numpy.random.default_rng([seed, entry_key(json_path)])`` (``--seed``), so every rank and every restart take the
  same rows (LLaVA-NeXT shuffles unseeded). ``repeat: R`` gives ``floor(R)`` copies of the taken rows and then the
  first ``ceil(frac(R) * taken)`` of a permutation drawn by ``default_rng([seed, entry_key(json_path), 1])``.
- ``end:0`` takes nothing (LLaVA-NeXT's ``[-0:]`` slice would take everything).
- A relative ``json_path`` (or folder) is read relative to the YAML's directory when it exists there, else to the
  working directory (where LLaVA-NeXT reads it).
Sampling applies to the raw rows, before validation, as in LLaVA-NeXT; records the sampling does not take are never
reported or trained on. Each source has its own cached index (``index.py``, keyed by its content, tokenizer,
template and its folder), so editing one source re-indexes only that source. ``mixture_table`` is the per-source
start-up table (available, taken, trainable, modality mix, tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llava.data.index import InMemoryRecords, cached_digest, convert_sources, load_or_build_index, open_records
from llava.data.validate import ProblemLog, load_raw_records
from llava.errors import UsagePathError, UsageValueError

STRATEGIES = ("all", "first", "end", "random")
ENTRY_KEYS = ("json_path", "sampling_strategy", "image_folder", "video_folder", "repeat")


@dataclass(frozen=True)
class SourceSpec:
    """One source as the user wrote it: a ``--data_path`` or one entry of a mixture YAML."""

    path: str  # the data file or directory, resolved
    written: str  # the path as written (shown in tables and errors)
    strategy: str = "all"
    amount: str | None = None  # "1000" or "10%" as written after the colon
    image_folder: str | None = None
    video_folder: str | None = None
    repeat: float = 1.0
    entry: int | None = None  # 1-based position in the mixture YAML; None for a plain --data_path
    mixture: str | None = None  # the YAML file

    @property
    def label(self) -> str:
        return self.written if self.entry is None else f"entry {self.entry} ({self.written})"

    @property
    def sampling(self) -> str:
        text = self.strategy if self.amount is None else f"{self.strategy}:{self.amount}"
        return text if self.repeat == 1 else f"{text} x{self.repeat:g}"


def is_mixture_path(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path).endswith((".yaml", ".yml"))


def source_specs(data_path: str | os.PathLike, image_folder: str | None = None, video_folder: str | None = None, *,
                 flag: str = "--data_path") -> list[SourceSpec]:
    """The sources of ``data_path``: the entries of a mixture YAML, or the path itself as the one source."""
    if is_mixture_path(data_path):
        return read_mixture(data_path, image_folder=image_folder, video_folder=video_folder, flag=flag)
    return [SourceSpec(path=str(data_path), written=str(data_path), image_folder=image_folder,
                       video_folder=video_folder)]


def read_mixture(path: str | os.PathLike, *, image_folder: str | None = None, video_folder: str | None = None,
                 flag: str = "--data_path") -> list[SourceSpec]:
    """Parse and check a mixture YAML; every mistake is a one-line error naming the entry and the key."""
    where = f"{flag} {path}"
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as err:
        raise UsagePathError(f"{where}: no such file") from err
    except yaml.YAMLError as err:
        raise UsageValueError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from err
    entries = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageValueError(f"{where}: a dataset mixture needs a non-empty 'datasets:' list of entries "
                              f"(json_path + sampling_strategy), as LLaVA-NeXT's YAML files have")
    base = Path(path).resolve().parent
    specs = []
    for k, entry in enumerate(entries, start=1):
        at = f"{where}, entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str) or not entry["json_path"]:
            raise UsageValueError(f"{at}: expected a mapping with a 'json_path' string, got {entry!r:.80}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise UsageValueError(f"{at} ({entry['json_path']}): unknown key(s) {', '.join(unknown)}; "
                                  f"an entry has {', '.join(ENTRY_KEYS)}")
        at = f"{at} ({entry['json_path']})"
        strategy, amount = parse_strategy(str(entry.get("sampling_strategy", "all")), at)
        repeat = entry.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not 0 < repeat < 1e6:
            raise UsageValueError(f"{at}: repeat must be a number > 0 (2: every taken record twice), got {repeat!r}")
        data_file = _resolve(entry["json_path"], base, at, "json_path", must_exist=True)
        folders = {}
        for key, default in (("image_folder", image_folder), ("video_folder", video_folder)):
            value = entry.get(key)
            folders[key] = default if value is None else _resolve(str(value), base, at, key, must_exist=True,
                                                                  kind="dir")
        specs.append(SourceSpec(path=data_file, written=entry["json_path"], strategy=strategy, amount=amount,
                                repeat=float(repeat), entry=k, mixture=str(path), **folders))
    return specs


def parse_strategy(text: str, at: str) -> tuple[str, str | None]:
    """``"first:10%"`` -> ``("first", "10%")``; ``"all"`` -> ``("all", None)``; else a one-line error."""
    text = text.strip()
    if text == "all":
        return "all", None
    m = re.fullmatch(r"(first|end|random):(\d+(?:\.\d+)?%|\d+)", text)
    if not m:
        raise UsageValueError(f"{at}: sampling_strategy {text!r} is not one of all, first:N, end:N, random:N "
                              f"(N a count, or a percentage such as 10%)")
    return m.group(1), m.group(2)


def _resolve(value: str, base: Path, at: str, key: str, *, must_exist: bool, kind: str = "any") -> str:
    """``value`` relative to the YAML's directory when it exists there, else as given (the working directory)."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, p]
    for c in candidates:
        if c.exists() and (kind != "dir" or c.is_dir()):
            return str(c)
    if must_exist:
        tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
        raise UsagePathError(f"{at}: {key} {value} does not exist (looked for {tried})")
    return str(candidates[0])


def taken_count(spec: SourceSpec, available: int) -> int:
    """How many rows the strategy takes from ``available`` (before ``repeat``), as LLaVA-NeXT counts them."""
    if spec.strategy == "all":
        return available
    if spec.amount.endswith("%"):
        n = math.ceil(float(spec.amount[:-1]) * available / 100)
    else:
        n = int(spec.amount)
    return min(n, available)


def entry_key(written: str) -> int:
    """The number that, with ``--seed``, seeds an entry's random draws (from its json_path as written)."""
    return int.from_bytes(hashlib.sha256(written.encode()).digest()[:8], "little")


def select_rows(spec: SourceSpec, available: int, seed: int) -> np.ndarray:
    """The raw row positions the entry trains on, in order (repeats included)."""
    n = taken_count(spec, available)
    if spec.strategy == "random":
        rows = np.random.default_rng([seed, entry_key(spec.written)]).permutation(available)[:n]
    elif spec.strategy == "end":
        rows = np.arange(available - n, available, dtype=np.int64)
    else:  # all, first
        rows = np.arange(n, dtype=np.int64)
    if spec.repeat != 1:
        whole, frac = divmod(spec.repeat, 1.0)
        extra = np.random.default_rng([seed, entry_key(spec.written), 1]).permutation(len(rows))
        extra = extra[:math.ceil(frac * len(rows))]
        rows = np.concatenate([np.tile(rows, int(whole)), rows[extra]])
    return rows.astype(np.int64)


@dataclass
class SourceSummary:
    """A source's line of the start-up table."""

    available: int = 0  # records in the source (JSONL lines that are not JSON excluded)
    taken: int = 0  # rows the sampling strategy takes (with repeats)
    trainable: int = 0  # of those, samples that train
    image: int = 0
    video: int = 0
    text: int = 0
    tokens: int = 0
    problems: int = 0
    dropped: int = 0


@dataclass
class Source:
    """A source opened for training: its spec, its raw-record store, its summary."""

    spec: SourceSpec
    store: Any  # a Sequence of raw records with .batch(a, b) (llava/data/index.py, stores.py)
    digest: str
    summary: SourceSummary = field(default_factory=SourceSummary)

    @property
    def image_folder(self) -> str | None:
        return self.spec.image_folder

    @property
    def video_folder(self) -> str | None:
        return self.spec.video_folder


@dataclass
class MixtureRows:
    """What the dataset holds per sample: its source number, its raw row there, its length and modality; plus the
    problems (invalid records) and dropped samples of the rows the mixture takes."""

    source: np.ndarray
    rows: np.ndarray
    lengths: np.ndarray
    has_image: np.ndarray
    problems: list[tuple[str, str, str]]
    dropped: list[tuple[str, str, str]]
    has_video: np.ndarray | None = None  # None when no source's index has the field


def take_rows(sources: list[Source], indexes: list, seed: int) -> MixtureRows:
    """Each source's sampled rows joined with its index (``index.DatasetIndex``): the samples that train, in source
    order, and the problems of the rows taken (a mixture's messages name the entry). The per-sample arrays are
    written once into arrays of the mixture's size (no per-source copies concatenated: millions of samples), in the
    narrowest integer types, and each index's arrays are released once copied: the indexes are spent."""
    picks, problems, dropped = [], [], []
    for src, index in zip(sources, indexes):
        spec = src.spec
        available = len(src.store)
        s = src.summary
        s.available = available
        if spec.strategy == "all" and spec.repeat == 1:  # every row once: the index as it is
            rows, pos = index.keep, None
            taken = np.ones(available, bool)
            s.taken = available
        else:
            picked = select_rows(spec, available, seed)
            s.taken = len(picked)
            where = np.full(available, -1, np.int64)
            where[index.keep] = np.arange(len(index.keep))
            pos = where[picked]
            rows, pos = picked[pos >= 0], pos[pos >= 0]
            del where
            taken = np.zeros(available, bool)
            taken[picked] = True
        prefix = "" if spec.entry is None else f"{spec.label}: "
        for out, entries, at in ((problems, index.problems, index.problem_rows),
                                 (dropped, index.dropped, index.dropped_rows)):
            for (kind, message, rid), row in zip(entries, at):
                if taken[row]:
                    out.append((kind, prefix + message, rid))
        s.problems = int(taken[index.problem_rows].sum()) if len(index.problem_rows) else 0
        s.dropped = int(taken[index.dropped_rows].sum()) if len(index.dropped_rows) else 0
        del taken
        picks.append((rows, pos))
    total = sum(len(rows) for rows, _ in picks)
    any_video = any(index.has_video is not None for index in indexes)
    # the narrowest integer types that hold every source number and every raw row (int8 / int32 in practice)
    source_type = np.int8 if len(sources) < 2**7 else np.int16 if len(sources) < 2**15 else np.int32
    row_type = np.int32 if max((len(src.store) for src in sources), default=0) < 2**31 else np.int64
    mix = MixtureRows(np.empty(total, source_type), np.empty(total, row_type), np.empty(total, np.int32),
                      np.empty(total, bool), problems, dropped, np.empty(total, bool) if any_video else None)
    last_use = {id(index): number for number, index in enumerate(indexes)}  # a file listed twice shares one index
    at = 0
    for number, (src, index, (rows, pos)) in enumerate(zip(sources, indexes, picks)):
        part = slice(at, at + len(rows))
        lengths, has_image = (index.lengths, index.has_image) if pos is None else (index.lengths[pos],
                                                                                  index.has_image[pos])
        has_video = (np.zeros(len(rows), bool) if index.has_video is None
                     else index.has_video if pos is None else index.has_video[pos])
        mix.source[part], mix.rows[part], mix.lengths[part], mix.has_image[part] = number, rows, lengths, has_image
        if mix.has_video is not None:
            mix.has_video[part] = has_video
        s = src.summary
        s.trainable, s.image, s.video = len(rows), int(has_image.sum()), int(has_video.sum())
        s.text, s.tokens = s.trainable - int((has_image | has_video).sum()), int(lengths.sum(dtype=np.int64))
        at += len(rows)
        # this source's index arrays are copied: let them go now (unless a later entry shares the index), so the
        # peak holds one source's index beside the mixture's arrays rather than all of them (the caller reads no
        # index array after this)
        picks[number] = None
        del rows, pos, lengths, has_image, has_video
        if last_use[id(index)] == number:
            index.keep = index.lengths = index.has_image = index.has_video = None
    return mix


def mixture_table(sources: list[Source]) -> str:
    """The per-source start-up table: records available, taken by the strategy, trainable, modality, tokens."""
    head = ("source", "sampling", "available", "taken", "trainable", "image", "video", "text-only", "tokens")
    lines = [head]
    for src in sources:
        s = src.summary
        lines.append((src.spec.label, src.spec.sampling, f"{s.available:,}", f"{s.taken:,}", f"{s.trainable:,}",
                      f"{s.image:,}", f"{s.video:,}", f"{s.text:,}", f"{s.tokens:,}"))
    total = [sum(getattr(src.summary, k) for src in sources) for k in ("available", "taken", "trainable", "image",
                                                                         "video", "text", "tokens")]
    if len(sources) > 1:
        lines.append(("total", "", *(f"{t:,}" for t in total)))
    widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(row, widths))) for row in lines)



def open_sources(specs: list[SourceSpec], settings, tokenizer, template, *, cache_dir: str | os.PathLike | None,
                 workers: int, show_progress: bool) -> tuple[list[Source], list]:
    """Each source's raw-record store and index (``index.load_or_build_index`` with the source's own image and video
    folders: cached per source); a file listed twice with the same folders is opened and indexed once."""
    sources, indexes, memo = [], [], {}
    digests = [cached_digest(spec.path, cache_dir) for spec in specs]
    if cache_dir:  # the JSON sources' Arrow files made side by side (one process each), then indexed in turn
        convert_sources([(spec.path, digest) for spec, digest in zip(specs, digests)], cache_dir, workers)
    for spec, digest in zip(specs, digests):
        own = replace(settings, image_folder=spec.image_folder, video_folder=spec.video_folder)
        key = (digest, json.dumps(own.__dict__, sort_keys=True, default=str))
        if key not in memo:
            if cache_dir:
                store = open_records(spec.path, cache_dir, digest)
            else:
                problems = ProblemLog(max_examples=1 << 30)
                records = load_raw_records(spec.path, problems)
                store = InMemoryRecords(records, list(zip(problems.ids.get("invalid_json", []),
                                                          problems.examples.get("invalid_json", []))))
            memo[key] = store, load_or_build_index(store, digest, tokenizer, template, own, cache_dir=cache_dir,
                                                   workers=workers, show_progress=show_progress,
                                                   desc=f"indexing {Path(spec.path).name}")
        store, index = memo[key]
        sources.append(Source(spec, store, digest))
        indexes.append(index)
    return sources, indexes

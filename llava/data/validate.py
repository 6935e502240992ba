"""Dataset validation shared by ``llava data check`` (``check.py``) and training (``LazySupervisedDataset``).

    problems = ProblemLog()
    raw = load_raw_records("data.jsonl", problems)          # bad JSONL lines -> problems["invalid_json"], skipped
    record = parse_record(raw[0], 0)                        # llava/data/records.py: RecordError(kind, ...)
    found = record_image_problem(record, "images/")         # (kind, message) | None: stat only, no decode
    problems.add(kind, message, record_id)                  # counts by kind + the first ids and messages

One reader of data files (JSON list, JSONL, a ``datasets`` directory), one problem log, one naming of image
problems (``image_missing``, ``image_outside_folder``, ``image_absolute_path``, ``image_unreadable``, ...) and one
existence check. The checker adds image decoding in a thread pool and statistics; the dataset stops
(``--on_bad_sample error``) or drops (``skip``) what this module finds. Nothing here imports the dataset or the
checker, so neither imports the other.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    check_image_ref,
    open_image_ref,
    open_image_rgb,
    resolve_image_path,
)
from llava.data.records import EmbeddedImage, Record
from llava.data.stores import is_table_store, open_table_store, parquet_files
from llava.errors import UsagePathError, UsageValueError


class DataError(UsageValueError):
    """Problems found in the data before training; the message is a per-kind report."""


@dataclass
class ProblemLog:
    """Counts of problems by kind, with the first few record ids and messages of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, kind: str, message: str, record_id: str | None = None) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(message)
            self.ids.setdefault(kind, []).append(record_id if record_id is not None else "?")

    def report(self) -> str:
        lines = []
        for kind, n in self.counts.most_common():
            lines.append(f"  {kind}: {n} record(s), e.g.")
            lines += [f"    - {m}" for m in self.examples[kind]]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": self.examples}


def iter_jsonl(path: str | os.PathLike, with_lines: bool = False):
    """``(line_no, record, None)`` per non-blank line, or ``(line_no, None, JSONDecodeError)`` for a bad one;
    ``with_lines``: ``(line_no, record, err, line)``, the line's text too."""
    with Path(path).open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record, err = json.loads(line), None
            except json.JSONDecodeError as error:
                record, err = None, error
            yield (line_no, record, err, line) if with_lines else (line_no, record, err)


def jsonl_error(path: str | os.PathLike, line_no: int, err: json.JSONDecodeError) -> str:
    return f"{path}, line {line_no}: invalid JSON ({err.msg} at column {err.colno})"


def load_raw_records(data_path: str | os.PathLike, problems: ProblemLog | None = None,
                     line_numbers: list[int] | None = None):
    """A JSON list, a JSONL file, Parquet file(s) or a ``datasets`` directory -> an indexable sequence of raw dicts.

    A JSONL line that is not JSON raises ``DataError``, or, when ``problems`` is given, is logged there as
    ``invalid_json`` (record id ``line N``) and skipped. ``line_numbers`` (JSONL) receives each kept record's line.
    """
    path = Path(data_path)
    if is_table_store(path):  # Parquet file(s) or a `datasets` directory: read in place (llava/data/stores.py)
        return open_table_store(path if parquet_files(path) else require_saved_dataset(path))
    if not path.is_file():
        raise UsagePathError(f"--data_path {data_path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        for line_no, record, err in iter_jsonl(path):
            if err is None:
                records.append(record)
                if line_numbers is not None:
                    line_numbers.append(line_no)
                continue
            message = jsonl_error(path, line_no, err)
            if problems is None:
                raise DataError(message) from err
            problems.add("invalid_json", message, f"line {line_no}")
        return records
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def require_saved_dataset(path: str | os.PathLike) -> Path:
    """A ``--data_path`` directory must be what ``datasets``' ``save_to_disk`` writes (its ``state.json`` or
    ``dataset_dict.json``), else a one-line error (``datasets`` itself raises a bare ``FileNotFoundError``)."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise DataError(f"--data_path {path} is a directory that `datasets` did not save (no state.json or "
                        f"dataset_dict.json) and holds no .parquet file: give a LLaVA JSON/JSONL file, Parquet "
                        f"file(s) or a `save_to_disk` directory")
    return path


def image_problem_kind(err: ImageLoadError) -> str:
    """The report kind of an image error: ``image_<kind>`` (a directory counts as missing)."""
    return "image_" + {"not_a_file": "missing", "invalid_path": "absolute_path"}.get(err.kind, err.kind)


def record_image_problem(record: Record, image_folder: str | os.PathLike | None) -> tuple[str, str] | None:
    """``(kind, message)`` of the first problem with ``record``'s images found without decoding them (no
    ``--image_folder``, a missing file, a path outside the folder), or ``None``."""
    if not image_folder and any(isinstance(ref, str) for ref in record.images):
        return "no_image_folder", f"record {record.id!r} has images but --image_folder is not set"
    for rel in record.images:
        try:
            check_image_ref(image_folder, rel)  # embedded bytes: their header is read
        except ImageLoadError as err:
            return image_problem_kind(err), f"record {record.id!r}: {err}"
    return None


def check_one_image(image_folder: str | os.PathLike, rel: str, decode: bool = True,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Any, list[str]]:
    """``((width, height) | None, notes)`` or an :class:`ImageLoadError`, returned (not raised) for a thread pool."""
    try:
        if not decode:
            check_image_ref(image_folder, rel)
            return None, []
        if isinstance(rel, EmbeddedImage):
            image, notes = open_image_ref(image_folder, rel, max_pixels=max_pixels)
        else:
            image, notes = open_image_rgb(resolve_image_path(image_folder, rel), max_pixels=max_pixels)
        return image.size, notes
    except ImageLoadError as err:
        return err, []

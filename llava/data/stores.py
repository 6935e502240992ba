"""Raw records read in place, nothing converted or written: Parquet files and ``datasets`` ``save_to_disk`` directories.

    store = open_table_store("LLaVA-OneVision-Data/")     # a .parquet file, a directory of them, or a saved dataset
    len(store), store[17], store.batch(0, 256)             # rows as raw dicts, image bytes kept as bytes

LLaVA-OneVision-Data ships Parquet files whose ``image`` column holds ``{"bytes", "path"}`` structs (the ``datasets``
``Image`` feature's storage); a ``save_to_disk`` directory with an ``Image`` feature stores the same. Rows come back
as stored (Arrow -> Python), never decoded to pixels here: ``records.parse_record`` turns the bytes into
``EmbeddedImage`` values, which the dataset decodes per sample in its DataLoader workers
(``images.open_image_ref``). Each row carries ``records.ORIGIN_KEY`` = ``"<file>#row=<n>"`` so that an image that
does not decode is named with its source file and row besides the record id.

Random access in a Parquet file reads the row group holding the row (its columns, decompressed): a few row groups
are kept per process, so consecutive reads in one group cost one read. Smaller row groups mean cheaper random reads.
Both stores pickle as their path (DataLoader workers and index worker processes reopen the files).

A ``DatasetDict.save_to_disk`` directory (``dataset_dict.json`` + one folder per split) gives its ``train`` split;
another split is named by its folder, ``DIR/validation`` (each split folder is itself a ``save_to_disk`` dataset).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava.data.records import ORIGIN_KEY
from llava.errors import UsageValueError

ROW_GROUPS_KEPT = 4  # row groups held per process for random access
DEFAULT_SPLIT = "train"  # the split a DatasetDict directory gives (another one: its folder, DIR/<split>)


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of ``path`` (itself, or every ``*.parquet`` below a directory, sorted); [] for other paths."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if p.is_file())
    return []


def is_table_store(path: str | os.PathLike) -> bool:
    """A Parquet file or directory of them, or a ``save_to_disk`` directory (records read in place)."""
    path = Path(path)
    return bool(parquet_files(path)) or path.is_dir()


def open_table_store(path: str | os.PathLike) -> ParquetRecords | SavedDatasetRecords:
    """The store for a Parquet file / directory, else a ``save_to_disk`` directory (checked by the caller)."""
    return ParquetRecords(path) if parquet_files(path) else SavedDatasetRecords(path)


class ParquetRecords(Sequence):
    """Rows of one Parquet file or of every ``*.parquet`` file below a directory, in sorted file order."""

    def __init__(self, path: str | os.PathLike):
        import pyarrow.parquet as pq  # pyarrow's Parquet reader only when a Parquet source is read

        self.path = str(path)
        self.bad_lines: list[tuple[str, str]] = []
        self.files = parquet_files(path)
        root = Path(path) if Path(path).is_dir() else Path(path).parent
        self.names = [str(f.relative_to(root)) for f in self.files]
        groups = []  # (file number, row group number, rows)
        for k, f in enumerate(self.files):
            meta = pq.ParquetFile(f).metadata
            groups += [(k, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self._group_file = np.array([g[0] for g in groups], np.int64)
        self._group_number = np.array([g[1] for g in groups], np.int64)
        sizes = np.array([g[2] for g in groups], np.int64)
        self._group_start = np.concatenate([[0], np.cumsum(sizes)])  # global row of each group's first row
        file_rows = np.zeros(len(self.files) + 1, np.int64)  # global row of each file's first row
        np.add.at(file_rows, self._group_file + 1, sizes)
        self._file_start = np.cumsum(file_rows)
        self._open: dict[int, Any] = {}
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def _rows_of_group(self, g: int) -> list[dict]:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own file handles
            self._open, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        rows = self._cache.get(g)
        if rows is None:
            import pyarrow.parquet as pq  # as in __init__: only for Parquet sources

            k = int(self._group_file[g])
            if k not in self._open:
                self._open[k] = pq.ParquetFile(self.files[k])
            rows = self._open[k].read_row_group(int(self._group_number[g])).to_pylist()
            first = int(self._group_start[g] - self._file_start[k])
            for n, row in enumerate(rows):
                row[ORIGIN_KEY] = f"{self.names[k]}#row={first + n}"
            self._cache[g] = rows
            while len(self._cache) > ROW_GROUPS_KEPT:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return rows

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        g = int(np.searchsorted(self._group_start, i, side="right")) - 1
        return dict(self._rows_of_group(g)[i - int(self._group_start[g])])

    def batch(self, start: int, stop: int) -> list[dict]:
        out: list[dict] = []
        g = int(np.searchsorted(self._group_start, start, side="right")) - 1
        while start < stop:
            first = int(self._group_start[g])
            rows = self._rows_of_group(g)
            take = rows[start - first: stop - first]
            out += [dict(r) for r in take]
            start += len(take)
            g += 1
        return out

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class SavedDatasetRecords(Sequence):
    """A ``save_to_disk`` directory (Arrow, memory-mapped by ``datasets``); rows as stored: an ``Image`` feature stays
    ``{"bytes", "path"}`` (read through Arrow, never decoded to PIL here)."""

    def __init__(self, path: str | os.PathLike):
        import datasets  # datasets (slow to import) only for a `datasets` directory

        self.path = str(path)
        self.bad_lines: list[tuple[str, str]] = []
        split_dir = saved_split_dir(path)
        self._ds = datasets.load_from_disk(str(split_dir)).with_format("arrow")
        in_dict = (split_dir.parent / "dataset_dict.json").is_file()  # a DatasetDict's split: "dict/split#row=N"
        self._origin = f"{split_dir.parent.name}/{split_dir.name}" if in_dict else split_dir.name

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Any:
        return self.batch(int(i), int(i) + 1)[0]

    def batch(self, start: int, stop: int) -> list[Any]:
        rows = self._ds[start:stop].to_pylist()
        for n, row in enumerate(rows):
            row[ORIGIN_KEY] = f"{self._origin}#row={start + n}"
        return rows

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def saved_split_dir(path: str | os.PathLike) -> Path:
    """The ``save_to_disk`` folder of one dataset: ``path`` itself, or a ``DatasetDict`` directory's ``train`` split;
    a one-line error naming its ``dataset_dict.json`` and the splits it lists when it has no ``train``."""
    path = Path(path)
    listing = path / "dataset_dict.json"
    if not listing.is_file():
        return path
    splits = [str(s) for s in json.loads(listing.read_text()).get("splits", [])]
    if DEFAULT_SPLIT not in splits:
        example = f"e.g. {path / splits[0]}" if splits else "it lists none"
        raise UsageValueError(f"{listing}: a DatasetDict with no '{DEFAULT_SPLIT}' split (its splits: "
                              f"{', '.join(splits) or 'none'}); give one split's folder as the path, {example}")
    return path / DEFAULT_SPLIT

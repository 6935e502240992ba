"""The dataset index, computed once and shared: exact lengths, modality and validation of every record, cached.

    store = open_records("llava_665k.json", cache_dir)     # raw records, memory-mapped Arrow (one copy per node)
    index = load_or_build_index(store, settings, tokenizer, template, cache_dir=cache_dir, workers=8)
    index.keep, index.lengths, index.has_image, index.problems, index.dropped

Building the index parses, templates and tokenizes every record and checks its image paths (``stat`` only): minutes
for LLaVA-665K, the same again on every start, resume and rank when done one record at a time. Here it is done once,
in parallel worker processes (chunks of records, progress bar; ``index_batch.py``: one batched fast-tokenizer call
per 256 records, lengths without label lists, equal to the per-record path), and stored in
``<cache_dir>/index-<key>.npz``. The key is a SHA-256 of everything the result depends on: the data file's content
hash, the tokenizer (its full serialisation and special tokens), the template, the image settings (image token id
and count, ``<im_start>`` wrapping, image folder), ``--model_max_length``, and the source of the code that computes
it (records, templates, tokenize, images, validate, anyres, index_batch, this module). A changed input gives another
key, so a stale index is never found; the key is also stored inside the file and checked. Image existence can change
without the data changing: the index keeps the modification times of the directories holding the referenced images
and is rebuilt when one changed (a file added or removed there). Images that break after indexing are still caught
at load time (the sample is replaced and counted).

Raw records: JSON and JSONL files are converted once (in a child process, so the parent never holds the parsed list;
a mixture's sources in ``--index_workers`` children side by side, ``convert_sources``)
into an Arrow file of one JSON string per record (a JSONL line as written),
``<cache_dir>/records-<content hash>.arrow``, opened memory-mapped through ``datasets`` (every rank of a node maps the
same pages); a ``save_to_disk`` directory is already Arrow and is opened as is. Invalid JSONL lines are counted as
``invalid_json`` problems, as before.
Under several processes the caller builds inside :func:`local_main_first`: the local main process computes and writes,
the others read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llava.data.index_batch import index_records
from llava.data.stores import SavedDatasetRecords, is_table_store, open_table_store, parquet_files  # noqa: F401
from llava.data.validate import DataError, iter_jsonl, load_raw_records, require_saved_dataset

logger = logging.getLogger(__name__)

INDEX_FORMAT = 2
_CODE_MODULES = ("records", "templates", "chat_templates", "tokenize", "images", "validate", "anyres", "index",
                 "index_batch", "video", "word_cache")
CHUNK = 2048  # records per worker task


@contextlib.contextmanager
def local_main_first():
    """Under an initialised process group, the node's local rank 0 runs the block first (it builds and caches the
    index), the other local ranks after it (they read the cache); a plain block otherwise. The barrier is in a
    ``finally``, so a failure on rank 0 releases the others, which then meet the same error themselves."""
    # torch only under a process group (the index's worker processes import this module)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    try:
        yield
    finally:
        if first:
            dist.barrier()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_CACHE", Path.home() / ".cache" / "llava"))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def cached_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> str:
    """:func:`file_digest` of ``path``, remembered in ``<cache_dir>/digests/`` under the files' metadata (real path,
    size, mtime_ns, inode of the file, or of every file of a directory): a restart reads metadata, not the bytes.
    Any write to a file changes its mtime, hence the metadata key, hence a fresh hash."""
    if not cache_dir:
        return file_digest(path)
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()]]
    stamp = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    memo = Path(cache_dir) / "digests" / f"{stamp}.txt"
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = file_digest(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError as err:
        logger.warning("could not remember the digest of %s in %s: %s", path, memo.parent, err)
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None)]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Of the indexing code as first read by this process (an edit while it runs does not change its key)."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / f"{m}.py").read_bytes() for m in _CODE_MODULES)).hexdigest()


# ---------------------------------------------------------------- raw records, memory-mapped

class ArrowRecords(Sequence):
    """Raw records of a JSON/JSONL file: one JSON string per record in a memory-mapped Arrow file (via ``datasets``).
    Pickles as its path, so DataLoader workers map the same file instead of copying records."""

    def __init__(self, arrow_path: str | os.PathLike, bad_lines: list[tuple[str, str]] | None = None):
        # datasets (slow to import) only for a `datasets` directory
        import datasets

        self.path = str(arrow_path)
        self.bad_lines = bad_lines or []
        self._column = datasets.Dataset.from_file(self.path).data.column("json")

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, i: int) -> Any:
        return json.loads(self._column[i].as_py())

    def batch(self, start: int, stop: int) -> list[Any]:
        return [json.loads(s) for s in self._column.slice(start, stop - start).to_pylist()]

    def __getstate__(self):
        return {"path": self.path, "bad_lines": self.bad_lines}

    def __setstate__(self, state):
        self.__init__(state["path"], state["bad_lines"])


class InMemoryRecords(Sequence):
    """Raw records as loaded in memory (no cache directory): a list, or a ``datasets`` dataset; plus the JSONL lines
    that were not JSON."""

    def __init__(self, records, bad_lines: list[tuple[str, str]]):
        self.records = records
        self.bad_lines = bad_lines

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        return self.records[int(i)]


def open_records(data_path: str | os.PathLike, cache_dir: str | os.PathLike, digest: str | None = None):
    """The records of ``data_path`` as a memory-mapped sequence (converted to Arrow on first use)."""
    path = Path(data_path)
    if is_table_store(path):  # Parquet / a `datasets` directory: already columnar, read in place
        return open_table_store(path if parquet_files(path) else require_saved_dataset(path))
    if not path.is_file():
        raise FileNotFoundError(f"--data_path {data_path} does not exist")
    digest = digest or file_digest(path)
    arrow = _arrow_path(cache_dir, digest)
    if not _converted(arrow):
        _finish_conversion(*_start_conversion(path, arrow))
    bad_lines = [tuple(x) for x in json.loads(arrow.with_suffix(".json").read_text())["bad_lines"]]
    return ArrowRecords(arrow, bad_lines)


def convert_sources(paths_digests: list[tuple[str | os.PathLike, str]], cache_dir: str | os.PathLike,
                    workers: int = 0) -> None:
    """Convert the JSON/JSONL files among ``(path, digest)`` whose Arrow file is not in ``cache_dir`` yet, up to
    ``workers`` at a time (0: one per CPU, at most 8), each in its own child process, as :func:`open_records` would
    one after the other (the same files; the first error is raised once every started conversion has ended).
    Paths that are not files, or are Parquet / ``datasets`` stores, are left to :func:`open_records`."""
    todo: dict[Path, Path] = {}
    for path, digest in paths_digests:
        path = Path(path)
        arrow = _arrow_path(cache_dir, digest)
        if path.is_file() and not is_table_store(path) and not _converted(arrow):
            todo.setdefault(arrow, path)
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    running: list[tuple] = []
    errors: list[BaseException] = []
    for arrow, path in todo.items():
        if len(running) >= workers:
            _finish_into(running.pop(0), errors)
        running.append(_start_conversion(path, arrow))
    while running:
        _finish_into(running.pop(0), errors)
    if errors:
        raise errors[0]


def _arrow_path(cache_dir: str | os.PathLike, digest: str) -> Path:
    return Path(cache_dir) / f"records-{digest}.arrow"


def _converted(arrow: Path) -> bool:
    return arrow.is_file() and arrow.with_suffix(".json").is_file()


def _start_conversion(source: Path, arrow: Path) -> tuple:
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_convert_in_child, args=(str(source), str(arrow), queue))
    child.start()
    return child, queue


def _finish_conversion(child, queue) -> None:
    error = queue.get()
    child.join()
    if error is not None:
        raise DataError(error)


def _finish_into(started: tuple, errors: list[BaseException]) -> None:
    try:
        _finish_conversion(*started)
    except DataError as err:
        errors.append(err)


def _convert_in_child(source: str, arrow: str, queue) -> None:
    try:
        convert_to_arrow(source, arrow)
        queue.put(None)
    except DataError as err:
        queue.put(str(err))
    except Exception as err:  # the parent raises it with the message; the child's traceback is logged
        logger.exception("converting %s to Arrow failed", source)
        queue.put(f"{source}: {type(err).__name__}: {err}")


def convert_to_arrow(source: str | os.PathLike, arrow: str | os.PathLike, batch: int = 10_000) -> None:
    """JSONL (streamed) or a JSON list -> an Arrow stream file of one JSON string per record (a JSONL record's line
    as written, a list's records in compact JSON) + the bad lines."""
    # pyarrow only when JSON records are converted to Arrow
    import pyarrow as pa

    source, arrow = Path(source), Path(arrow)
    arrow.parent.mkdir(parents=True, exist_ok=True)
    tmp = arrow.with_name(f"{arrow.name}.{os.getpid()}.tmp")
    schema = pa.schema([("json", pa.large_string())])
    bad_lines: list[tuple[str, str]] = []  # (record id "line N", message)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        rows: list[str] = []

        def flush():
            writer.write_batch(pa.record_batch([pa.array(rows, pa.large_string())], schema=schema))
            rows.clear()

        if source.suffix == ".jsonl":
            for line_no, _, err, line in iter_jsonl(source, with_lines=True):
                if err is not None:
                    bad_lines.append((f"line {line_no}",
                                      f"{source}, line {line_no}: invalid JSON ({err.msg} at column {err.colno})"))
                    continue
                rows.append(line.strip())  # valid JSON, stored as written (parsed again on use)
                if len(rows) >= batch:
                    flush()
        else:
            for record in load_raw_records(source):
                rows.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
                if len(rows) >= batch:
                    flush()
        flush()
    meta = arrow.with_suffix(".json")
    meta_tmp = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps({"source": str(source), "bad_lines": bad_lines}))
    os.replace(tmp, arrow)
    os.replace(meta_tmp, meta)


# ---------------------------------------------------------------- the index

@dataclass(frozen=True)
class IndexSettings:
    """Everything besides data, tokenizer and template that decides a sample's tokens and validity."""

    image_folder: str | None
    image_token_id: int
    num_image_tokens: int
    model_max_length: int
    mm_use_im_start_end: bool = False
    anyres: Any = None  # llava.data.anyres.AnyresLayout: image tokens from each image's size (header read, no decode)
    video: Any = None  # llava.data.video.VideoLayout: a video's tokens from its frame count (container metadata)
    video_folder: str | None = None  # what records' "video" paths are relative to
    video_token_id: int | None = None


@dataclass
class DatasetIndex:
    keep: np.ndarray  # raw record positions that train, ascending
    lengths: np.ndarray  # their token counts after templating and image expansion (and truncation)
    has_image: np.ndarray
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, message, record id), in order
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # the same, for valid records that cannot train
    image_dirs: dict[str, int] = field(default_factory=dict)  # directory -> mtime_ns when indexed
    from_cache: bool = False
    has_video: np.ndarray | None = None  # kept samples with a video (None: an index without the field)
    problem_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # record position per problem
    dropped_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ... and per dropped sample
    records: int = 0  # records in the store (valid or not)


def index_key(digest: str, tokenizer, template, settings: IndexSettings) -> str:
    parts = {"format": INDEX_FORMAT, "data": digest, "tokenizer": tokenizer_fingerprint(tokenizer),
             "template": _template_fields(template), "settings": settings.__dict__, "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _template_fields(template) -> dict[str, Any]:
    """Every field of the template but its renderer function (whose source is in the code fingerprint)."""

    return {f.name: getattr(template, f.name) for f in dataclasses.fields(template) if f.name != "renderer"}


def load_or_build_index(store, digest: str, tokenizer, template, settings: IndexSettings, *,
                        cache_dir: str | os.PathLike | None, workers: int = 0, show_progress: bool = True,
                        desc: str = "indexing") -> DatasetIndex:
    """The cached index when its key and image directories still match, else a fresh one (then cached)."""
    key = index_key(digest, tokenizer, template, settings)
    path = Path(cache_dir) / f"index-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        index = _read_index(path, key)
        if index is not None and _image_dirs_unchanged(index.image_dirs):
            return index
        logger.info("dataset index %s is stale (image folder changed): rebuilding", path)
    index = build_index(store, tokenizer, template, settings, workers=workers, show_progress=show_progress, desc=desc)
    if path is not None:
        try:
            _write_index(path, key, index)
        except OSError as err:
            logger.warning("could not cache the dataset index in %s: %s", path.parent, err)
    return index


def build_index(store, tokenizer, template, settings: IndexSettings, *, workers: int = 0, show_progress: bool = True,
                desc: str = "indexing") -> DatasetIndex:
    """Index every record of ``store`` (chunks in ``workers`` processes; 0: one per CPU, at most 8; 1: in-process)."""
    n = len(store)
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    workers = workers or min(8, os.cpu_count() or 1)
    workers = min(workers, len(bounds))
    results = []
    with tqdm(total=n, desc=desc, disable=not show_progress, unit="rec") as bar:
        if workers <= 1:
            _init_worker(store, tokenizer, template, settings)
            for a, b in bounds:
                results.append(_index_chunk((a, b)))
                bar.update(b - a)
        else:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(store, tokenizer, template, settings, True)) as pool:
                for (a, b), result in zip(bounds, pool.map(_index_chunk, bounds)):
                    results.append(result)
                    bar.update(b - a)
    keep = np.concatenate([r["keep"] for r in results]) if results else np.zeros(0, np.int64)
    index = DatasetIndex(
        keep=keep.astype(np.int64),
        lengths=np.concatenate([r["lengths"] for r in results]).astype(np.int32) if results else np.zeros(0, np.int32),
        has_image=np.concatenate([r["has_image"] for r in results]).astype(bool) if results else np.zeros(0, bool),
        problems=[p for r in results for p in r["problems"]],
        dropped=[p for r in results for p in r["dropped"]],
        has_video=np.concatenate([r["has_video"] for r in results]).astype(bool) if results else np.zeros(0, bool),
        problem_rows=np.concatenate([np.zeros(0, np.int64)] + [r["problem_rows"] for r in results]),
        dropped_rows=np.concatenate([np.zeros(0, np.int64)] + [r["dropped_rows"] for r in results]),
        records=n,
    )
    dirs = sorted({d for r in results for d in r["image_dirs"]})
    index.image_dirs = {d: _mtime_ns(d) for d in dirs}
    return index


_WORKER: dict[str, Any] = {}


def _init_worker(store, tokenizer, template, settings, in_pool: bool = False) -> None:
    if in_pool:  # the pool's processes are the parallelism: no tokenizer threads on top (one core each)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        gc.freeze()  # the objects inherited from the parent (model, libraries) are left out of every collection
    _WORKER.update(store=store, tokenizer=tokenizer, template=template, settings=settings)


def _index_chunk(bounds: tuple[int, int]) -> dict[str, Any]:
    """Records ``[a, b)`` indexed by ``index_batch.index_records`` (one batched tokenizer call for the chunk)."""

    store = _WORKER["store"]
    a, b = bounds
    raws = store.batch(a, b) if hasattr(store, "batch") else [store[i] for i in range(a, b)]
    return index_records(raws, a, _WORKER["tokenizer"], _WORKER["template"], _WORKER["settings"])


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _image_dirs_unchanged(dirs: dict[str, int]) -> bool:
    return all(_mtime_ns(d) == t for d, t in dirs.items())


def _write_index(path: Path, key: str, index: DatasetIndex) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "format": INDEX_FORMAT, "problems": index.problems, "dropped": index.dropped,
            "image_dirs": index.image_dirs, "records": index.records}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, keep=index.keep, lengths=index.lengths, has_image=index.has_image, has_video=index.has_video,
             problem_rows=index.problem_rows, dropped_rows=index.dropped_rows,
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    os.replace(tmp, path)


def _read_index(path: Path, key: str) -> DatasetIndex | None:
    try:
        with np.load(path) as f:
            meta = json.loads(f["meta"].tobytes().decode())
            if meta.get("key") != key or meta.get("format") != INDEX_FORMAT:
                logger.warning("%s does not hold the index it is named for: ignored", path)
                return None
            return DatasetIndex(keep=f["keep"], lengths=f["lengths"], has_image=f["has_image"],
                                problems=[tuple(p) for p in meta["problems"]],
                                dropped=[tuple(p) for p in meta["dropped"]], image_dirs=meta["image_dirs"],
                                from_cache=True, has_video=f["has_video"] if "has_video" in f else None,
                                problem_rows=f["problem_rows"], dropped_rows=f["dropped_rows"],
                                records=meta["records"])
    except (OSError, ValueError, KeyError) as err:
        logger.warning("could not read the dataset index %s (%s): rebuilding", path, err)
        return None

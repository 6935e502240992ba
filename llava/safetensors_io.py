"""Streaming safetensors reader and writers: one tensor at a time, no mmap, so memory stays at what is in use.

    reader = SafetensorsReader("model.safetensors"); reader.meta("lm_head.weight"); reader.get("lm_head.weight")
    writer = HFShardWriter(out_dir, {name: (dtype, shape), ...}, max_shard_bytes=parse_size("2GB"))
    writer.write(name, tensor) ...; writer.close()       # model.safetensors, or model-0000i-of-0000n + index

``SafetensorsReader`` parses a file's header (names, dtypes, shapes) and reads one tensor with ``pread``.
``SafetensorsWriter`` takes the full list of (name, dtype, shape) up front, writes the header, then accepts
tensors in any order and writes each straight to its offset. ``HFShardWriter`` is the one writer of Hugging Face
sharded checkpoints in the package (``llava merge``'s streaming path, ``llava convert mcore2hf``): it splits a
known layout into ``max_shard_bytes`` files in layout order and writes ``model.safetensors.index.json``. The files
are ordinary safetensors files (``safetensors.safe_open`` and ``transformers`` read them). Tested in
``tests/megatron/converter/test_megatron_ops_config.py`` and, through merge and conversion, ``tests/export/test_merge.py``
and ``tests/megatron/converter/test_megatron_roundtrip.py``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    """Header-first reader: ``meta(name)`` costs nothing, ``get(name)`` reads exactly one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.metadata = header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entries[name]
        return DTYPES[entry["dtype"]], tuple(entry["shape"])

    def get(self, name: str) -> torch.Tensor:
        dtype, shape = self.meta(name)
        begin, end = self._entries[name]["data_offsets"]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = bytearray(end - begin)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], self._data_start + begin + got)
                if n <= 0:
                    raise OSError(f"{self.path}: short read for tensor {name!r}")
                got += n
        finally:
            os.close(fd)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class SafetensorsWriter:
    """Writer with a known layout: header first, then each tensor written at its offset as it arrives."""

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = os.fspath(path)
        self.layout = dict(layout)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._offsets: dict[str, int] = {}
        for name in sorted(self.layout):
            dtype, shape = self.layout[name]
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[name] = offset
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.layout:
            raise KeyError(f"{self.path}: tensor {name!r} is not in the planned layout")
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: {name!r} planned as {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view, done = memoryview(data), 0
            while done < len(view):  # pwrite may write less than asked (2 GiB cap on Linux)
                done += os.pwrite(fd, view[done:], self._data_start + self._offsets[name] + done)
        finally:
            os.close(fd)
        self._written.add(name)

    def missing(self) -> list[str]:
        return sorted(set(self.layout) - self._written)


def parse_size(text: str) -> int:
    """``"2GB"`` / ``"500MiB"`` / ``"1000"`` -> bytes (powers of 10 for KB/MB/GB, of 2 for KiB/MiB/GiB)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


class HFShardWriter:
    """A Hugging Face safetensors checkpoint of a known layout, written tensor by tensor at its offset.

    Tensors go to files in the layout's order, a new file when the next tensor would pass ``max_shard_bytes``
    (a tensor larger than that gets a file of its own). One file is ``model.safetensors``; several are
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (``total_size``, sorted weight map).
    """

    def __init__(self, out_dir: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.out_dir = os.fspath(out_dir)
        groups: list[list[str]] = [[]]
        used = self.total_size = 0
        for name, (dtype, shape) in layout.items():
            size = _nbytes(dtype, shape)
            if groups[-1] and used + size > max_shard_bytes:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
            self.total_size += size
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.file_of = {name: file for file, group in zip(names, groups) for name in group}
        os.makedirs(self.out_dir, exist_ok=True)
        self.writers = {file: SafetensorsWriter(os.path.join(self.out_dir, file),
                                                {name: layout[name] for name in group})
                        for file, group in zip(names, groups)}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.file_of:
            raise KeyError(f"{self.out_dir}: tensor {name!r} is not in the planned layout")
        self.writers[self.file_of[name]].write(name, tensor)

    def close(self) -> None:
        """Check every planned tensor was written; write the index when there are several files."""
        missing = [m for w in self.writers.values() for m in w.missing()]
        if missing:
            raise RuntimeError(f"{self.out_dir}: tensors planned but never written: {missing[:5]}")
        if len(self.writers) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.file_of.items()))}
            path = os.path.join(self.out_dir, "model.safetensors.index.json")
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps(index, indent=2) + "\n")
            os.replace(path + ".tmp", path)


def atomic_save_safetensors(state: dict, path: str | os.PathLike) -> Path:
    """Write a state dict as safetensors through ``path.tmp``, refusing zero-size tensors (un-gathered ZeRO-3
    shards)."""
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"refusing to write zero-size tensors {empty[:5]} to {path}: gather ZeRO-3 parameters first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path

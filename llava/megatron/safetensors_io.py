"""Streaming safetensors reader and writer: one tensor at a time, no mmap, so memory stays at what is in use.

``SafetensorsReader`` parses a file's header (names, dtypes, shapes) and reads one tensor with ``pread``.
``SafetensorsWriter`` takes the full list of (name, dtype, shape) up front, writes the header, then accepts
tensors in any order and writes each straight to its offset. The files are ordinary safetensors files
(``safetensors.safe_open`` and ``transformers`` read them). Tested in ``tests/megatron/test_safetensors_io.py``.
"""

from __future__ import annotations

import json
import os
import struct

import torch

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

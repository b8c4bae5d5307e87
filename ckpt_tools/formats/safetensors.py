"""safetensors: the header is parsed and validated here, without torch and without tensor bytes.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then
the data area, which the tensors must tile exactly (no gaps, no overlaps, nothing after).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import Checkpoint
from ..errors import InvalidCheckpointError
from ..magic import SAFETENSORS_MAX_HEADER
from ..meta import DTYPES, TensorMeta, torch_dtype
from .ranges import read_runs, runs, slice_buffer

_FIX = "the file is damaged or not safetensors: download or convert it again"


def _bad(path: str, message: str, key: str | None = None) -> InvalidCheckpointError:
    return InvalidCheckpointError(message, path=path, key=key, fix=_FIX)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in header")
        out[k] = v
    return out


def parse_header(raw_len: bytes, read_header, file_size: int, path: str
                 ) -> tuple[dict[str, TensorMeta], dict[str, str], dict[str, tuple[int, int]], int]:
    """Validate a header. ``read_header(n)`` returns the n header bytes.

    Returns (metas, metadata, offsets relative to the data area, data start).
    """
    if len(raw_len) < 8:
        raise _bad(path, f"truncated: {file_size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw_len)
    if n > SAFETENSORS_MAX_HEADER:
        raise _bad(path, f"header length {n} is absurdly large (limit {SAFETENSORS_MAX_HEADER})")
    if 8 + n > file_size:
        raise _bad(path, f"header length {n} runs past the end of the {file_size}-byte file (truncated?)")
    raw = read_header(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise _bad(path, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise _bad(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    metas, offsets = {}, {}
    for name, entry in header.items():
        metas[name], offsets[name] = _entry(path, name, entry)
    _check_tiling(path, offsets, file_size - 8 - n)
    return metas, metadata, offsets, 8 + n


def _entry(path: str, name: str, entry) -> tuple[TensorMeta, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _bad(path, "header entry is not an object", name)
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"unknown dtype {dtype!r}", name)
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise _bad(path, f"shape {shape!r} is not a list of non-negative integers", name)
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
            or offs[0] > offs[1]):
        raise _bad(path, f"data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end", name)
    meta = TensorMeta.of(name, shape, dtype)
    expected = math.prod(shape) * DTYPES[dtype][0]
    if offs[1] - offs[0] != expected:
        raise _bad(path, f"{dtype} {shape} needs {expected:g} bytes but data_offsets span {offs[1] - offs[0]}", name)
    return meta, (offs[0], offs[1])


def _check_tiling(path: str, offsets: dict[str, tuple[int, int]], data_size: int) -> None:
    position, previous = 0, None
    for name, (begin, end) in sorted(offsets.items(), key=lambda item: item[1]):
        if begin < position:
            raise _bad(path, f"data_offsets overlap those of '{previous}'", name)
        if begin > position:
            raise _bad(path, f"gap of {begin - position} bytes before this tensor's data", name)
        position, previous = end, name
    if position > data_size:
        raise _bad(path, f"tensor data runs past the end of the file ({position} > {data_size} data bytes; truncated?)",
                   previous)
    if position < data_size:
        raise _bad(path, f"{data_size - position} unexpected bytes after the last tensor")


class SafetensorsCheckpoint(Checkpoint):
    """Header-only listing; tensors are memory-mapped through ``safe_open`` (local) or read by
    offset from a file object (remote)."""

    format = "safetensors"

    def __init__(self, source: str, fileobj: BinaryIO, file_size: int, path: Path | None = None) -> None:
        super().__init__(source)
        self._file = fileobj
        self._path = path
        self._safe = None
        fileobj.seek(0)
        self._metas, self.metadata, self._offsets, self._data_start = parse_header(
            fileobj.read(8), fileobj.read, file_size, source)
        self.header_bytes = self._data_start
        self.data_bytes_read = 0  # tensor bytes read by read_slice
        self.restore_recorded_aliases()

    def byte_span(self, key: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) of a tensor's bytes in a local file."""
        if self._path is None:
            return None
        begin, end = self._offsets[self.stored_key(key)]
        return self._path, self._data_start + begin, end - begin

    def _load_tensor(self, key: str):
        if self._path is not None:
            if self._safe is None:
                from safetensors import safe_open

                self._safe = safe_open(str(self._path), framework="pt")
            return self._safe.get_tensor(key)
        import torch

        begin, end = self._offsets[key]
        self._file.seek(self._data_start + begin)
        data = bytearray(self._file.read(end - begin))
        meta = self._metas[key]
        if not data:
            return torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
        return torch.frombuffer(data, dtype=torch_dtype(meta.dtype)).reshape(meta.shape)

    def read_slice(self, key: str, offsets, sizes, out=None):
        """The block ``[offsets, offsets + sizes)`` of a tensor; from a local file only its byte runs
        are read (a row block is one read, a column block one read per row), into ``out`` when given
        (a contiguous tensor of the block's shape and the tensor's dtype)."""
        meta = self.meta(key)
        key = self.stored_key(key)
        box = tuple(int(o) for o in offsets), tuple(int(n) for n in sizes)
        if len(box[0]) != len(meta.shape) or any(o + n > d for o, n, d in zip(*box, meta.shape, strict=True)):
            raise InvalidCheckpointError(f"a slice at {list(box[0])} of size {list(box[1])} does not fit the shape "
                                         f"{list(meta.shape)}", path=self.source, key=key,
                                         fix="check that the model's tensor has the checkpoint's shape")
        out = slice_buffer(out, box[1], meta.dtype, self.source, key)
        if self._path is None:
            out.copy_(self.tensor(key)[tuple(slice(o, o + n) for o, n in zip(*box, strict=True))])
            self.data_bytes_read += out.numel() * out.element_size()
            return out
        if out.numel():
            pieces = runs(int(DTYPES[meta.dtype][0]), box[1], meta.shape, box[0], box[1], (0,) * len(box[1]))
            self.data_bytes_read += read_runs(self._file.fileno(), self._data_start + self._offsets[key][0], pieces,
                                              out, source=self.source, key=key)
        return out

    def close(self) -> None:
        self._safe = None
        self._file.close()


def open_path(path: Path, source: str) -> SafetensorsCheckpoint:
    handle = path.open("rb")
    try:
        return SafetensorsCheckpoint(source, handle, path.stat().st_size, path)
    except BaseException:
        handle.close()
        raise


def open_fileobj(fileobj: BinaryIO, source: str, size: int) -> SafetensorsCheckpoint:
    return SafetensorsCheckpoint(source, fileobj, size)

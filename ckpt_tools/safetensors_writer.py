"""Streaming safetensors writer: header from TensorMeta, then tensor bytes one bounded chunk at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; this writer needs one chunk
(``CHUNK_BYTES``), so converting a memory-mapped checkpoint costs page cache, not anonymous memory.
It writes into an ``fs.AtomicFile``, which the caller commits once the file is verified.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidCheckpointError, UsageError
from .fs import DISK_FULL_ERRNOS, AtomicFile
from .meta import TensorMeta, dtype_name, torch_dtype

CHUNK_BYTES = 64 * 1024 * 1024
HEADER_ALIGN = 8  # the safetensors library pads its header to 8 bytes so the data area is aligned


def build_header(metas: Iterable[TensorMeta], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus the JSON header; tensors are laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for meta in metas:
        header[meta.name] = {"dtype": meta.dtype, "shape": list(meta.shape),
                             "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def tensor_chunks(tensor, dtype_name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """1-D contiguous pieces of ``tensor`` (cast to ``dtype_name``) whose concatenation is its data
    in row-major order. A contiguous tensor is sliced as a view (no copy unless cast); a strided one
    is copied a few rows at a time."""
    dtype = tensor.dtype if dtype_name is None else torch_dtype(dtype_name)
    if tensor.numel() == 0:
        return
    if tensor.dim() == 0:
        yield tensor.reshape(1).to(dtype)
        return
    if tensor.is_contiguous():
        flat = tensor.reshape(-1)
        step = max(1, chunk_bytes // tensor.element_size())
        for start in range(0, flat.numel(), step):
            yield flat[start:start + step].to(dtype)
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, tensor.shape[0], step):
        yield tensor[start:start + step].to(dtype).contiguous().reshape(-1)


def chunk_bytes_view(chunk):
    """The raw bytes of a 1-D contiguous tensor as a numpy uint8 array (no copy; works for bf16)."""
    import torch

    return chunk.view(torch.uint8).numpy()


class FileSpans:
    """Where a memory-mapped tensor's bytes lie in their file, read from ``/proc/self/maps``.

    A tensor that torch.load(mmap=True) left in a file mapping can then be copied file to file
    inside the kernel (``copy_file_range``), as ``cp`` does, instead of faulting every page into
    this process and writing it back out: about half the system time on a multi-GB checkpoint.
    """

    MAPS = "/proc/self/maps"

    def __init__(self) -> None:
        self._maps: list[tuple[int, int, int, int, str]] | None = None
        self._fds: dict[tuple[int, str], int | None] = {}

    def locate(self, tensor) -> tuple[int, int] | None:
        """(open fd of the file, byte offset) of a contiguous CPU tensor's data, or None."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            return None
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        for fresh in (False, True):
            if fresh or self._maps is None:
                self._maps = _read_maps(self.MAPS)
            for start, stop, offset, inode, path in self._maps:
                if start <= begin < stop:
                    # memory not backed by a file, or crossing into another mapping, is written from memory
                    fd = self._fd(inode, path) if path and end <= stop else None
                    return None if fd is None else (fd, offset + begin - start)
            # an address in no known mapping means the process mapped something new: read again
        return None

    def _fd(self, inode: int, path: str) -> int | None:
        """An fd of the mapped file itself: a path since replaced by another file is not used."""
        if (inode, path) not in self._fds:
            fd = None
            try:
                fd = os.open(path, os.O_RDONLY)
                if os.fstat(fd).st_ino != inode:
                    os.close(fd)
                    fd = None
            except OSError:
                fd = None
            self._fds[(inode, path)] = fd
        return self._fds[(inode, path)]

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


def _read_maps(maps: str) -> list[tuple[int, int, int, int, str]]:
    found = []
    try:
        with open(maps) as handle:
            for line in handle:
                parts = line.split(maxsplit=5)
                path = parts[5].rstrip("\n") if len(parts) == 6 else ""
                if not path.startswith("/") or path.endswith("(deleted)"):
                    path = ""  # anonymous memory, [heap], a deleted file: nothing to copy from
                start, stop = (int(x, 16) for x in parts[0].split("-"))
                found.append((start, stop, int(parts[2], 16), int(parts[4]), path))
    except OSError:
        pass
    return found


def copy_span(out: AtomicFile, src_fd: int, offset: int, nbytes: int) -> int:
    """Copy ``nbytes`` from ``src_fd`` at ``offset`` to the end of ``out`` inside the kernel."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, out.fd, min(nbytes - done, 1 << 30), offset + done)
            if n == 0:
                break
            done += n
    except OSError:
        os.lseek(out.fd, -done, os.SEEK_CUR)  # undo the partial copy so a fallback starts clean
        raise
    return done


def write_safetensors(out: AtomicFile, entries: Iterable[tuple[TensorMeta, Callable[[], object]]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file to ``out``: ``entries`` are (output meta, a callable returning the
    source tensor, a ``FileRange`` or a list of them), read and written one at a time. Returns the
    bytes written."""
    entries = list(entries)
    header = build_header((meta for meta, _ in entries), metadata)
    total = out.write(header)
    spans = FileSpans() if hasattr(os, "copy_file_range") and os.path.exists(FileSpans.MAPS) else None
    try:
        for meta, load in entries:
            total += _write_tensor(out, meta, load(), spans)
            out.start_writeback(total)
    finally:
        if spans is not None:
            spans.close()
    return total


@dataclass(frozen=True)
class FileRange:
    """A tensor's bytes as one range of a file, found by a reader without loading the tensor (so a
    conversion that changes no byte needs no torch at all)."""

    path: Path
    offset: int
    nbytes: int


def write_range(out: AtomicFile, source: FileRange) -> int:
    """Append a file range to ``out``, inside the kernel where it can; returns the bytes copied."""
    fd = os.open(source.path, os.O_RDONLY)
    try:
        if hasattr(os, "copy_file_range"):
            try:
                return copy_span(out, fd, source.offset, source.nbytes)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise
        written = 0
        while written < source.nbytes:
            chunk = os.pread(fd, min(CHUNK_BYTES, source.nbytes - written), source.offset + written)
            if not chunk:
                break
            written += out.write(chunk)
        return written
    finally:
        os.close(fd)


def _write_tensor(out: AtomicFile, meta: TensorMeta, tensor, spans: FileSpans | None) -> int:
    if isinstance(tensor, FileRange):
        written = write_range(out, tensor)
    elif isinstance(tensor, list):  # ranges in order (a DCP tensor's chunks): copied one after another
        written = sum(write_range(out, part) for part in tensor)
    else:
        written = _write_torch(out, meta, tensor, spans)
    if written != meta.nbytes:
        raise InvalidCheckpointError(f"wrote {written} bytes but the header promises {meta.nbytes}",
                                     key=meta.name, fix="the source file changed or shrank while reading")
    return written


def _write_torch(out: AtomicFile, meta: TensorMeta, tensor, spans: FileSpans | None) -> int:
    written = 0
    span = spans.locate(tensor) if spans is not None and dtype_name(tensor.dtype) == meta.dtype else None
    if span is not None:
        try:
            written = copy_span(out, span[0], span[1], meta.nbytes)
        except OSError as exc:  # e.g. an old kernel across filesystems: fall back to writing from memory
            if exc.errno in DISK_FULL_ERRNOS:
                raise  # writing from memory would only fail the same way
            span = None
    if span is None:
        narrowed = dtype_name(tensor.dtype) != meta.dtype and tensor.is_floating_point()
        chunks = tensor_chunks(tensor, meta.dtype)
        if narrowed:  # a cast may overflow: check each cast chunk against the same source chunk
            chunks = _checked_casts(meta, zip(tensor_chunks(tensor), chunks, strict=True))
        for chunk in chunks:
            written += out.write(chunk_bytes_view(chunk))
    return written


def _checked_casts(meta: TensorMeta, pairs: Iterable[tuple[object, object]]) -> Iterator:
    """The cast chunks, each checked by ``refuse_overflow``."""
    for source, cast in pairs:
        refuse_overflow(meta, source, cast)
        yield cast


def cast_checked(meta: TensorMeta, tensor):
    """``tensor`` cast to ``meta.dtype`` (a whole tensor at once), checked by ``refuse_overflow``."""
    cast = tensor.to(torch_dtype(meta.dtype))
    if cast.dtype != tensor.dtype and tensor.is_floating_point():
        refuse_overflow(meta, tensor, cast)
    return cast


def refuse_overflow(meta: TensorMeta, source, cast) -> None:
    """Refuse a finite value that a cast turned into Inf (fp32 1e5 as F16): a conversion must not
    change what a model computes without a word. An Inf already in the source stays allowed."""
    import torch

    if not cast.is_floating_point() or bool(torch.isfinite(cast).all()):
        return
    overflowed = int((torch.isfinite(source) & ~torch.isfinite(cast)).sum())
    if overflowed:
        biggest = float(source[torch.isfinite(source)].abs().max())
        raise UsageError(f"casting to {meta.dtype} turns {overflowed:,} finite value"
                         f"{'' if overflowed == 1 else 's'} into Inf (largest magnitude {biggest:.4g}, "
                         f"beyond {float(torch.finfo(cast.dtype).max):.4g})", key=meta.name,
                         fix="keep the source dtype, or cast to BF16 (float32's range)")

"""Streaming safetensors writer: header from TensorMeta, then tensor bytes one bounded chunk at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; this writer needs one chunk
(``CHUNK_BYTES``), so converting a memory-mapped checkpoint costs page cache, not anonymous memory.
Files are written through ``AtomicFile``: an unnamed temporary file in the destination folder
(``O_TMPFILE``, so even a killed process leaves nothing), or a hidden named one where the
filesystem lacks it, linked/renamed into place only on ``commit``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .meta import TensorMeta, torch_dtype

CHUNK_BYTES = 64 * 1024 * 1024
WRITEBACK_BYTES = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2
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


class AtomicFile:
    """A file that appears at ``final`` only on ``commit()``; ``discard()`` (or an exception in the
    ``with`` block) leaves nothing behind."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.fd: int | None = None
        self._named: Path | None = None
        self._flushed = 0

    def __enter__(self) -> AtomicFile:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after commit() there is nothing left to discard

    def open(self) -> None:
        folder = self.final.parent
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
        except (AttributeError, OSError):  # no O_TMPFILE here (macOS, some filesystems)
            fd, name = tempfile.mkstemp(dir=folder, prefix=f".{self.final.name}.", suffix=".tmp")
            self.fd, self._named = fd, Path(name)
            os.chmod(name, 0o644)

    @property
    def path(self) -> str:
        """A path that opens the file before it is committed."""
        return str(self._named) if self._named else f"/proc/self/fd/{self.fd}"

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.write(self.fd, view[written:])
        return written

    def start_writeback(self, upto: int) -> None:
        """Start writing bytes up to ``upto`` to disk in the background (Linux), so the fsync in
        ``commit`` waits for the tail only instead of the whole file."""
        if upto - self._flushed < WRITEBACK_BYTES:
            return
        sync_file_range = _sync_file_range()
        if sync_file_range is not None:
            sync_file_range(self.fd, self._flushed, upto - self._flushed, SYNC_FILE_RANGE_WRITE)
        self._flushed = upto

    def commit(self) -> None:
        os.fsync(self.fd)
        if self._named is None:
            # an unnamed file gets a hidden name first, so replacing an existing file stays atomic
            fd, name = tempfile.mkstemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp")
            os.close(fd)
            os.unlink(name)
            folder = os.open(self.final.parent, os.O_RDONLY)
            try:
                # a dir fd makes Python call linkat(AT_SYMLINK_FOLLOW), which resolves the /proc link
                os.link(f"/proc/self/fd/{self.fd}", os.path.basename(name), dst_dir_fd=folder,
                        follow_symlinks=True)
            finally:
                os.close(folder)
            self._named = Path(name)
        os.replace(self._named, self.final)
        self._named = None
        self._close()
        _fsync_dir(self.final.parent)

    def discard(self) -> None:
        self._close()
        if self._named is not None:
            self._named.unlink(missing_ok=True)
            self._named = None

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@functools.cache
def _sync_file_range():
    """libc's sync_file_range, or None where there is none (not Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return func


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    source tensor), read and written one at a time. Returns the bytes written."""
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


def _write_tensor(out: AtomicFile, meta: TensorMeta, tensor, spans: FileSpans | None) -> int:
    from .meta import dtype_name

    written = 0
    span = spans.locate(tensor) if spans is not None and dtype_name(tensor.dtype) == meta.dtype else None
    if span is not None:
        try:
            written = copy_span(out, span[0], span[1], meta.nbytes)
        except OSError:  # e.g. an old kernel across filesystems: fall back to writing from memory
            span = None
    if span is None:
        for chunk in tensor_chunks(tensor, meta.dtype):
            written += out.write(chunk_bytes_view(chunk))
    if written != meta.nbytes:
        from .errors import InvalidCheckpointError

        raise InvalidCheckpointError(f"wrote {written} bytes but the header promises {meta.nbytes}",
                                     key=meta.name, fix="the source file changed or shrank while reading")
    return written

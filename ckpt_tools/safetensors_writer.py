"""Streaming safetensors writer: header from TensorMeta, then tensor bytes one bounded chunk at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; this writer needs one chunk
(``CHUNK_BYTES``), so converting a memory-mapped checkpoint costs page cache, not anonymous memory.
Files are written through ``AtomicFile``: an unnamed temporary file in the destination folder
(``O_TMPFILE``, so even a killed process leaves nothing), or a hidden named one where the
filesystem lacks it, linked/renamed into place only on ``commit``. A folder of shards is written
through ``AtomicFolder``: a hidden sibling folder swapped into place only on ``commit``. A write
refused for lack of room becomes a ``DiskFullError`` (``disk_full_as_error``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import secrets
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import CkptError, DiskFullError
from .meta import TensorMeta, torch_dtype

CHUNK_BYTES = 64 * 1024 * 1024
WRITEBACK_BYTES = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2
HEADER_ALIGN = 8  # the safetensors library pads its header to 8 bytes so the data area is aligned
# A write refused for lack of room (a full disk, a quota, a file size limit): retrying cannot help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
STAGING_MARK = ".ckpt-tmp-"  # .NAME.ckpt-tmp-XXXXXXXX: a folder being written, or left by a killed run
ASIDE_MARK = ".ckpt-old-"  # the replaced folder, where the kernel cannot swap two names in one step
AT_FDCWD = -100
RENAME_EXCHANGE = 2


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
        _remove_stale_temporaries(self.final)
        try:
            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
        except (AttributeError, OSError):  # no O_TMPFILE here (macOS, some filesystems)
            fd, name = tempfile.mkstemp(dir=folder, prefix=f".{self.final.name}.", suffix=".tmp")
            self.fd, self._named = fd, Path(name)
            os.chmod(name, 0o644)
        # held until the file is closed: a hidden temporary name whose lock is free was left by a
        # killed writer, and the next writer of the same destination removes it
        fcntl.flock(self.fd, fcntl.LOCK_EX)

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


def _remove_stale_temporaries(final: Path) -> None:
    """Remove ``.{name}.*.tmp`` siblings of ``final`` that no live writer holds locked."""
    import glob

    for candidate in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # being written right now
        else:
            candidate.unlink(missing_ok=True)
        finally:
            os.close(fd)


@functools.cache
def _libc_function(name: str, *argtypes: str):
    """A libc function by name (argument types named as in ``ctypes``), or None where there is none."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    func.argtypes = [getattr(ctypes, t) for t in argtypes]
    return func


def _sync_file_range():
    """libc's sync_file_range, or None where there is none (not Linux)."""
    return _libc_function("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")


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


class AtomicFolder:
    """A folder that appears at ``final`` complete or not at all; ``discard()`` (or an exception
    in the ``with`` block) leaves nothing behind.

    Files go into ``path``, a hidden sibling folder locked (``flock``) while this object holds it,
    so that a later run removes the leftovers of killed runs and nothing else. ``commit`` brings
    along the entries of an existing ``final`` that ``replaced(name)`` does not claim (as hard
    links: no data is copied), then swaps the two folders: in one step where the kernel can
    exchange two names (Linux ``renameat2``), else by moving the old folder aside first (a kill
    in between leaves it under its hidden ``.ckpt-old-`` name).
    """

    def __init__(self, final: Path, replaced: Callable[[str], bool]) -> None:
        # the real folder, so that a DST given as a symlink or "." is swapped where it lives
        self.final = Path(os.path.realpath(final))
        self.replaced = replaced
        self.path: Path | None = None
        self._lock: int | None = None

    def __enter__(self) -> AtomicFolder:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after commit() there is nothing left to discard

    def open(self) -> Path:
        _remove_stale_staging(self.final)
        while self.path is None:
            path = _fresh_name(self.final, STAGING_MARK)
            os.mkdir(path)
            self._lock = _lock_folder(path, wait=True)
            # a run cleaning stale folders may have taken it between mkdir and the lock
            if self._lock is not None and os.fstat(self._lock).st_nlink > 0:
                self.path = path
            else:
                self._unlock()
                shutil.rmtree(path, ignore_errors=True)
        return self.path

    def commit(self) -> None:
        _fsync_dir(self.path)
        if not self.final.is_dir():
            os.rename(self.path, self.final)
        else:
            _link_entries(self.final, self.path, self.replaced)
            os.chmod(self.path, stat.S_IMODE(self.final.stat().st_mode))
            if not _exchange(self.path, self.final):
                aside = _fresh_name(self.final, ASIDE_MARK)
                os.rename(self.final, aside)
                os.rename(self.path, self.final)
                self.path = aside
            shutil.rmtree(self.path, ignore_errors=True)  # now the old folder
        self.path = None
        self._unlock()
        _fsync_dir(self.final.parent)

    def discard(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _remove_stale_staging(final: Path) -> list[Path]:
    """Remove the staging folders of ``final`` that killed runs left (those no live run holds)."""
    final = Path(os.path.realpath(final))
    prefix = f".{final.name}{STAGING_MARK}"
    try:
        candidates = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for path in candidates:
        lock = _lock_folder(path, wait=False) if path.is_dir() and not path.is_symlink() else None
        if lock is None:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(lock)
    return removed


def _fresh_name(final: Path, mark: str) -> Path:
    while True:
        path = final.parent / f".{final.name}{mark}{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _lock_folder(path: Path, *, wait: bool) -> int | None:
    """An fd holding an exclusive lock on the folder, or None if another process holds it or it
    is gone. The lock dies with the process, however it ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _link_entries(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Give ``new`` every entry of ``old`` it lacks and ``replaced`` does not claim."""
    for entry in os.scandir(old):
        target = new / entry.name
        if replaced(entry.name) or os.path.lexists(target):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # another filesystem mounted inside, or no hard links there
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step; False where the kernel or filesystem cannot."""
    renameat2 = _libc_function("renameat2", "c_int", "c_char_p", "c_int", "c_char_p", "c_uint")
    if renameat2 is None:
        return False
    import ctypes

    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def disk_full_as_error(destination: str | Path, need: int) -> Iterator[None]:
    """Turn a write refused for lack of room (``DISK_FULL_ERRNOS``) into a ``DiskFullError`` that
    names ``destination`` and about how many bytes (``need``) it takes. Partial output must be
    removed inside the block: this only translates the error."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, CkptError):
            raise
        raise DiskFullError(f"no room to write the output ({exc.strerror or exc}); nothing was kept",
                            path=str(destination),
                            fix=f"free disk space (need about {need} bytes) and run the command again") from exc


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


@dataclass(frozen=True)
class FileRange:
    """A tensor's bytes as one range of a file, found by a reader without loading the tensor (so a
    conversion that changes no byte needs no torch at all)."""

    path: Path
    offset: int
    nbytes: int


def _write_range(out: AtomicFile, meta: TensorMeta, source: FileRange) -> int:
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
    written = _write_range(out, meta, tensor) if isinstance(tensor, FileRange) else _write_torch(out, meta, tensor, spans)
    if written != meta.nbytes:
        from .errors import InvalidCheckpointError

        raise InvalidCheckpointError(f"wrote {written} bytes but the header promises {meta.nbytes}",
                                     key=meta.name, fix="the source file changed or shrank while reading")
    return written


def _write_torch(out: AtomicFile, meta: TensorMeta, tensor, spans: FileSpans | None) -> int:
    from .meta import dtype_name

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
        for chunk in tensor_chunks(tensor, meta.dtype):
            written += out.write(chunk_bytes_view(chunk))
    return written

"""The filesystem, done safely: atomic files and folders, locks, hashing, a full disk named.

Every output of the toolkit is written through ``AtomicFile`` (an unnamed temporary file in the
destination folder, ``O_TMPFILE``, or a hidden named one where the filesystem lacks it, linked or
renamed into place only on ``commit``), ``AtomicFolder`` (a hidden sibling folder swapped into
place on ``commit``) or ``atomic_write`` (small files: metadata, refs, listings). A killed writer
leaves at most a hidden temporary that the next writer of the same destination removes. A write
refused for lack of room becomes a ``DiskFullError`` (``disk_full_as_error``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import glob
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CkptError, DiskFullError, OutputExistsError, UsageError

WRITEBACK_BYTES = 64 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2
HASH_CHUNK = 8 * 1024 * 1024
COMPARE_CHUNK = 16 * 1024 * 1024
# A write refused for lack of room (a full disk, a quota, a file size limit): retrying cannot help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
STAGING_MARK = ".ckpt-tmp-"  # .NAME.ckpt-tmp-XXXXXXXX: a folder being written, or left by a killed run
ASIDE_MARK = ".ckpt-old-"  # the replaced folder, where the kernel cannot swap two names in one step
AT_FDCWD = -100
RENAME_EXCHANGE = 2
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")  # a full git commit (or git blob) sha1
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def atomic_write(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write a small file whole: readers see the old content or the new, never a part.
    ``durable=False`` skips the fsyncs: still atomic for every process, but a power cut may leave
    the old content (for records rewritten many times a second that a newer state supersedes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as handle:
        handle.write(data)
        handle.commit(durable=durable)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def crc32_range(path: str | Path, offset: int, nbytes: int) -> int:
    """The CRC-32 of ``nbytes`` bytes of a file from ``offset`` (as far as the file goes)."""
    crc, done = 0, 0
    with open(path, "rb", buffering=0) as handle:
        while done < nbytes:
            chunk = os.pread(handle.fileno(), min(COMPARE_CHUNK, nbytes - done), offset + done)
            if not chunk:
                break
            crc, done = zlib.crc32(chunk, crc), done + len(chunk)
    return crc


def ranges_equal(first: tuple[str | Path, int], second: tuple[str | Path, int], nbytes: int, *,
                 crc32: int | None = None) -> bool:
    """Whether ``nbytes`` bytes of one file at an offset (``(path, offset)``) are the same bytes as
    another's, read in bounded chunks and compared whole (no tensor is built); with ``crc32``, also
    whether their CRC-32 is that (a zip record's). A range cut short by the end of a file differs."""
    size = max(1, min(nbytes, COMPARE_CHUNK))
    ours, theirs = bytearray(size), bytearray(size)
    crc, done = 0, 0
    with open(first[0], "rb", buffering=0) as a, open(second[0], "rb", buffering=0) as b:
        while done < nbytes:
            n = min(size, nbytes - done)
            if not (_read_exactly(a.fileno(), ours, n, first[1] + done)
                    and _read_exactly(b.fileno(), theirs, n, second[1] + done)):
                return False
            same = ours == theirs if n == size else ours[:n] == theirs[:n]  # memcmp, whole buffers
            if not same:
                return False
            if crc32 is not None:
                crc = zlib.crc32(memoryview(ours)[:n], crc)
            done += n
    return crc32 is None or crc == crc32


def _read_exactly(fd: int, buffer: bytearray, n: int, offset: int) -> bool:
    view, got = memoryview(buffer), 0
    while got < n:
        step = os.preadv(fd, [view[got:n]], offset + got)
        if step == 0:
            return False
        got += step
    return True


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed): per open file, so it also keeps
    threads of one process apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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

    def commit(self, *, durable: bool = True) -> None:
        if durable:
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
        if durable:
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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    func.argtypes = [getattr(ctypes, t) for t in argtypes]
    return func


def same_bytes(a, b) -> bool:
    """Two contiguous numpy uint8 arrays of one length hold the same bytes: one libc ``memcmp``
    where there is one (no temporary array, whatever the size), else numpy."""
    if a.size != b.size:
        return False
    memcmp = _libc_function("memcmp", "c_void_p", "c_void_p", "c_size_t")
    if memcmp is None or not (a.flags.c_contiguous and b.flags.c_contiguous):
        import numpy as np

        return bool(np.array_equal(a, b))
    return a.size == 0 or memcmp(a.ctypes.data, b.ctypes.data, a.size) == 0


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


def atomic_symlink(target: str, link: Path) -> None:
    """Point ``link`` at ``target`` in one step (a reader sees the old link or the new one)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def check_outputs(outputs: Iterable[Path], sources: Iterable[Path], force: bool) -> None:
    """Refuse to overwrite an existing output without ``force``, and ever to overwrite a source."""
    sources = list(sources)
    for out in outputs:
        if not out.exists():
            continue
        if any(_same_file(out, s) for s in sources):
            raise OutputExistsError("the output would overwrite its own source", path=str(out),
                                    fix="choose another destination")
        if out.is_dir():
            raise OutputExistsError("the output is a folder", path=str(out), fix="choose a file name")
        if not force:
            raise OutputExistsError("the output exists", path=str(out), fix="pass --force to overwrite it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# What an output's name promises: the extensions of each kind of bytes the toolkit writes (and of
# the formats a user may mistake one for). A name ending in one kind's extension must hold that kind.
OUTPUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors",),
    "torch pickle": (".pt", ".pth", ".bin", ".ckpt", ".tar"),
    "JSON": (".json",),
    "TOML": (".toml",),
    "HTML": (".html", ".htm"),
    "markdown": (".md", ".markdown"),
    "text": (".txt", ".log"),
    "NumPy": (".npy", ".npz"),
    "plain pickle": (".pkl", ".pickle"),
    "GGUF": (".gguf",),
    "ONNX": (".onnx",),
    "a DCP folder": ("",),  # a folder: no extension
}


def check_output_name(path: str | Path, kind: str, *, otherwise: str = "") -> None:
    """Refuse to write ``kind`` bytes under a name whose extension promises another format (one line
    naming the right extension, and ``otherwise`` a way to get the promised one); a name without a
    known extension is left to the user."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return
    promised = next((name for name, suffixes in OUTPUT_SUFFIXES.items() if suffix in suffixes), None)
    if promised is not None and promised != kind:
        right = OUTPUT_SUFFIXES[kind][0]
        raise UsageError(f"the name promises {promised} ({suffix}) but this writes {kind}", path=str(path),
                         fix=f"name it {Path(path).with_suffix(right).name}{otherwise}")

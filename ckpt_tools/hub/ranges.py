"""One big file over several connections: ranges written in place, recorded, hashed in order.

A file larger than the chunk size is split into ranges (``split``): at least one per connection,
none larger than the chunk size, sized so that they complete about in file order.
Each connection takes the next range not yet complete and fetches it with the GET loop a single
stream uses (``transfer.Stream``: Range and If-Range, the answer checked, retries, 429 and
``Retry-After`` honoured per connection), writing its bytes in place into the one partial file
(sparse, of the file's full size).

- A small record next to the partial file (``<partial>.ranges``, JSON, replaced atomically) says how
  far each range got. It is rewritten as bytes land (every ``RECORD_BYTES`` or ``RECORD_SECONDS``)
  and once more when the transfer stops (an error, Ctrl-C), so a killed run loses at most what
  arrived since the last record, and the next run resumes each range where the record says.
  A record that does not fit its partial file (another file's, ranges that do not tile the file,
  bytes past the partial's end) is not trusted: the transfer starts over.
- sha256 needs the bytes in order: a hasher thread follows the contiguous prefix of written bytes as
  it grows, reading them back while they are in the page cache, so when the last range lands only
  the tail is left to hash. The connections past the prefix wait while the hasher is more than a
  couple of ranges behind (bytes an earlier run wrote aside), so on a busy CPU the hasher and the
  connection at the prefix go on as one stream would, instead of leaving the file to hash at the
  end. A resumed run hashes the bytes earlier runs wrote once more, reading them from disk; its
  result says so.
- A server that ignores Range (a ``200``) or answers another range raises ``RangesUnsupported``:
  the caller goes on over one stream from the contiguous prefix (``keep_prefix``). An ETag that
  changes mid-way means the partial file holds other bytes: it and its record are deleted.
- The order of writes keeps every state a kill can leave safe: the record is written before the
  partial file grows, and deleted before the partial file is renamed into place, so a partial file
  without a record is always a prefix (what a single stream leaves).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..fs import HASH_CHUNK, atomic_write
from ..render import human_bytes
from .transfer import (
    Cancelled,
    Expect,
    Hashers,
    RangesUnsupported,
    Stream,
    TransferContext,
    Transferred,
    disk_full_as_download_error,
    resumed_note,
    verify,
)

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
ALIGN = 64 * 1024  # range boundaries on page-cache and disk-block friendly offsets
FINAL_SPLIT = 8
RECORD_BYTES = 8 * 1024 * 1024  # rewrite the record once this much arrived since the last one...
RECORD_SECONDS = 0.1  # ...or this long after, whichever comes first
RECORD_SUFFIX = ".ranges"


def record_path(partial: Path) -> Path:
    """Where the record of a ranged partial file lives: next to it."""
    return partial.with_name(partial.name + RECORD_SUFFIX)


def split(size: int | None, chunk_size: int, connections: int) -> list[tuple[int, int]]:
    """The ranges ``[(start, end)]`` of a fresh download: one range for a file not above
    ``chunk_size`` (or of unknown size, or over one connection); else ranges of at most
    ``chunk_size``, at least one per connection.

    sha256 follows the contiguous prefix, so ranges should complete in file order, not a round at
    a time: the first round is staggered (1/N, 2/N, ... of a range, so the connections come free one
    after another and each takes the next range in order), and the last round is cut
    ``FINAL_SPLIT`` times finer, so the connections finish together and the bytes left to hash when
    the last one lands are few."""
    if size is None or connections < 2 or size <= chunk_size:
        return [(0, size or 0)]
    count = max(connections, -(-size // chunk_size))
    count = -(-count // connections) * connections
    length = _align(-(-size // count))
    last_round = max(0, size - connections * length)
    staggered = [_align(length * k // connections) for k in range(1, connections + 1)]
    spans, at = [], 0
    for n in itertools.chain(staggered, itertools.repeat(length)):
        if at >= last_round:
            break
        spans.append((at, min(at + n, last_round)))
        at = spans[-1][1]
    piece = _align(length // FINAL_SPLIT)
    return spans + [(start, min(size, start + piece)) for start in range(at, size, piece)]


def _align(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)


@dataclass
class RangeRecord:
    """``{"etag", "size", "ranges": [[start, end, upto], ...]}``: bytes ``[start, upto)`` of each
    range ``[start, end)`` are written in the partial file."""

    etag: str
    size: int
    ranges: list[list[int]]

    @classmethod
    def fresh(cls, expect: Expect, spans: list[tuple[int, int]], prefix: int = 0) -> RangeRecord:
        """A record of ``spans`` with the first ``prefix`` bytes already written."""
        return cls(expect.etag, expect.size, [[a, b, min(b, max(a, prefix))] for a, b in spans])

    @classmethod
    def read(cls, path: Path, expect: Expect, partial_size: int | None) -> RangeRecord | None:
        """The record at ``path`` when it can be trusted for this file and its partial file
        (``partial_size`` bytes long, None when there is none); else None."""
        try:
            data = json.loads(path.read_text())
            record = cls(str(data["etag"]), int(data["size"]),
                         [[int(a), int(b), int(c)] for a, b, c in data["ranges"]])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if record.fits(expect, partial_size) else None

    def fits(self, expect: Expect, partial_size: int | None) -> bool:
        if partial_size is None or self.etag != expect.etag or self.size != expect.size:
            return False
        at = 0
        for start, end, upto in self.ranges:
            if start != at or not start <= upto <= end or start >= end or (upto > start and upto > partial_size):
                return False
            at = end
        return at == self.size

    @property
    def kept(self) -> int:
        return sum(upto - start for start, _, upto in self.ranges)

    def prefix(self) -> int:
        """How many bytes from the start are written without a gap."""
        return next((upto for _, end, upto in self.ranges if upto < end), self.size)

    def write(self, path: Path) -> None:
        # Not fsynced: neither is the partial file, so after a power cut a durable record could
        # vouch for bytes that never reached the disk; the hash check catches either way.
        atomic_write(path, json.dumps({"etag": self.etag, "size": self.size, "ranges": self.ranges}).encode(),
                     durable=False)


def partial_state(partial: Path, expect: Expect) -> tuple[int, RangeRecord | None]:
    """What a resume keeps of ``partial``: (bytes, its record when it has a trusted one). A partial
    file without a record is a prefix; one whose record cannot be trusted keeps nothing."""
    size = partial.stat().st_size if partial.is_file() else None
    sidecar = record_path(partial)
    if sidecar.exists():
        record = RangeRecord.read(sidecar, expect, size)
        return (record.kept, record) if record is not None else (0, None)
    if size is None or (expect.size is not None and size > expect.size):
        return 0, None
    return size, None


def plan_ranges(partial: Path, expect: Expect, chunk_size: int, connections: int) -> tuple[int, int, int]:
    """(bytes a resume keeps, ranges, connections) of this file's transfer: its record's ranges when
    it has one, else the split's (1 range: one stream); one connection per range still to fetch, up
    to ``connections``."""
    kept, record = partial_state(partial, expect)
    if record is None:
        ranges = len(split(expect.size, chunk_size, connections))
        return kept, ranges, min(ranges, connections)
    todo = sum(upto < end for _, end, upto in record.ranges)
    return kept, len(record.ranges), max(1, min(todo, connections))


def keep_prefix(partial: Path, expect: Expect) -> None:
    """Make a ranged partial file what one stream resumes: its contiguous prefix (nothing when its
    record cannot be trusted), the record deleted."""
    sidecar = record_path(partial)
    if not sidecar.exists():
        return
    _, record = partial_state(partial, expect)
    if partial.is_file():
        # first: a record over a shorter partial file is not trusted
        os.truncate(partial, record.prefix() if record is not None else 0)
    sidecar.unlink(missing_ok=True)


def discard(partial: Path) -> None:
    """Delete a partial file and its record (in this order: a record alone is not trusted)."""
    partial.unlink(missing_ok=True)
    record_path(partial).unlink(missing_ok=True)


def transfer_ranges(ctx: TransferContext, path: str, url: str, expect: Expect, partial: Path, final: Path,
                    label: str, chunk_size: int) -> Transferred:
    """Fetch one blob in ranges over up to ``ctx.connections`` connections into its partial file
    (resuming its record), hash it in order, verify, rename into place. Raises
    ``RangesUnsupported`` (the record kept) when the server cannot serve ranges."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    hashers = Hashers(expect)
    with disk_full_as_download_error(partial, path):
        record, notes = _prepare(partial, expect, split(expect.size, chunk_size, ctx.connections))
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, expect.size)  # sparse where nothing is written yet
            job = RangedDownload(ctx, url, expect, partial, record, fd, hashers)
            task = ctx.progress.add(path, expect.size, record.kept)
            job.on_bytes = lambda n: ctx.progress.advance(task, n)
            try:
                job.run()
            except RangesUnsupported:
                ctx.progress.remove(task)
                raise
        finally:
            os.close(fd)
    verify(hashers, job.hashed, label, path, lambda: discard(partial))
    record_path(partial).unlink()  # before the rename: a partial file without a record is a prefix
    os.replace(partial, final)
    if job.tail is not None:
        notes.append(f"hashed while downloading: {human_bytes(job.tail)} left to hash after the last byte arrived")
    return Transferred(hashers.sha256.hexdigest(), job.transferred, record.kept, job.connections,
                       len(record.ranges), notes + resumed_note(record.kept))


def _prepare(partial: Path, expect: Expect, spans: list[tuple[int, int]]) -> tuple[RangeRecord, list[str]]:
    """The record to resume: the partial file's when it can be trusted, else a new one, written
    (before the partial file grows) over what the partial file keeps."""
    kept, record = partial_state(partial, expect)
    notes = []
    if record is None:
        if record_path(partial).exists() and partial.is_file():
            notes.append("the partial file's range record did not fit it: started over")
        if partial.is_file():
            os.truncate(partial, kept)  # a prefix stays; anything else goes
        record = RangeRecord.fresh(expect, spans, kept)
        record.write(record_path(partial))
    return record, notes


class RangeStream(Stream):
    """One range of a ranged download: bytes written in place, progress told to the download."""

    ranged = True

    def __init__(self, job: RangedDownload, index: int) -> None:
        _, end = job.spans[index]
        super().__init__(job.ctx, job.url, job.expect, job.pos[index], end)
        self.job, self.index = job, index
        self.on_bytes = job.on_bytes

    def stopped(self) -> bool:
        return self.job.stop.is_set() or self.ctx.cancelled.is_set()

    def pause(self, seconds: float) -> bool:
        return self.job.stop.wait(seconds) or self.ctx.cancelled.is_set()

    def whole_file(self) -> None:
        raise RangesUnsupported("the server ignored Range (it sent the whole file)")

    def wrong_range(self, content_range: str | None) -> None:
        raise RangesUnsupported(f"the server answered bytes {self.offset}-{self.end - 1} with {content_range!r}")

    def file_changed(self) -> None:
        self.job.changed = True

    def write(self, data: bytes) -> None:
        self.job.write(self.index, self.offset, data)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """While a response body streams, this range holds a connection: the download knows which."""
        self.job.streaming(self.index, True)
        try:
            yield
        finally:
            self.job.streaming(self.index, False)


class RangedDownload:
    """The shared state of one ranged transfer: the ranges still to fetch, how far each got, the
    workers (one per connection), the hasher following the contiguous prefix, the record."""

    def __init__(self, ctx: TransferContext, url: str, expect: Expect, partial: Path, record: RangeRecord,
                 fd: int, hashers: Hashers) -> None:
        self.ctx, self.url, self.expect, self.fd, self.hashers = ctx, url, expect, fd, hashers
        self.partial, self.sidecar = partial, record_path(partial)
        self.spans = [(start, end) for start, end, _ in record.ranges]
        self.pos = [upto for _, _, upto in record.ranges]
        self.todo = deque(i for i, (_, end) in enumerate(self.spans) if self.pos[i] < end)
        self.connections = max(1, min(ctx.connections, len(self.todo)))
        self.first = 0  # the first range not complete: the hasher may read up to pos[first]
        # bytes an earlier run wrote: hashed again, but never a reason for the connections to wait
        self.old = [(start, upto) for start, _, upto in record.ranges if upto > start]
        self.begun = list(self.pos)
        # bytes written now into complete ranges past the prefix (per range, and in all)
        self.counted, self.done_ahead = [0] * len(self.spans), 0
        # what may wait to be hashed before the connections past the prefix wait: twice what a range
        # completing in file order, or a round of the smallest ranges, makes hashable at once
        lengths = [end - start for start, end in self.spans]
        self.ahead = 2 * max(max(lengths), self.connections * min(lengths))
        self.hashed = self.transferred = self.unrecorded = self.exited = 0
        self.tail: int | None = None  # bytes left to hash when the last byte arrived
        self.changed = False  # the server's ETag changed: the partial file holds other bytes
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.moved = threading.Condition(self.lock)  # the prefix or the hasher moved, or a stop
        self.record_due = threading.Condition(self.lock)
        self.hash_error: BaseException | None = None
        self.on_bytes = lambda n: None
        self.flowing: set[int] = set()  # ranges whose response body streams now (holding a connection)
        self._advance_first()

    # -- workers --
    def write(self, index: int, offset: int, data: bytes) -> None:
        with self.lock:
            self.moved.wait_for(lambda: index == self.first or self._room())
        if self.stop.is_set():
            raise Cancelled()
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)
        with self.lock:
            self.pos[index] = offset + written
            self.transferred += written
            self.unrecorded += written
            if self.pos[index] >= self.spans[index][1] and index != self.first:
                self.counted[index] = self.pos[index] - self.begun[index]
                self.done_ahead += self.counted[index]
            if index == self.first:
                self._advance_first()
                self.moved.notify_all()
            if self.unrecorded >= RECORD_BYTES:
                self.record_due.notify_all()

    def _advance_first(self) -> None:
        while self.first < len(self.spans) and self.pos[self.first] >= self.spans[self.first][1]:
            self.done_ahead -= self.counted[self.first]
            self.first += 1
        if self.first == len(self.spans) and self.tail is None:
            self.tail = self.expect.size - self.hashed

    def streaming(self, index: int, flowing: bool) -> None:
        with self.lock:
            (self.flowing.add if flowing else self.flowing.discard)(index)
            self.moved.notify_all()

    def _room(self) -> bool:
        """Whether a connection past the prefix may write more (called under the lock): at most
        ``ahead`` bytes written now wait in the prefix or in complete ranges past it. On a busy CPU
        this leaves the connection at the prefix, which never waits, and the hasher to go on, as
        one stream would; when the link is the bottleneck the hasher keeps up and nobody waits.
        A prefix with no body streaming never makes anyone wait: its range may be waiting for the
        very connection a waiting writer holds (connections are capped across files), so waiting
        could last forever."""
        if self.first < len(self.spans) and self.first not in self.flowing:
            return True
        frontier = self._frontier()
        behind = frontier - self.hashed + self.done_ahead
        if behind <= self.ahead or self.stop.is_set():
            return True
        old = sum(max(0, min(upto, frontier) - max(start, self.hashed)) for start, upto in self.old)
        return behind - old <= self.ahead

    def _take(self) -> int | None:
        with self.lock:
            return self.todo.popleft() if self.todo and not self.stop.is_set() else None

    def _work(self) -> None:
        while (index := self._take()) is not None:
            RangeStream(self, index).run()

    def _exited(self, _future: Future) -> None:
        with self.lock:
            self.exited += 1
            self.record_due.notify_all()

    def halt(self) -> None:
        """Stop the workers at their next chunk (or wait) and the hasher."""
        with self.lock:
            self.stop.set()
            self.moved.notify_all()

    # -- the hasher --
    def _frontier(self) -> int:
        return self.pos[self.first] if self.first < len(self.spans) else self.expect.size

    def _hash(self) -> None:
        """Hash the contiguous prefix as it grows, reading it back from the page cache; waiting
        connections are told as it goes."""
        buffer = memoryview(bytearray(HASH_CHUNK))
        try:
            while self.hashed < self.expect.size:
                with self.lock:
                    self.moved.wait_for(lambda: self._frontier() > self.hashed or self.stop.is_set())
                    upto = self._frontier()
                while self.hashed < upto and not self.stop.is_set():
                    n = os.preadv(self.fd, [buffer[:min(HASH_CHUNK, upto - self.hashed)]], self.hashed)
                    if n <= 0:
                        raise OSError(errno.EIO, "the partial file ends before its record says")
                    self.hashers.update(buffer[:n])
                    with self.lock:
                        self.hashed += n
                        self.moved.notify_all()  # connections waiting for the hasher
                if self.stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - raised by run() in the transfer's thread
            self.hash_error = exc
            self.halt()

    # -- the record --
    def save(self) -> None:
        """Write the record of what is written now (only this thread writes it)."""
        with self.lock:
            self.unrecorded = 0
            ranges = [[start, end, upto] for (start, end), upto in zip(self.spans, self.pos, strict=True)]
        RangeRecord(self.expect.etag, self.expect.size, ranges).write(self.sidecar)

    def _watch(self, futures: list[Future]) -> None:
        """Rewrite the record as bytes land until every worker has stopped; stop them all at the
        first failure or at Ctrl-C."""
        seen = 0
        while seen < len(futures):
            with self.lock:
                self.record_due.wait_for(lambda seen=seen: self.exited > seen or self.unrecorded >= RECORD_BYTES,
                                         timeout=RECORD_SECONDS)
                seen, unrecorded = self.exited, self.unrecorded
            if self.ctx.cancelled.is_set() or any(f.done() and f.exception() is not None for f in futures):
                self.halt()
            if unrecorded and seen < len(futures):
                self.save()

    # -- the whole --
    def run(self) -> None:
        """Fetch every incomplete range and hash the file; raise the first failure, after the
        final record (or, when the file changed, after deleting the partial file)."""
        hasher = threading.Thread(target=self._hash, name="ckpt-hash", daemon=True)
        hasher.start()
        pool = ThreadPoolExecutor(self.connections, thread_name_prefix="ckpt-range")
        futures = [pool.submit(self._work) for _ in range(self.connections)]
        try:
            for future in futures:
                future.add_done_callback(self._exited)
            self._watch(futures)
        except BaseException:
            self.halt()
            raise
        finally:
            pool.shutdown(wait=True)  # every worker has stopped: what the record says below is final
        errors = [f.exception() for f in futures if f.exception() is not None]
        if self.changed:
            self.halt()
            discard(self.partial)
            raise _first_cause(errors)
        if not errors and not self.ctx.cancelled.is_set():
            hasher.join()
            if self.hash_error is None:
                return
            errors.append(self.hash_error)
        self.halt()
        with contextlib.suppress(OSError):  # the failure matters more; the last record still holds
            self.save()
        raise _first_cause(errors)


def _first_cause(errors: list[BaseException]) -> BaseException:
    """The error to report: one that made the download stop, not a worker stopped because of it."""
    for kind in (RangesUnsupported, Exception):
        found = next((e for e in errors if isinstance(e, kind) and not isinstance(e, Cancelled)), None)
        if found is not None:
            return found
    return Cancelled()

"""The bytes of one file: a resumable GET loop that hashes what it got.

huggingface_hub (since 1.18) deletes a partial file when the process dies and never hashes what it
got, so the bytes are moved here:

- every blob has a partial file with a stable name that outlives the process; the next run
  resumes it with ``Range`` + ``If-Range`` and accepts only a ``206`` whose ``Content-Range``
  starts where the partial ends (a ``200`` restarts cleanly);
- sha256 is computed while streaming (over the existing prefix first, on resume) and compared with
  the ETag / LFS oid, the size, and the lock file; bad bytes are deleted, never renamed into place;
- a transient failure (``http.as_transient``) is retried with the call's policy; an attempt that
  moved bytes starts the count again;
- Ctrl-C stops the transfer at its next chunk and keeps its partial file to resume; a full disk
  (or quota, or file size limit) is a ``DiskFullError`` naming the partial file, never a retry.

``Stream`` is that GET loop for one span of a blob; ``WholeStream`` is the whole file over one
connection (this module's ``transfer``), ``ranges.RangeStream`` one range of a big file fetched
over several connections (``ranges.transfer_ranges``). Both take their connections from the
call's ``TransferContext``, which caps how many are open at once across all files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiskFullError, HubError, IntegrityError
from ..fs import DISK_FULL_ERRNOS, HASH_CHUNK
from ..http import RetryPolicy, Transient, as_transient, host, transient_status
from ..render import human_bytes
from .progress import Progress

CHUNK = 1024 * 1024  # small enough that a killed process loses little unwritten data
DEFAULT_CONNECTIONS = 8


@dataclass
class Expect:
    """What the bytes of one file must be."""

    etag: str
    size: int | None
    sha256: str | None  # from the ETag (an LFS oid) or the lock file
    git_sha1: str | None  # when the ETag is a git blob id (small non-LFS files on the hub)


class Cancelled(Exception):
    """The call was interrupted; the main thread re-raises the KeyboardInterrupt itself."""


class RangesUnsupported(Exception):
    """The server cannot serve this file in ranges (it ignored ``Range``, or answered another
    range): the caller goes on over one stream."""


@dataclass
class Transferred:
    """What the transfer of one blob did."""

    sha256: str
    transferred: int  # bytes received now
    resumed_from: int  # bytes an earlier run left that were kept (and hashed again, read from disk)
    connections: int = 1
    ranges: int = 1
    notes: list[str] = field(default_factory=list)


@dataclass
class TransferContext:
    """What every transfer of one download call shares: where the hub is, the headers (token),
    the retry policy, the progress display, the Ctrl-C flag and the connections, at most
    ``connections`` requests at once across all files (each keeps its keep-alive session)."""

    endpoint: str
    headers: dict
    policy: RetryPolicy
    progress: Progress
    connections: int = DEFAULT_CONNECTIONS
    # Set on Ctrl-C: workers stop at their next chunk, leaving a resumable partial file.
    cancelled: threading.Event = field(default_factory=threading.Event)
    _idle: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(max(1, self.connections))

    @contextlib.contextmanager
    def connection(self) -> Iterator[object]:
        """A requests session for one request, once one of the ``connections`` slots is free."""
        import requests

        with self._slots:
            with self._lock:
                session = self._idle.pop() if self._idle else None
            session = session or requests.Session()
            try:
                yield session
            finally:
                with self._lock:
                    self._idle.append(session)


def normalize_etag(value: str | None) -> str | None:
    """An ETag header without its weak marker and quotes (``W/"abc"`` -> ``abc``)."""
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"')


class Hashers:
    """sha256 always; the git blob sha1 too when that is what the ETag promises."""

    def __init__(self, expect: Expect) -> None:
        self.expect = expect
        self.reset()

    def reset(self) -> None:
        self.sha256 = hashlib.sha256()
        size = self.expect.size or 0
        self.sha1 = hashlib.sha1(b"blob %d\0" % size) if self.expect.git_sha1 else None

    def update(self, data) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def problems(self, received: int) -> list[str]:
        expect, found = self.expect, []
        if expect.size is not None and received != expect.size:
            found.append(f"got {received} bytes, expected {expect.size}")
        digest = self.sha256.hexdigest()
        if expect.sha256 is not None and digest != expect.sha256:
            found.append(f"sha256 {digest[:16]}... != {expect.sha256[:16]}...")
        if self.sha1 is not None and self.sha1.hexdigest() != expect.git_sha1:
            found.append(f"git sha1 {self.sha1.hexdigest()[:12]}... != {expect.git_sha1[:12]}...")
        return found


def verify(hashers: Hashers, received: int, label: str, path: str, discard: Callable[[], None]) -> None:
    """Raise an IntegrityError (after ``discard``: bad bytes never become the blob, nor a resume
    point) when the bytes are not the promised ones."""
    problems = hashers.problems(received)
    if problems:
        discard()
        raise IntegrityError(f"downloaded bytes failed verification ({'; '.join(problems)})",
                             path=label, key=path,
                             fix="run again; if it repeats, the server or a proxy is corrupting the file")


@contextlib.contextmanager
def disk_full_as_download_error(partial: Path, path: str) -> Iterator[None]:
    """A write refused for lack of room becomes a DiskFullError naming the partial file."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, HubError | DiskFullError):
            raise
        raise DiskFullError(f"no room to write the download ({exc.strerror or exc})", path=str(partial), key=path,
                            fix="free disk space (or raise the file size limit) and run the command again: "
                                "the download resumes from this partial file") from exc


def resumed_note(kept: int) -> list[str]:
    """Say that bytes an earlier run wrote were read back to hash them (sha256 needs every byte)."""
    return [f"resumed: {human_bytes(kept)} an earlier run wrote were read back from disk to hash them"] \
        if kept else []


def transfer(ctx: TransferContext, path: str, url: str, expect: Expect, partial: Path, final: Path,
             label: str) -> Transferred:
    """Stream one blob into its partial file over one connection (resuming it), verify, rename into
    place. ``label`` names the repo and commit in errors."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    hashers = Hashers(expect)
    stream = WholeStream(ctx, url, expect, partial, hashers)
    with disk_full_as_download_error(partial, path):
        try:
            stream.open_partial()
            task = ctx.progress.add(path, expect.size, stream.offset)
            stream.on_bytes = lambda n: ctx.progress.advance(task, n)
            stream.run()
        finally:
            stream.close()
    verify(hashers, stream.offset, label, path, lambda: partial.unlink(missing_ok=True))
    os.replace(partial, final)
    return Transferred(hashers.sha256.hexdigest(), stream.transferred, stream.resumed_from,
                       notes=resumed_note(stream.resumed_from))


class Stream:
    """The resumable GET loop for the bytes ``[offset, end)`` of one blob (``end`` None: to the end
    of the file): the request (Range, If-Range), the answer checked (status, ETag, Content-Range),
    transient failures retried per the policy. Subclasses say where the bytes go and what a
    server that does not honour the range means for them."""

    ranged = False  # name the range even from byte 0 (a part of the file, not all of it)

    def __init__(self, ctx: TransferContext, url: str, expect: Expect, offset: int = 0,
                 end: int | None = None) -> None:
        self.ctx, self.url, self.expect = ctx, url, expect
        self.offset, self.end = offset, end
        self.transferred = 0
        self.on_bytes: Callable[[int], None] = lambda n: None

    # -- what subclasses decide --
    def write(self, data: bytes) -> None:
        """Store ``data``, the bytes at ``self.offset``."""
        raise NotImplementedError

    def writing(self) -> contextlib.AbstractContextManager:
        """Around the writes of one response body."""
        return contextlib.nullcontext()

    def whole_file(self) -> None:
        """The server answered ``200`` (the whole file) to a request for a range."""
        raise NotImplementedError

    def wrong_range(self, content_range: str | None) -> None:
        """The server answered ``206`` with another range than the one asked for."""
        raise NotImplementedError

    def file_changed(self) -> None:
        """The server's ETag is no longer the expected one; the error is raised right after."""

    def stopped(self) -> bool:
        return self.ctx.cancelled.is_set()

    def pause(self, seconds: float) -> bool:
        """Wait before the next attempt; True when the call was stopped meanwhile."""
        return self.ctx.cancelled.wait(seconds)

    # -- the loop --
    def last(self) -> int | None:
        """One past the last byte wanted, when known."""
        return self.end if self.end is not None else self.expect.size

    def done(self) -> bool:
        last = self.last()
        return last is not None and self.offset >= last

    def run(self) -> None:
        policy, attempt, first = self.ctx.policy, 0, not self.done()  # a complete span needs no GET
        while first or not self.done():
            first = False
            before = self.offset
            try:
                if self._get_once():
                    return
            except Exception as exc:  # noqa: BLE001 - classified right below
                transient = as_transient(exc)
                if transient is None:
                    raise
                attempt = 0 if self.offset > before else attempt + 1
                if attempt >= policy.attempts:
                    raise HubError(f"download failed after {policy.attempts} attempts ({transient})",
                                   path=self.url, fix="run the same command again: it resumes where it stopped") from exc
                if self.pause(policy.delay(attempt, transient.retry_after)):
                    raise Cancelled() from exc

    def _headers(self) -> dict:
        headers = dict(self.ctx.headers)
        same_host = host(self.url) == host(self.ctx.endpoint)
        if not same_host:
            headers.pop("authorization", None)  # a signed CDN URL must not see the token
        if self.offset or self.ranged:
            headers["Range"] = f"bytes={self.offset}-{'' if self.end is None else self.end - 1}"
            if same_host:
                # The hub's ETag is the content hash; a CDN's is its own, so it gets no If-Range
                # (its URL is content-addressed, and the hash check at the end still holds).
                headers["If-Range"] = f'"{self.expect.etag}"'
        return headers

    def _get_once(self) -> bool:
        """One GET from the current offset to the end of the span; True when the span is complete."""
        headers = self._headers()
        with self.ctx.connection() as session:
            if self.stopped():
                raise Cancelled()
            with session.get(self.url, headers=headers, stream=True, timeout=self.ctx.policy.timeout) as resp:
                transient = transient_status(resp)
                if transient is not None:
                    raise transient
                if resp.status_code == 416 and self.done():
                    return True
                if resp.status_code not in (200, 206):
                    raise HubError(f"the server answered HTTP {resp.status_code}", path=self.url,
                                   fix="check the repo, revision and token")
                self._check_etag(resp)
                if resp.status_code == 200 and "Range" in headers:
                    self.whole_file()  # the server ignored the Range (or If-Range failed)
                elif resp.status_code == 206 and not self._range_ok(resp.headers.get("Content-Range")):
                    self.wrong_range(resp.headers.get("Content-Range"))
                self._stream(resp)
        last = self.last()
        if last is None:
            self.expect.size = self.offset
            return True
        if self.offset < last:
            raise Transient(f"the body ended at {self.offset} of {last} bytes")
        return True

    def _check_etag(self, resp) -> None:
        if "X-Repo-Commit" not in resp.headers:
            return  # not a hub resolve answer (a CDN): its ETag is not the content hash
        etag = normalize_etag(resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag"))
        if etag is not None and etag != self.expect.etag:
            self.file_changed()  # the partial file belongs to other bytes
            raise HubError(f"the file changed on the server during the download (ETag {etag[:16]}...)",
                           path=self.url, fix="run the command again to fetch the new version")

    def _range_ok(self, content_range: str | None) -> bool:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (content_range or "").strip())
        return match is not None and int(match[1]) == self.offset and \
            (self.end is None or int(match[2]) == self.end - 1) and \
            (self.expect.size is None or match[3] == str(self.expect.size))

    def _stream(self, resp) -> None:
        with self.writing():
            while True:
                if self.stopped():
                    raise Cancelled()
                data = resp.raw.read1(CHUNK)  # whatever arrived: the partial file grows as bytes come in
                if not data:
                    break
                self.write(data)
                self.offset += len(data)
                self.transferred += len(data)
                self.on_bytes(len(data))


class WholeStream(Stream):
    """The whole file over one connection, appended to its partial file from where that ends and
    hashed in order as it comes (the digest covers the prefix an earlier run left, read first)."""

    def __init__(self, ctx: TransferContext, url: str, expect: Expect, partial: Path, hashers: Hashers) -> None:
        super().__init__(ctx, url, expect)
        self.partial, self.hashers = partial, hashers
        self.resumed_from = 0
        self.file = None
        self.sink: Sink | None = None

    def open_partial(self) -> None:
        """Hash the bytes a previous run left, so the digest covers the whole file."""
        self.file = open(self.partial, "ab+")
        size = self.file.seek(0, os.SEEK_END)
        if self.expect.size is not None and size > self.expect.size:
            self.restart()
            return
        self.file.seek(0)
        while chunk := self.file.read(HASH_CHUNK):
            self.hashers.update(chunk)
        self.offset = self.resumed_from = size

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hashers.reset()
        self.offset = self.resumed_from = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def whole_file(self) -> None:
        self.restart()  # start over cleanly with the body that came

    def wrong_range(self, content_range: str | None) -> None:
        self.restart()
        raise Transient(f"unexpected Content-Range {content_range!r}")

    def file_changed(self) -> None:
        self.restart()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self.sink = Sink(self.file, self.hashers)
        try:
            yield
        finally:
            self.sink.close()  # both stages drained: the partial file and the digest cover exactly self.offset
            self.file.flush()

    def write(self, data: bytes) -> None:
        self.sink.put(data)


class Sink:
    """Writes and hashes chunks on two threads, so the socket, the disk and sha256 overlap
    (file writes, hashlib and socket reads all release the GIL)."""

    DEPTH = 4

    def __init__(self, file, hashers: Hashers) -> None:
        self.error: BaseException | None = None
        self.queues = [queue.Queue(self.DEPTH), queue.Queue(self.DEPTH)]
        self.threads = [threading.Thread(target=self._drain, args=(q, work), daemon=True)
                        for q, work in zip(self.queues, (file.write, hashers.update), strict=True)]
        for thread in self.threads:
            thread.start()

    def _drain(self, q, work) -> None:
        while (chunk := q.get()) is not None:
            if self.error is None:
                try:
                    work(chunk)
                except BaseException as exc:  # noqa: BLE001 - re-raised by put/close in the caller
                    self.error = exc

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        for q in self.queues:
            q.put(chunk)

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error

"""The bytes of one file: a resumable GET loop that hashes while it writes.

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
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiskFullError, HubError, IntegrityError
from ..fs import DISK_FULL_ERRNOS, HASH_CHUNK
from ..http import RetryPolicy, Transient, as_transient, host, transient_status
from .progress import Progress

CHUNK = 1024 * 1024  # small enough that a killed process loses little unwritten data


@dataclass
class Expect:
    """What the bytes of one file must be."""

    etag: str
    size: int | None
    sha256: str | None  # from the ETag (an LFS oid) or the lock file
    git_sha1: str | None  # when the ETag is a git blob id (small non-LFS files on the hub)


class Cancelled(Exception):
    """The call was interrupted; the main thread re-raises the KeyboardInterrupt itself."""


@dataclass
class TransferContext:
    """What every transfer of one download call shares: where the hub is, the headers (token),
    the retry policy, the progress display and the Ctrl-C flag; one HTTP session per thread."""

    endpoint: str
    headers: dict
    policy: RetryPolicy
    progress: Progress
    local: threading.local = field(default_factory=threading.local)
    # Set on Ctrl-C: workers stop at their next chunk, leaving a resumable partial file.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def session(self):
        import requests

        if getattr(self.local, "session", None) is None:
            self.local.session = requests.Session()
        return self.local.session


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


def transfer(ctx: TransferContext, path: str, url: str, expect: Expect, partial: Path, final: Path,
             label: str) -> tuple[str, int, int]:
    """Stream one blob into its partial file (resuming it), verify, rename into place.
    Returns (sha256, bytes transferred now, bytes resumed from). ``label`` names the repo and
    commit in errors."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    hashers = Hashers(expect)
    state = Stream(ctx, url, expect, partial, hashers)
    state.open_partial()
    task = ctx.progress.add(path, expect.size, state.offset)
    state.on_bytes = lambda n: ctx.progress.advance(task, n)
    try:
        try:
            state.run()
        finally:
            state.close()
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(f"no room to write the download ({exc.strerror or exc})", path=str(partial), key=path,
                            fix="free disk space (or raise the file size limit) and run the command again: "
                                "the download resumes from this partial file") from exc
    problems = hashers.problems(state.offset)
    if problems:
        partial.unlink(missing_ok=True)  # the bad bytes never become the blob, nor a resume point
        raise IntegrityError(f"downloaded bytes failed verification ({'; '.join(problems)})",
                             path=label, key=path,
                             fix="run again; if it repeats, the server or a proxy is corrupting the file")
    os.replace(partial, final)
    return hashers.sha256.hexdigest(), state.transferred, state.resumed_from


class Stream:
    """The resumable GET loop of one blob."""

    def __init__(self, ctx: TransferContext, url: str, expect: Expect, partial: Path, hashers: Hashers) -> None:
        self.ctx, self.url, self.expect, self.partial, self.hashers = ctx, url, expect, partial, hashers
        self.offset = self.transferred = self.resumed_from = 0
        self.file = None
        self.on_bytes: Callable[[int], None] = lambda n: None

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

    def done(self) -> bool:
        return self.expect.size is not None and self.offset >= self.expect.size

    def run(self) -> None:
        policy, attempt, first = self.ctx.policy, 0, not self.done()  # a complete partial needs no GET
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
                self.file.flush()
                attempt = 0 if self.offset > before else attempt + 1
                if attempt >= policy.attempts:
                    raise HubError(f"download failed after {policy.attempts} attempts ({transient})",
                                   path=self.url, fix="run the same command again: it resumes where it stopped") from exc
                if self.ctx.cancelled.wait(policy.delay(attempt, transient.retry_after)):
                    raise Cancelled() from exc

    def _get_once(self) -> bool:
        """One GET from the current offset to the end; True when the file is complete."""
        headers = dict(self.ctx.headers)
        if host(self.url) != host(self.ctx.endpoint):
            headers.pop("authorization", None)  # a signed CDN URL must not see the token
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
            if host(self.url) == host(self.ctx.endpoint):
                # The hub's ETag is the content hash; a CDN's is its own, so it gets no If-Range
                # (its URL is content-addressed, and the hash check at the end still holds).
                headers["If-Range"] = f'"{self.expect.etag}"'
        with self.ctx.session().get(self.url, headers=headers, stream=True,
                                     timeout=self.ctx.policy.timeout) as resp:
            transient = transient_status(resp)
            if transient is not None:
                raise transient
            if resp.status_code == 416 and self.done():
                return True
            if resp.status_code not in (200, 206):
                raise HubError(f"the server answered HTTP {resp.status_code}", path=self.url,
                               fix="check the repo, revision and token")
            self._check_etag(resp)
            if resp.status_code == 200 and self.offset:
                self.restart()  # the server ignored the Range (or If-Range failed): start over cleanly
            elif resp.status_code == 206 and not self._range_ok(resp.headers.get("Content-Range")):
                self.restart()
                raise Transient(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            self._stream(resp)
        if self.expect.size is None:
            self.expect.size = self.offset
            return True
        if self.offset < self.expect.size:
            raise Transient(f"the body ended at {self.offset} of {self.expect.size} bytes")
        return True

    def _check_etag(self, resp) -> None:
        if "X-Repo-Commit" not in resp.headers:
            return  # not a hub resolve answer (a CDN): its ETag is not the content hash
        etag = normalize_etag(resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag"))
        if etag is not None and etag != self.expect.etag:
            self.restart()  # the partial belongs to other bytes
            raise HubError(f"the file changed on the server during the download (ETag {etag[:16]}...)",
                           path=self.url, fix="run the command again to fetch the new version")

    def _range_ok(self, content_range: str | None) -> bool:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (content_range or "").strip())
        return match is not None and int(match[1]) == self.offset and \
            (self.expect.size is None or match[3] == str(self.expect.size))

    def _stream(self, resp) -> None:
        sink = Sink(self.file, self.hashers)
        try:
            while True:
                if self.ctx.cancelled.is_set():
                    raise Cancelled()
                data = resp.raw.read1(CHUNK)  # whatever arrived: the partial file grows as bytes come in
                if not data:
                    break
                sink.put(data)
                self.offset += len(data)
                self.transferred += len(data)
                self.on_bytes(len(data))
        finally:
            sink.close()  # both stages drained: the partial file and the digest cover exactly self.offset


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



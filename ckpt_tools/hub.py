"""Pinned, resumable, verified downloads into the standard Hugging Face cache.

huggingface_hub does what it is good at here: endpoint and token handling, URL building, file
metadata (the HEAD call), revision resolution and cache paths. The bytes are ours to move, because
the client since 1.18 deletes a partial file when the process dies and never hashes what it got:

- every blob has a partial file with a stable name (``blobs/<etag>.incomplete``) that outlives the
  process; the next run resumes it with ``Range`` + ``If-Range`` and accepts only a ``206`` whose
  ``Content-Range`` starts where the partial ends (a ``200`` restarts cleanly);
- sha256 is computed while streaming (over the existing prefix first, on resume) and compared with
  the ETag / LFS oid, the size, and the lock file; bad bytes are deleted, never renamed into place;
- retries use exponential backoff with jitter and honour ``Retry-After``;
- an ``flock`` per blob (the same lock file huggingface_hub uses) keeps two processes apart;
- a branch or tag is resolved to a commit once, before any file, and every file comes from it;
- Ctrl-C stops every transfer at its next chunk and keeps its partial file to resume; a full disk
  (or quota, or file size limit) is a ``DiskFullError`` naming the partial file, never a retry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

from .errors import DiskFullError, HubError, IntegrityError, UsageError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1024 * 1024  # small enough that a killed process loses little unwritten data
HASH_CHUNK = 8 * 1024 * 1024
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A write refused for lack of room (a full disk, a quota, a file size limit): retrying cannot help.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


# -- results -------------------------------------------------------------------------------------

@dataclass
class DownloadedFile:
    path: str
    local_path: str
    size: int
    sha256: str
    bytes_transferred: int = 0
    resumed_from: int = 0


@dataclass
class DownloadResult:
    repo_id: str
    revision: str
    commit: str
    files: list[DownloadedFile] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": [asdict(f) for f in self.files]}

    def _rows(self) -> list[list[object]]:
        from .render import human_bytes

        return [[f.path, human_bytes(f.size), f.sha256[:16], human_bytes(f.bytes_transferred),
                 human_bytes(f.resumed_from) if f.resumed_from else "-", f.local_path] for f in self.files]

    _HEADERS = ["path", "size", "sha256", "transferred", "resumed from", "local path"]

    def _title(self) -> str:
        return f"{self.repo_id} @ {self.revision} -> {self.commit}"

    def to_markdown(self) -> str:
        from .render import markdown_table

        return f"**{self._title()}**\n\n" + markdown_table(self._HEADERS, self._rows())

    def rich_table(self):
        from .render import rich_table

        return rich_table(self._title(), self._HEADERS, self._rows(),
                          justify_right=("size", "transferred", "resumed from"))


# -- retries -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries per request, waiting ``base_delay * 2**n`` (capped at
    ``max_delay``, +-``jitter`` of it at random) between them, at least what ``Retry-After`` asks
    (up to ``max_retry_after``).
    An attempt that moved bytes resets the count, so a flaky link still finishes a large file."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.25
    timeout: float = 30.0
    max_retry_after: float = 300.0  # a server asking for longer gets this, then the next attempt


    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2 ** attempt)
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(backoff, min(retry_after or 0.0, self.max_retry_after))


class _Transient(Exception):
    """A response worth retrying (429, 5xx) or a body that ended early."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Cancelled(Exception):
    """The call was interrupted; the main thread re-raises the KeyboardInterrupt itself."""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _transient(exc: BaseException) -> _Transient | None:
    """The retryable view of an error, or None when retrying cannot help."""
    import httpx2
    import requests
    import urllib3
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, _Transient):
        return exc
    if isinstance(exc, OfflineModeIsEnabled):  # a setting, not a flaky network: retrying cannot help
        return None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in RETRY_STATUSES:
            return _Transient(f"HTTP {status}", _retry_after(exc.response.headers.get("Retry-After")))
        return None
    network = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
               urllib3.exceptions.HTTPError, httpx2.TransportError, ConnectionError, TimeoutError)
    if isinstance(exc, network):
        return _Transient(f"{type(exc).__name__}: {exc}")
    return None


def _with_retries(call: Callable[[], object], policy: RetryPolicy, what: str):
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified right below
            transient = _transient(exc)
            if transient is None:
                raise
            if attempt + 1 >= policy.attempts:
                raise HubError(f"{what} failed after {policy.attempts} attempts ({transient})",
                               fix="check the connection and run the same command again") from exc
            time.sleep(policy.delay(attempt, transient.retry_after))
    raise AssertionError("unreachable")  # pragma: no cover


# -- where the bytes go --------------------------------------------------------------------------

class CacheLayout:
    """``models--ORG--NAME/{blobs/<etag>, snapshots/<commit>/<path> -> blob, refs/<rev>}``, the
    layout huggingface_hub, transformers and ``ckpt serve`` read."""

    def __init__(self, cache_dir: Path, repo_id: str) -> None:
        from huggingface_hub.file_download import repo_folder_name

        folder_name = repo_folder_name(repo_id=repo_id, repo_type="model")
        self.storage = cache_dir / folder_name
        self.locks = cache_dir / ".locks" / folder_name

    def final(self, path: str, etag: str) -> Path:
        return self.storage / "blobs" / etag

    def partial(self, path: str, etag: str) -> Path:
        return self.storage / "blobs" / f"{etag}.incomplete"

    def lock(self, path: str, etag: str) -> Path:
        # The lock file huggingface_hub itself takes for this blob, so the two keep apart too.
        return self.locks / f"{etag}.lock"

    def local_path(self, path: str, commit: str) -> Path:
        return self.storage / "snapshots" / commit / path

    def has(self, path: str, etag: str, size: int | None) -> bool:
        blob = self.final(path, etag)
        return blob.is_file() and (size is None or blob.stat().st_size == size)

    def cached(self, path: str, commit: str) -> Path | None:
        pointer = self.local_path(path, commit)
        return pointer if pointer.is_file() else None

    def place(self, path: str, etag: str, commit: str) -> Path:
        pointer = self.local_path(path, commit)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(self.final(path, etag), pointer.parent)
        if pointer.is_symlink() and os.readlink(pointer) == target:
            return pointer
        tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.symlink(target, tmp)
        os.replace(tmp, pointer)
        return pointer

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            _atomic_write(ref, commit.encode())


class LocalDirLayout:
    """Plain files under ``local_dir`` plus huggingface_hub's metadata files, so
    ``hf_hub_download(local_dir=...)`` recognises them."""

    def __init__(self, local_dir: Path) -> None:
        self.root = local_dir

    def _paths(self, path: str):
        from huggingface_hub._local_folder import get_local_download_paths

        return get_local_download_paths(self.root, path)

    def final(self, path: str, etag: str) -> Path:
        return self.root / path

    def partial(self, path: str, etag: str) -> Path:
        return self._paths(path).incomplete_path(etag)

    def lock(self, path: str, etag: str) -> Path:
        return Path(f"{self.partial(path, etag)}.lock")

    def local_path(self, path: str, commit: str) -> Path:
        return self.root / path

    def has(self, path: str, etag: str, size: int | None) -> bool:
        from huggingface_hub._local_folder import read_download_metadata

        target = self.final(path, etag)
        meta = read_download_metadata(self.root, path) if target.is_file() else None
        return meta is not None and meta.etag == etag and (size is None or target.stat().st_size == size)

    def cached(self, path: str, commit: str) -> Path | None:
        from huggingface_hub._local_folder import read_download_metadata

        target = self.root / path
        meta = read_download_metadata(self.root, path) if target.is_file() else None
        return target if meta is not None and meta.commit_hash == commit else None

    def place(self, path: str, etag: str, commit: str) -> Path:
        from huggingface_hub._local_folder import write_download_metadata

        write_download_metadata(self.root, path, commit, etag)
        return self.root / path

    def write_ref(self, revision: str, commit: str) -> None:
        pass


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock``: per open file, so it also keeps threads of one process apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- lock files ----------------------------------------------------------------------------------

@dataclass
class LockFile:
    """``{"repo", "revision", "commit", "files": [{"path", "size", "sha256"}]}``."""

    repo: str
    revision: str
    commit: str
    files: list[dict]

    @classmethod
    def read(cls, path: str | Path) -> LockFile:
        fix = "write it with `ckpt download REPO_ID FILES --lock FILE` (without --locked)"
        try:
            data = json.loads(Path(path).read_text())
            lock = cls(data["repo"], data["revision"], data["commit"],
                       [{"path": f["path"], "size": int(f["size"]), "sha256": f["sha256"]} for f in data["files"]])
        except FileNotFoundError:
            raise UsageError("the lock file does not exist", path=str(path), fix=fix) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"not a valid lock file ({type(exc).__name__}: {exc})", path=str(path), fix=fix) from None
        if not COMMIT_RE.match(lock.commit):
            raise UsageError(f"the lock's commit {lock.commit!r} is not a full commit sha", path=str(path), fix=fix)
        return lock

    def write(self, path: str | Path) -> None:
        _atomic_write(Path(path), (json.dumps(asdict(self), indent=2) + "\n").encode())

    def entry(self, path: str) -> dict:
        return next(f for f in self.files if f["path"] == path)


# -- one download call ---------------------------------------------------------------------------

@dataclass
class _Expect:
    """What the bytes of one file must be."""

    etag: str
    size: int | None
    sha256: str | None  # from the ETag (an LFS oid) or the lock file
    git_sha1: str | None  # when the ETag is a git blob id (small non-LFS files on the hub)


@dataclass
class _Call:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    token: str | bool | None
    layout: CacheLayout | LocalDirLayout
    policy: RetryPolicy
    lock: LockFile | None
    progress: _Progress
    headers: dict = field(default_factory=dict)
    local: threading.local = field(default_factory=threading.local)
    # Set on Ctrl-C: workers stop at their next chunk, leaving a resumable partial file.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def session(self):
        import requests

        if getattr(self.local, "session", None) is None:
            self.local.session = requests.Session()
        return self.local.session


def download(repo_id: str, filenames: Sequence[str] = (), *, revision: str = "main",
             cache_dir: str | Path | None = None, local_dir: str | Path | None = None,
             endpoint: str | None = None, token: str | bool | None = None, lock: str | Path | None = None,
             locked: bool = False, retry: RetryPolicy | None = None, max_workers: int = 4,
             progress: bool | None = None) -> DownloadResult:
    """Download ``filenames`` (all files of the revision when empty) of ``repo_id`` at one commit,
    verified, into the hub cache (or ``local_dir``). With ``lock``, record what was fetched; with
    ``locked=True``, fetch exactly what ``lock`` records and fail if the server's bytes differ."""
    from huggingface_hub.utils import build_hf_headers

    if cache_dir is not None and local_dir is not None:
        raise UsageError("pass --cache-dir or --local-dir, not both",
                         fix="--local-dir writes plain files; --cache-dir the hub cache layout")
    policy = retry or RetryPolicy()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or _default_endpoint()).rstrip("/")
    lockfile = _read_lock(lock, locked, repo_id)
    layout = (LocalDirLayout(Path(local_dir)) if local_dir is not None
              else CacheLayout(Path(cache_dir) if cache_dir else _default_cache_dir(), repo_id))
    requested = list(dict.fromkeys(filenames))
    headers = build_hf_headers(token=token, library_name="ckpt-tools")
    headers["Accept-Encoding"] = "identity"
    call = _Call(repo_id, revision, "", endpoint, token, layout, policy, lockfile, _Progress(progress), headers)

    first_meta = None
    if lockfile is not None and locked:
        call.revision, call.commit = lockfile.revision, lockfile.commit
        requested = _locked_files(lockfile, requested, lock)
    elif COMMIT_RE.match(revision):
        call.commit = revision
    elif requested:
        first_meta = _head(call, requested[0], revision)  # its X-Repo-Commit pins the whole call
        call.commit = first_meta.commit_hash
    else:
        call.commit = _resolve_revision(call)
    if not requested:
        requested = _list_files(call)

    with call.progress:
        workers = max(1, min(max_workers, len(requested)))
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-download") as pool:
            futures = [pool.submit(_fetch, call, path, first_meta if i == 0 else None)
                       for i, path in enumerate(requested)]
            try:
                files = [f.result() for f in futures]
            except KeyboardInterrupt:
                # Without this the pool's exit would wait for every transfer to finish after Ctrl-C.
                call.cancelled.set()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    if not locked:
        layout.write_ref(revision, call.commit)
    result = DownloadResult(repo_id, call.revision, call.commit, files)
    if lock is not None and not locked:
        LockFile(repo_id, revision, call.commit,
                 [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files]).write(lock)
    return result


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _default_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub read them at its import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _read_lock(lock: str | Path | None, locked: bool, repo_id: str) -> LockFile | None:
    if locked and lock is None:
        raise UsageError("--locked needs --lock FILE", fix="pass the lock file written by an earlier --lock run")
    if not locked:
        return None
    lockfile = LockFile.read(lock)
    if lockfile.repo != repo_id:
        raise UsageError(f"the lock file is for {lockfile.repo}, not {repo_id}", path=str(lock),
                         fix=f"run `ckpt download {lockfile.repo} --lock {lock} --locked`")
    return lockfile


def _locked_files(lockfile: LockFile, requested: list[str], lock) -> list[str]:
    recorded = [f["path"] for f in lockfile.files]
    missing = [p for p in requested if p not in recorded]
    if missing:
        raise UsageError(f"{missing[0]} is not in the lock file", path=str(lock), key=missing[0],
                         fix="download it without --locked and --lock to update the lock")
    return requested or recorded


def _hub_errors(repo_id: str, path: str | None, revision: str):
    """Map huggingface_hub's 404s to one-line errors with a fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    @contextlib.contextmanager
    def mapping():
        try:
            yield
        except OfflineModeIsEnabled:
            raise HubError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request, even to a local "
                           "mirror", path=repo_id, fix="unset HF_HUB_OFFLINE to reach the hub or a `ckpt serve` mirror") from None
        except RepositoryNotFoundError:
            raise HubError("repository not found (or not accessible with this token)", path=repo_id,
                           fix="check the repo id, HF_ENDPOINT and HF_TOKEN") from None
        except RevisionNotFoundError:
            raise HubError(f"revision {revision!r} not found", path=repo_id,
                           fix="pass an existing branch, tag or full commit sha with --revision") from None
        except EntryNotFoundError:
            raise HubError(f"no file {path!r} at revision {revision!r}", path=repo_id, key=path,
                           fix="list the repo's files, or check --revision") from None

    return mapping()


def _head(call: _Call, path: str, revision: str):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(call.repo_id, path, revision=revision, endpoint=call.endpoint)
    with _hub_errors(call.repo_id, path, revision):
        meta = _with_retries(lambda: get_hf_file_metadata(url, token=call.token, timeout=call.policy.timeout,
                                                          endpoint=call.endpoint),
                             call.policy, f"HEAD {url}")
    if not meta.commit_hash or not meta.etag:
        raise HubError("the server sent no X-Repo-Commit or ETag: not a hub endpoint", path=url,
                       fix="point HF_ENDPOINT (or --endpoint) at a hub or `ckpt serve` mirror")
    return meta


def _resolve_revision(call: _Call) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=call.endpoint, token=call.token)
    with _hub_errors(call.repo_id, None, call.revision):
        info = _with_retries(lambda: api.repo_info(call.repo_id, revision=call.revision),
                             call.policy, f"resolving {call.repo_id}@{call.revision}")
    return info.sha


def _list_files(call: _Call) -> list[str]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=call.endpoint, token=call.token)
    with _hub_errors(call.repo_id, None, call.commit):
        return list(_with_retries(lambda: api.list_repo_files(call.repo_id, revision=call.commit),
                                  call.policy, f"listing {call.repo_id}@{call.commit}"))


def _fetch(call: _Call, path: str, meta=None) -> DownloadedFile:
    """One file: from the cache if it is there (verified against the lock), else over the wire."""
    recorded = call.lock.entry(path) if call.lock is not None else None
    if recorded is not None:
        cached = call.layout.cached(path, call.commit)
        if cached is not None and cached.stat().st_size == recorded["size"] \
                and sha256_file(cached) == recorded["sha256"]:
            return DownloadedFile(path, str(cached), recorded["size"], recorded["sha256"])
    meta = meta or _head(call, path, call.commit)
    expect = _expectation(call, path, meta, recorded)
    layout = call.layout
    with _file_lock(layout.lock(path, expect.etag)):
        if layout.has(path, expect.etag, expect.size):
            sha256 = _verify_existing(layout.final(path, expect.etag), expect, path)
            transferred, resumed_from = 0, 0
        else:
            sha256, transferred, resumed_from = _transfer(call, path, _download_url(call, path, meta), expect)
    local = layout.place(path, expect.etag, call.commit)
    size = layout.final(path, expect.etag).stat().st_size
    return DownloadedFile(path, str(local), size, sha256, transferred, resumed_from)


def _download_url(call: _Call, path: str, meta) -> str:
    """The file at the pinned commit; a redirect target only when it leaves the hub (a CDN)."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(call.repo_id, path, revision=call.commit, endpoint=call.endpoint)
    if meta.location and _host(meta.location) != _host(url):
        return meta.location
    return url


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def _expectation(call: _Call, path: str, meta, recorded: dict | None) -> _Expect:
    etag = meta.etag
    sha256 = etag if SHA256_RE.match(etag) else None
    git_sha1 = etag if COMMIT_RE.match(etag) else None
    if recorded is not None:
        differs = (sha256 is not None and sha256 != recorded["sha256"]) or \
                  (meta.size is not None and meta.size != recorded["size"])
        if differs:
            raise IntegrityError(
                f"the server's file differs from the lock (sha256 {etag[:16]}..., {meta.size} bytes; "
                f"locked {recorded['sha256'][:16]}..., {recorded['size']} bytes)",
                path=f"{call.repo_id}@{call.commit}", key=path,
                fix="the mirror serves other bytes for the locked commit: check it, or re-lock deliberately")
        sha256 = recorded["sha256"]
    return _Expect(etag, meta.size, sha256, git_sha1)


def _verify_existing(blob: Path, expect: _Expect, path: str) -> str:
    """sha256 of a cached blob: a blob named by its sha256 was checked when it was written."""
    if expect.sha256 is not None and blob.name == expect.sha256:
        return expect.sha256
    digest = sha256_file(blob)
    if expect.sha256 is not None and digest != expect.sha256:
        raise IntegrityError(f"the cached file's sha256 {digest[:16]}... differs from {expect.sha256[:16]}...",
                             path=str(blob), key=path, fix="delete the cached file and download again")
    return digest


class _Hashers:
    """sha256 always; the git blob sha1 too when that is what the ETag promises."""

    def __init__(self, expect: _Expect) -> None:
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


def _transfer(call: _Call, path: str, url: str, expect: _Expect) -> tuple[str, int, int]:
    """Stream one blob into its partial file (resuming it), verify, rename into place.
    Returns (sha256, bytes transferred now, bytes resumed from)."""
    partial = call.layout.partial(path, expect.etag)
    final = call.layout.final(path, expect.etag)
    partial.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    hashers = _Hashers(expect)
    state = _Stream(call, url, expect, partial, hashers)
    state.open_partial()
    task = call.progress.add(path, expect.size, state.offset)
    state.on_bytes = lambda n: call.progress.advance(task, n)
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
                             path=f"{call.repo_id}@{call.commit}", key=path,
                             fix="run again; if it repeats, the server or a proxy is corrupting the file")
    os.replace(partial, final)
    return hashers.sha256.hexdigest(), state.transferred, state.resumed_from


class _Stream:
    """The resumable GET loop of one blob."""

    def __init__(self, call: _Call, url: str, expect: _Expect, partial: Path, hashers: _Hashers) -> None:
        self.call, self.url, self.expect, self.partial, self.hashers = call, url, expect, partial, hashers
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
        policy, attempt, first = self.call.policy, 0, not self.done()  # a complete partial needs no GET
        while first or not self.done():
            first = False
            before = self.offset
            try:
                if self._get_once():
                    return
            except Exception as exc:  # noqa: BLE001 - classified right below
                transient = _transient(exc)
                if transient is None:
                    raise
                self.file.flush()
                attempt = 0 if self.offset > before else attempt + 1
                if attempt >= policy.attempts:
                    raise HubError(f"download failed after {policy.attempts} attempts ({transient})",
                                   path=self.url, fix="run the same command again: it resumes where it stopped") from exc
                if self.call.cancelled.wait(policy.delay(attempt, transient.retry_after)):
                    raise _Cancelled() from exc

    def _get_once(self) -> bool:
        """One GET from the current offset to the end; True when the file is complete."""
        headers = dict(self.call.headers)
        if _host(self.url) != _host(self.call.endpoint):
            headers.pop("authorization", None)  # a signed CDN URL must not see the token
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
            if _host(self.url) == _host(self.call.endpoint):
                # The hub's ETag is the content hash; a CDN's is its own, so it gets no If-Range
                # (its URL is content-addressed, and the hash check at the end still holds).
                headers["If-Range"] = f'"{self.expect.etag}"'
        with self.call.session().get(self.url, headers=headers, stream=True,
                                     timeout=self.call.policy.timeout) as resp:
            if resp.status_code in RETRY_STATUSES:
                raise _Transient(f"HTTP {resp.status_code}", _retry_after(resp.headers.get("Retry-After")))
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
                raise _Transient(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            self._stream(resp)
        if self.expect.size is None:
            self.expect.size = self.offset
            return True
        if self.offset < self.expect.size:
            raise _Transient(f"the body ended at {self.offset} of {self.expect.size} bytes")
        return True

    def _check_etag(self, resp) -> None:
        from huggingface_hub.file_download import _normalize_etag

        if "X-Repo-Commit" not in resp.headers:
            return  # not a hub resolve answer (a CDN): its ETag is not the content hash
        etag = _normalize_etag(resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag"))
        if etag is not None and etag != self.expect.etag:
            self.restart()  # the partial belongs to other bytes
            raise HubError(f"the file changed on the server during the download (ETag {etag[:16]}...)",
                           path=self.url, fix="run the command again to fetch the new version")

    def _range_ok(self, content_range: str | None) -> bool:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (content_range or "").strip())
        return match is not None and int(match[1]) == self.offset and \
            (self.expect.size is None or match[3] == str(self.expect.size))

    def _stream(self, resp) -> None:
        sink = _Sink(self.file, self.hashers)
        try:
            while True:
                if self.call.cancelled.is_set():
                    raise _Cancelled()
                data = resp.raw.read1(CHUNK)  # whatever arrived: the partial file grows as bytes come in
                if not data:
                    break
                sink.put(data)
                self.offset += len(data)
                self.transferred += len(data)
                self.on_bytes(len(data))
        finally:
            sink.close()  # both stages drained: the partial file and the digest cover exactly self.offset


class _Sink:
    """Writes and hashes chunks on two threads, so the socket, the disk and sha256 overlap
    (file writes, hashlib and socket reads all release the GIL)."""

    DEPTH = 4

    def __init__(self, file, hashers: _Hashers) -> None:
        import queue

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


# -- progress ------------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar on stderr (only on a terminal unless asked for)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, name: str, total: int | None, done: int):
        return self._bar.add_task(name, total=total, completed=done) if self._bar is not None else None

    def advance(self, task, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(task, n)

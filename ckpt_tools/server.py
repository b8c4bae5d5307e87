"""A local hub mirror: serves a folder in the standard hub cache layout over the hub's HTTP protocol.

The folder holds ``models--ORG--NAME/{blobs, snapshots/<commit>/<path>, refs/<branch or tag>}``,
exactly what ``huggingface_hub`` (or ``ckpt download``) leaves in a cache, so a cache filled on a
connected machine can be served onwards on an air-gapped cluster. The unmodified
``huggingface_hub`` client and transformers' ``from_pretrained`` work against it through
``HF_ENDPOINT``. It is also the hub the tests talk to, with a fault-injection hook (``Fault``) that
makes it misbehave in the ways real networks do.

Protocol (what the huggingface_hub client needs):
  HEAD/GET /{org}/{name}/resolve/{rev}/{path}        Range -> 206, ETag = sha256 of the content
  GET /api/models/{org}/{name}[/revision/{rev}]      {"id", "sha", "siblings": [{"rfilename"}]}
  GET /api/models/{org}/{name}/tree/{rev}[/{path}]   entries {type, path, size, oid[, lfs]}
  404s carry X-Error-Code RepoNotFound | RevisionNotFound | EntryNotFound.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from .convert_plan import parse_size
from .errors import UsageError, foreign_message
from .fs import COMMIT_RE, AtomicFile, atomic_symlink, atomic_write

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# The text of a git-lfs pointer file: the tree API's "oid" of an LFS file is the git sha1 of this
# text. Its first line is the pointer format's fixed version identifier, not an address to contact.
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
# Files the hub would store in LFS: large ones, and weights whatever their size (as .gitattributes does).
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                          ".npz", ".npy", ".pkl", ".gguf", ".zip", ".tar", ".gz", ".model"})
COPY_CHUNK = 1024 * 1024


class HubServerError(Exception):
    """A request the mirror answers with an error status (never escapes the handler)."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


# -- the served folder ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedFile:
    """One file of a repo at a commit."""

    path: str
    file: Path  # the real file holding the content (a blob)
    size: int


class HubFolder:
    """Read access to a folder in the hub cache layout; sha256 of blobs computed once and cached."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._hash_lock = threading.Lock()

    def repo_dir(self, repo_id: str) -> Path:
        org, _, name = repo_id.partition("/")
        if not _safe_segment(org) or not _safe_segment(name):
            raise HubServerError(400, None, f"invalid repo id {repo_id!r}")
        folder = self.root / f"models--{org}--{name}"
        if not folder.is_dir():
            raise HubServerError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return folder

    def resolve(self, repo_id: str, revision: str) -> str:
        """Branch, tag or full commit sha -> commit sha."""
        folder = self.repo_dir(repo_id)
        if _safe_relpath(revision):
            ref = folder / "refs" / revision
            if ref.is_file():
                commit = ref.read_text().strip()
                if _safe_segment(commit) and (folder / "snapshots" / commit).is_dir():
                    return commit
        if COMMIT_RE.match(revision) and (folder / "snapshots" / revision).is_dir():
            return revision
        raise HubServerError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def entry(self, repo_id: str, commit: str, path: str) -> ServedFile:
        if not _safe_relpath(path):
            raise HubServerError(400, None, f"invalid path {path!r}", commit)
        snapshot = self.repo_dir(repo_id) / "snapshots" / commit
        candidate = snapshot / path
        if not candidate.is_file():
            raise HubServerError(404, "EntryNotFound", f"{path} does not exist at {commit}", commit)
        real = candidate.resolve()
        # Symlinks may point into blobs/ but never outside the repo folder.
        if not real.is_relative_to(self.repo_dir(repo_id).resolve()):
            raise HubServerError(403, None, f"{path} points outside the repository", commit)
        return ServedFile(path, real, real.stat().st_size)

    def files(self, repo_id: str, commit: str) -> list[str]:
        snapshot = self.repo_dir(repo_id) / "snapshots" / commit
        found = []
        for dirpath, dirnames, filenames in os.walk(snapshot, followlinks=False):
            dirnames.sort()
            rel = Path(dirpath).relative_to(snapshot)
            for name in sorted(filenames):
                found.append((rel / name).as_posix())
        return found

    def hashes(self, entry: ServedFile) -> tuple[str, str]:
        """(sha256, git blob sha1) of an entry. A blob named by a sha256 is trusted to hold it (the
        hub names LFS blobs by their sha256), so a large cache serves without reading every byte."""
        stat = entry.file.stat()
        key = (str(entry.file), stat.st_size, stat.st_mtime_ns)
        with self._hash_lock:
            known = self._hashes.get(key)
        if known is not None:
            return known
        if SHA256_RE.match(entry.file.name) and _is_lfs(entry.path, stat.st_size):
            sha256 = entry.file.name
            pointer = LFS_POINTER.format(oid=sha256, size=stat.st_size).encode()
            sha1 = _git_blob_sha1(pointer)
        else:
            sha256, sha1 = _hash_file(entry.file, stat.st_size)
            if _is_lfs(entry.path, stat.st_size):
                sha1 = _git_blob_sha1(LFS_POINTER.format(oid=sha256, size=stat.st_size).encode())
        with self._hash_lock:
            self._hashes[key] = (sha256, sha1)
        return sha256, sha1

    def tree_entry(self, entry: ServedFile) -> dict:
        sha256, sha1 = self.hashes(entry)
        item = {"type": "file", "path": entry.path, "size": entry.size, "oid": sha1}
        if _is_lfs(entry.path, entry.size):
            pointer = LFS_POINTER.format(oid=sha256, size=entry.size)
            item["lfs"] = {"oid": sha256, "size": entry.size, "pointerSize": len(pointer)}
        return item


def _safe_segment(text: str) -> bool:
    return bool(text) and text not in (".", "..") and "/" not in text and "\\" not in text and "\0" not in text


def _safe_relpath(path: str) -> bool:
    return bool(path) and not path.startswith("/") and all(_safe_segment(p) for p in path.split("/"))


def _is_lfs(path: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or Path(path).suffix.lower() in LFS_SUFFIXES


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hash_file(path: Path, size: int) -> tuple[str, str]:
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


# -- faults (tests and benchmarks only) ----------------------------------------------------------

@dataclass
class Fault:
    """One way to misbehave, applied to the next ``times`` matching requests (``times=None``: all).

    kind:
      ``drop``          send headers and ``after`` bytes of the body, then cut the connection
      ``status``        answer ``status`` (e.g. 503) with no body
      ``throttle``      answer 429 with ``Retry-After: retry_after``
      ``ignore_range``  answer 200 with the whole file although a Range was asked for
      ``bad_range``     answer a Range with 206 but the whole file, labelled ``bytes 0-...`` (a broken proxy)
      ``corrupt``       flip the byte at file offset ``offset`` (the ETag stays the promised one)
      ``slow``          send the body at ``rate`` bytes per second
      ``etag``          answer with the ETag ``etag`` (the file changed on the server); an ``If-Range``
                        naming the old one gets the whole file, as from a real server
      ``call``          run ``callback(method, path)`` and answer normally (e.g. move a branch)
      ``redirect``      answer a file request with 302 to ``location`` + the request's path, with the
                        file's commit, ETag and size in ``X-Repo-Commit`` / ``X-Linked-*`` as the hub
                        does when it sends a download to its CDN
    """

    kind: str
    times: int | None = 1
    path: str | None = None  # only requests whose URL path contains this
    skip: int = 0  # let this many matching requests through unharmed first (a fault mid-way)
    methods: tuple[str, ...] = ("GET",)
    status: int = 503
    after: int = 0
    retry_after: float = 1
    offset: int = 0
    rate: float = 1e6
    etag: str = "0" * 64
    callback: object = None
    location: str = ""
    hits: int = 0
    seen: int = 0  # matching requests so far, skipped ones included

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods or (self.path is not None and self.path not in path):
            return False
        return self.times is None or self.hits < self.times

    def take(self) -> bool:
        """Count one matching request; True when this one gets the fault."""
        self.seen += 1
        if self.seen <= self.skip:
            return False
        self.hits += 1
        return True


class TokenBucket:
    """At most ``rate`` bytes per second, in bursts of at most ``burst`` bytes: the throughput cap of
    one connection (``ckpt serve --rate-limit``), modelling a link where one stream is the bottleneck."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep) -> None:
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.burst = int(max(4096, rate / 100))  # a send every 10 ms at most: smooth, cheap
        self.tokens = float(self.burst)
        self.stamp = clock()

    def take(self, n: int) -> None:
        """Wait until ``n`` (at most ``burst``) bytes may go; a deficit is paid by sleeping."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)


def parse_rate(text: str | float | None) -> float | None:
    """``"20MB/s"`` -> 20_000_000 bytes per second (the size as ``convert_plan.parse_size`` reads
    it; ``/s`` may be left out); None stays None (no cap)."""
    if text is None or isinstance(text, int | float):
        if text is not None and text <= 0:
            raise UsageError(f"invalid rate {text!r}", fix="give a positive number of bytes per second")
        return None if text is None else float(text)
    size = re.sub(r"(?i)\s*/\s*s(ec)?\s*$", "", str(text))
    try:
        return float(parse_size(size))
    except UsageError:
        raise UsageError(f"invalid rate {text!r}", fix="write e.g. 20MB/s, 500KiB/s or bytes per second") from None


@dataclass
class ServerStats:
    """What the mirror did: every request line, the body bytes it sent, and the most requests it
    answered at once."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's headers, names lower-cased
    bytes_sent: int = 0
    # requests being answered now: 0 once the handler of a killed client's connection has given up,
    # so a count of bytes_sent taken then is final; peak_active is the most answered at once
    active: int = 0
    peak_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, method: str, path: str, rng: str | None, headers: Mapping[str, str] = {}) -> None:
        with self.lock:
            self.requests.append((method, path, rng))
            self.headers.append({name.lower(): value for name, value in headers.items()})
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def end(self) -> None:
        with self.lock:
            self.active -= 1

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes_sent += n


# -- HTTP ----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ckpt-serve"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # one handler per TCP connection: the cap is per connection, as a CDN's is
        rate = self.server.rate_limit
        self.bucket = TokenBucket(rate) if rate else None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        raw_path = urlsplit(self.path).path
        self.server.stats.begin(self.command, raw_path, self.headers.get("Range"), self.headers)
        try:
            self._answer(raw_path, head)
        finally:
            self.server.stats.end()

    def _answer(self, raw_path: str, head: bool) -> None:
        fault = self.server.take_fault(self.command, raw_path)
        try:
            if fault is not None and fault.kind in ("status", "throttle"):
                return self._fault_status(fault)
            if fault is not None and fault.kind == "call":
                fault.callback(self.command, raw_path)
                fault = None
            parts = raw_path.split("/")
            if len(parts) >= 4 and parts[1] == "api" and parts[2] == "models":
                return self._api(parts[3:], head)
            if len(parts) >= 6 and parts[3] == "resolve":
                return self._resolve(parts, head, fault)
            raise HubServerError(404, None, f"no route for {raw_path}")
        except HubServerError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- responses --
    def _send_json(self, payload, status: int = 200, head: bool = False, extra: Mapping[str, str] = {}) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, err: HubServerError) -> None:
        extra = {"X-Error-Message": err.message}
        if err.code:
            extra["X-Error-Code"] = err.code
        if err.commit:
            extra["X-Repo-Commit"] = err.commit
        self._send_json({"error": err.message}, err.status, self.command == "HEAD", extra)

    def _fault_status(self, fault: Fault) -> None:
        status = 429 if fault.kind == "throttle" else fault.status
        extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.kind == "throttle" else {}
        self._send_json({"error": HTTPStatus(status).phrase}, status, self.command == "HEAD", extra)

    # -- /api/models/... --
    def _api(self, parts: list[str], head: bool) -> None:
        folder = self.server.folder
        if len(parts) < 2:
            raise HubServerError(404, "RepoNotFound", "Repository not found")
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        rest = parts[2:]
        if not rest or rest == [""]:
            return self._send_json(self._info(repo_id, "main"), head=head)
        if rest[0] == "revision" and len(rest) >= 2:
            return self._send_json(self._info(repo_id, unquote("/".join(rest[1:]))), head=head)
        if rest[0] == "tree" and len(rest) >= 2:
            commit = folder.resolve(repo_id, unquote(rest[1]))
            sub = unquote("/".join(rest[2:])).strip("/")
            query = parse_qs(urlsplit(self.path).query)
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send_json(self._tree(repo_id, commit, sub, recursive), head=head)
        raise HubServerError(404, None, f"no route for /api/models/{'/'.join(parts)}")

    def _info(self, repo_id: str, revision: str) -> dict:
        folder = self.server.folder
        commit = folder.resolve(repo_id, revision)
        files = folder.files(repo_id, commit)
        return {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "gated": False,
                "disabled": False, "tags": [], "siblings": [{"rfilename": p} for p in files]}

    def _tree(self, repo_id: str, commit: str, sub: str, recursive: bool) -> list[dict]:
        folder = self.server.folder
        if sub and not _safe_relpath(sub):
            raise HubServerError(400, None, f"invalid path {sub!r}", commit)
        prefix = f"{sub}/" if sub else ""
        inside = [p for p in folder.files(repo_id, commit) if p.startswith(prefix)]
        if sub and not inside:
            raise HubServerError(404, "EntryNotFound", f"{sub} does not exist at {commit}", commit)
        entries, dirs = [], set()
        for path in inside:
            rel = path[len(prefix):]
            if not recursive and "/" in rel:
                dirs.add(prefix + rel.split("/", 1)[0])
                continue
            if recursive:
                parents = rel.split("/")[:-1]
                dirs.update(prefix + "/".join(parents[: i + 1]) for i in range(len(parents)))
            entries.append(folder.tree_entry(folder.entry(repo_id, commit, path)))
        folders = [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                   for d in sorted(dirs)]
        return folders + entries

    # -- /{org}/{name}/resolve/{rev}/{path} --
    def _resolve(self, parts: list[str], head: bool, fault: Fault | None) -> None:
        folder = self.server.folder
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        commit = folder.resolve(repo_id, unquote(parts[4]))
        entry = folder.entry(repo_id, commit, unquote("/".join(parts[5:])))
        sha256, _ = folder.hashes(entry)
        etag = f'"{fault.etag if fault and fault.kind == "etag" else sha256}"'
        if fault is not None and fault.kind == "redirect":
            return self._redirect(fault, commit, etag, entry.size)
        start, end = 0, entry.size - 1
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        honour = rng is not None and not (fault and fault.kind in ("ignore_range", "bad_range"))
        if honour and if_range is not None and if_range.strip().lstrip("W/") != etag:
            honour = False  # the client's partial copy is of other bytes: send everything
        if honour:
            parsed = _parse_range(rng, entry.size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{entry.size}")
                self.send_header("Content-Length", "0")
                self.send_header("ETag", etag)
                self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                return
            start, end = parsed
        partial = honour or (rng is not None and fault is not None and fault.kind == "bad_range")
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(max(0, end - start + 1)))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if not head and end >= start:
            self._send_body(entry.file, start, end - start + 1, fault)

    def _redirect(self, fault: Fault, commit: str, etag: str, size: int) -> None:
        self.send_response(302)
        self.send_header("Location", fault.location + urlsplit(self.path).path)
        self.send_header("Content-Length", "0")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("X-Linked-Etag", etag)
        self.send_header("X-Linked-Size", str(size))
        self.end_headers()

    def _send_body(self, path: Path, start: int, count: int, fault: Fault | None) -> None:
        with open(path, "rb") as f:
            if fault is None or fault.kind in ("ignore_range", "bad_range", "etag"):
                return self._sendfile(f, start, count)
            f.seek(start)
            self._send_faulty(f, start, count, fault)

    def _sendfile(self, f, start: int, count: int) -> None:
        """Zero-copy body; bytes are counted as they go, so a client killed mid-body still counts."""
        self.wfile.flush()
        out, offset, left = self.connection.fileno(), start, count
        most = self.bucket.burst if self.bucket else 64 * COPY_CHUNK
        try:
            while left > 0:
                self._throttle(min(left, most))
                sent = os.sendfile(out, f.fileno(), offset, min(left, most))
                if sent == 0:
                    break
                offset, left = offset + sent, left - sent
                self.server.stats.add_bytes(sent)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_faulty(self, f, start: int, count: int, fault: Fault) -> None:
        pos, remaining = start, count
        limit = fault.after if fault.kind == "drop" else count
        chunk_size = max(1, int(fault.rate / 20)) if fault.kind == "slow" else 64 * 1024
        while remaining > 0 and pos - start < limit:
            chunk = bytearray(f.read(min(chunk_size, remaining, limit - (pos - start))))
            if not chunk:
                break
            if fault.kind == "corrupt" and pos <= fault.offset < pos + len(chunk):
                chunk[fault.offset - pos] ^= 0xFF
            self._throttle(len(chunk))
            self.wfile.write(chunk)
            self.server.stats.add_bytes(len(chunk))
            pos += len(chunk)
            remaining -= len(chunk)
            if fault.kind == "slow":
                self.wfile.flush()
                time.sleep(len(chunk) / fault.rate)
        if fault.kind == "drop":
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _throttle(self, n: int) -> None:
        if self.bucket is not None:
            self.bucket.take(n)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> (start, end), None if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match[1] and not match[2]):
        return None
    if not match[1]:
        suffix = int(match[2])
        return (max(0, size - suffix), size - 1) if suffix and size else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start <= end and start < size else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, folder: HubFolder, faults: list[Fault], verbose: bool,
                 rate_limit: float | None = None) -> None:
        self.folder, self.faults, self.verbose, self.rate_limit = folder, faults, verbose, rate_limit
        self.stats = ServerStats()
        self._fault_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # a client that goes away (killed, or dropping a body it does not want) is not the server's error
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._fault_lock:
            for fault in self.faults:
                if fault.matches(method, path) and fault.take():
                    return fault
        return None


class HubServer:
    """The mirror as a library object; a context manager serves in a background thread.

    >>> with HubServer(root) as hub:            # doctest: +SKIP
    ...     hf_hub_download("org/name", "config.json", endpoint=hub.endpoint)

    ``rate_limit`` (bytes per second, or a text such as ``"20MB/s"``) caps each connection's
    throughput with a token bucket.
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 faults: list[Fault] | None = None, verbose: bool = False,
                 rate_limit: str | float | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UsageError("the folder to serve does not exist", path=str(root),
                             fix="pass a hub cache folder (holding models--ORG--NAME folders)")
        self.folder = HubFolder(root)
        self.faults: list[Fault] = faults if faults is not None else []
        self.rate_limit = parse_rate(rate_limit)
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise UsageError(f"port {port!r} is not a TCP port", fix="pass --port 0..65535 (0 picks a free one)")
        try:
            self._server = _Server((host, port), self.folder, self.faults, verbose, self.rate_limit)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({foreign_message(exc)})",
                             fix="pass another --port, or --port 0 to pick a free one") from None
        self._thread: threading.Thread | None = None

    def repos(self) -> list[str]:
        """The repositories served, as ORG/NAME."""
        return sorted(p.name.removeprefix("models--").replace("--", "/", 1)
                      for p in self.folder.root.glob("models--*--*") if p.is_dir())

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def stats(self) -> ServerStats:
        return self._server.stats

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ckpt-serve", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8080, *, verbose: bool = True,
          out: TextIO | None = None, rate_limit: str | float | None = None) -> None:
    """Serve ``root`` until interrupted (the ``ckpt serve`` command); the address is announced on
    ``out`` (stdout by default) as the first line, for scripts that start it with ``--port 0``."""
    server = HubServer(root, host, port, verbose=verbose, rate_limit=rate_limit)
    if not server.repos():
        print(f"warning: {server.folder.root} holds no models--ORG--NAME folder, so every request will get 404; "
              "serve a hub cache folder (e.g. ~/.cache/huggingface/hub)", file=sys.stderr, flush=True)
    cap = f"; {server.rate_limit / 1e6:g} MB/s per connection" if server.rate_limit else ""
    print(f"serving {server.folder.root} at {server.endpoint} (set HF_ENDPOINT={server.endpoint}){cap}",
          file=out or sys.stdout, flush=True)
    try:
        server.serve_forever()
    finally:
        server._server.server_close()


# -- building a repo in the layout ---------------------------------------------------------------

def publish(root: str | Path, repo_id: str, files: Mapping[str, bytes | str | Path], *,
            branch: str = "main", tag: str | None = None, message: str = "", link: bool = False) -> str:
    """Write ``files`` ({path in repo: bytes or a local file}) as a new commit of ``repo_id`` under
    ``root`` in the hub cache layout, move ``branch`` (and ``tag``) to it, and return the commit sha.

    Blobs are named by their sha256 (as the hub names LFS blobs); snapshot entries are relative
    symlinks into ``blobs/``. ``link=True`` hard-links local files into ``blobs/`` instead of copying
    them (same filesystem; the source must then never be modified in place). Used by the tests, the
    benchmarks and ``ckpt demo``.
    """
    org, _, name = repo_id.partition("/")
    if not (_safe_segment(org) and _safe_segment(name)):
        raise UsageError("a repo id is ORG/NAME", path=repo_id, fix="e.g. openflamingo/OpenFlamingo-3B-vitl-mpt1b")
    folder = Path(root) / f"models--{org}--{name}"
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    stored: dict[str, str] = {}
    for path, content in sorted(files.items()):
        if not _safe_relpath(path):
            raise UsageError("a file path in a repo must be relative, without '..'", path=path)
        stored[path] = _store_blob(blobs, content, link)
    # like git without timestamps: the same files on the same parent are the same commit, so a
    # repository built twice from the same content (``ckpt demo --seed 0``) has the same commit ids
    head = folder / "refs" / branch
    parent = head.read_text().strip() if head.is_file() else ""
    commit = hashlib.sha1(json.dumps([repo_id, stored, message, parent]).encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for path, sha in stored.items():
        pointer = snapshot / path
        if not pointer.is_symlink():
            atomic_symlink(os.path.relpath(blobs / sha, pointer.parent), pointer)
    for ref in [branch] + ([tag] if tag else []):
        _write_ref(folder, ref, commit)
    return commit


def _store_blob(blobs: Path, content: bytes | str | Path, link: bool = False) -> str:
    if isinstance(content, bytes):
        sha = hashlib.sha256(content).hexdigest()
        if not (blobs / sha).exists():
            atomic_write(blobs / sha, content)
        return sha
    source = Path(content)
    sha, _ = _hash_file(source, source.stat().st_size)
    target = blobs / sha
    if not target.exists():
        _link_or_copy_into(source, target, link)
    return sha


def _write_ref(folder: Path, ref: str, commit: str) -> None:
    if not _safe_relpath(ref):
        raise UsageError("a branch or tag name must be a relative name without '..'", path=ref)
    target = folder / "refs" / ref
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, commit.encode())


def _link_or_copy_into(source: Path, target: Path, link: bool) -> None:
    """``target`` appears whole: a hard link when asked for and possible, else a copy written
    through a temporary name."""
    if link:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    with open(source, "rb") as reader, AtomicFile(target) as out:
        while chunk := reader.read(COPY_CHUNK):
            out.write(chunk)
        out.commit()

"""Reading a checkpoint on the hub without downloading it: ``hf://ORG/NAME[@REVISION]/PATH``.

The revision is resolved to a commit first (one HEAD), then the file is read through ``RangeFile``,
a seekable file object that fetches only the byte ranges asked for (in blocks, with a small cache).
A safetensors header or a zip-format ``.pt``'s directory and pickle are a tiny fraction of the file,
so inspecting a 4 GB checkpoint moves well under 1% of it.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import HubError, UsageError
from ..reader import Checkpoint

REFERENCE_RE = re.compile(r"^hf://(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")
BLOCK_SIZE = 64 * 1024
CACHE_BLOCKS = 256  # 16 MiB of blocks at most


@dataclass(frozen=True)
class HfReference:
    repo_id: str
    revision: str
    path: str

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf://{self.repo_id}{rev}/{self.path}"


def parse_hf_reference(ref: str) -> HfReference:
    """``hf://ORG/NAME[@REV]/PATH`` -> HfReference (a revision holding '/' is written %2F-encoded)."""
    match = REFERENCE_RE.match(ref)
    if match is None:
        raise UsageError("not a hub reference", path=ref,
                         fix="write hf://ORG/NAME[@REVISION]/PATH, e.g. hf://openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt")
    revision = unquote(match["rev"]) if match["rev"] else "main"
    path = match["path"]
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UsageError("the file path in a hub reference must not contain '..' or empty parts", path=ref)
    return HfReference(f"{match['org']}/{match['name']}", revision, path)


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that fetches byte ranges on demand.

    Reads are served from ``block_size`` blocks kept in a small LRU cache; contiguous missing
    blocks are fetched with one Range request. ``bytes_fetched`` counts body bytes received.
    """

    def __init__(self, url: str, size: int, *, headers: dict | None = None, etag: str | None = None,
                 block_size: int = BLOCK_SIZE, cache_blocks: int = CACHE_BLOCKS, retry=None) -> None:
        import requests

        from ..hub import RetryPolicy

        super().__init__()
        self.url, self.size, self.etag = url, size, etag
        self.headers = dict(headers or {})
        self.headers["Accept-Encoding"] = "identity"
        self.block_size, self.cache_blocks = block_size, cache_blocks
        self.retry = retry or RetryPolicy()
        self.bytes_fetched = 0
        self.requests = 0
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._session = requests.Session()
        self._lock = threading.Lock()

    # -- io.RawIOBase --
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n:
            view[:n] = self._read_at(self._pos, n)
            self._pos += n
        return n

    def readall(self) -> bytes:
        data = self._read_at(self._pos, max(0, self.size - self._pos))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._session.close()
        super().close()

    # -- ranges --
    def _read_at(self, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        first, last = start // self.block_size, (start + length - 1) // self.block_size
        if last - first + 1 > self.cache_blocks // 2:  # a bulk read (tensor bytes): fetch, do not cache
            return self._fetch(start, start + length - 1)
        with self._lock:
            missing = [i for i in range(first, last + 1) if i not in self._blocks]
            for run_start, run_end in _runs(missing):
                lo = run_start * self.block_size
                hi = min(self.size, (run_end + 1) * self.block_size) - 1
                data = self._fetch(lo, hi)
                for i in range(run_start, run_end + 1):
                    off = (i - run_start) * self.block_size
                    self._blocks[i] = data[off:off + self.block_size]
            parts = []
            for i in range(first, last + 1):
                self._blocks.move_to_end(i)
                parts.append(self._blocks[i])
            while len(self._blocks) > self.cache_blocks:
                self._blocks.popitem(last=False)
        joined = b"".join(parts)
        offset = start - first * self.block_size
        return joined[offset:offset + length]

    def _fetch(self, lo: int, hi: int) -> bytes:
        from ..hub import _retry_after, _Transient, _with_retries

        def once() -> bytes:
            headers = {**self.headers, "Range": f"bytes={lo}-{hi}"}
            with self._session.get(self.url, headers=headers, timeout=self.retry.timeout, stream=True) as resp:
                self.requests += 1
                if resp.status_code in (429, 500, 502, 503, 504):
                    raise _Transient(f"HTTP {resp.status_code}", _retry_after(resp.headers.get("Retry-After")))
                if resp.status_code == 206:
                    body = resp.raw.read(hi - lo + 2, decode_content=False)
                    self.bytes_fetched += len(body)
                    expected = f"bytes {lo}-{hi}/{self.size}"
                    if resp.headers.get("Content-Range", "").strip() != expected or len(body) != hi - lo + 1:
                        raise _Transient(f"unexpected range {resp.headers.get('Content-Range')!r}")
                    return body
                if resp.status_code == 200:
                    # The server ignored the Range: read up to the end of the range, drop the connection.
                    body = resp.raw.read(hi + 1, decode_content=False)
                    self.bytes_fetched += len(body)
                    if len(body) == hi + 1:
                        return body[lo:]
                    raise _Transient(f"the body ended at {len(body)} of {hi + 1} bytes")
                raise HubError(f"the server answered HTTP {resp.status_code} to a range read", path=self.url,
                               fix="the endpoint must support HTTP Range requests (the hub and `ckpt serve` do)")

        return _with_retries(once, self.retry, f"reading bytes {lo}-{hi} of {self.url}")


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def open_range_file(ref: str | HfReference, *, endpoint: str | None = None, token: str | bool | None = None,
                    retry=None, block_size: int = BLOCK_SIZE) -> tuple[RangeFile, str]:
    """Resolve ``ref``'s revision to a commit (one HEAD) and return (RangeFile at that commit, commit)."""
    import os

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from ..hub import RetryPolicy, _Call, _default_endpoint, _head, _Progress

    ref = parse_hf_reference(ref) if isinstance(ref, str) else ref
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or _default_endpoint()).rstrip("/")
    policy = retry or RetryPolicy()
    call = _Call(ref.repo_id, ref.revision, "", endpoint, token, None, policy, None, _Progress(False))
    meta = _head(call, ref.path, ref.revision)
    if meta.size is None:
        raise HubError("the server sent no Content-Length for the file", path=str(ref),
                       fix="download it with `ckpt download` and inspect the local copy")
    url = hf_hub_url(ref.repo_id, ref.path, revision=meta.commit_hash, endpoint=endpoint)
    headers = build_hf_headers(token=token, library_name="ckpt-tools")
    return RangeFile(url, meta.size, headers=headers, etag=meta.etag, retry=policy, block_size=block_size), \
        meta.commit_hash


def open_remote(ref: str | HfReference, *, endpoint: str | None = None, token: str | bool | None = None,
                retry=None, block_size: int = BLOCK_SIZE, **options) -> Checkpoint:
    """Open ``hf://ORG/NAME[@REV]/PATH`` lazily; ``checkpoint.bytes_read`` is what was fetched.
    A ``*.index.json`` opens every shard it names, at the same commit."""
    from . import open_fileobj
    from .sharded import INDEX_SUFFIX

    parsed = parse_hf_reference(ref) if isinstance(ref, str) else ref
    fileobj, commit = open_range_file(parsed, endpoint=endpoint, token=token, retry=retry, block_size=block_size)
    source = str(ref)
    if parsed.path.endswith(INDEX_SUFFIX):
        return open_remote_index(parsed, commit, fileobj, source, endpoint=endpoint, token=token, retry=retry)
    checkpoint = open_fileobj(fileobj, name=parsed.path, source=source)
    checkpoint.commit = commit
    checkpoint.bytes_read = fileobj.bytes_fetched
    checkpoint.notes.append(f"read remotely at commit {commit}: {fileobj.bytes_fetched} of {fileobj.size} bytes "
                            f"fetched in {fileobj.requests} range requests")
    return checkpoint


def open_remote_index(ref: HfReference, commit: str, index_file: RangeFile, source: str, **remote) -> Checkpoint:
    """A sharded checkpoint on the hub: the index, then each shard read by ranges at one commit."""
    import posixpath

    from .sharded import ShardedCheckpoint, parse_index

    folder = posixpath.dirname(ref.path)

    def open_shard(shard: str) -> Checkpoint:
        return open_remote(HfReference(ref.repo_id, commit, posixpath.join(folder, shard) if folder else shard),
                           **remote)

    checkpoint = ShardedCheckpoint(source, parse_index(index_file.readall(), source), open_shard)
    checkpoint.commit = commit
    checkpoint.bytes_read = index_file.bytes_fetched + sum(p.bytes_read or 0 for p in checkpoint.shards.values())
    return checkpoint

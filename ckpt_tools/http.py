"""HTTP to the hub or a mirror: one retry policy, one view of what is worth retrying, file
metadata (HEAD) pinned to a commit, and range reads.

huggingface_hub does what it is good at here: endpoint and token handling, URL building and the
HEAD call that resolves a revision (``X-Repo-Commit``, ``ETag``). Everything that moves bytes (the
resumable download in ``hub/``, the remote reader in ``formats/remote.py``) goes through
``with_retries`` and ``RetryPolicy``, so a flaky link is treated the same way everywhere:
exponential backoff with jitter, ``Retry-After`` honoured, an attempt that moved bytes resets the
count, and settings (offline mode, a 404) are never retried.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from .errors import HubError, foreign_message
from .rawio import SizedReader

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BLOCK_SIZE = 64 * 1024
CACHE_BLOCKS = 256  # 16 MiB of blocks at most
USER_AGENT_LIBRARY = "ckpt-tools"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries per request, waiting ``base_delay * 2**n`` (capped at
    ``max_delay``, +-``jitter`` of it at random) between them, at least what ``Retry-After`` asks
    (up to ``max_retry_after``). A transfer that moved bytes starts counting again, so a flaky link
    still finishes a large file."""

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


class Transient(Exception):
    """A response worth retrying (429, 5xx) or a body that ended early."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), or None."""
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


def transient_status(response) -> Transient | None:
    """The Transient a response stands for (429, 5xx, with its Retry-After), or None."""
    if response.status_code in RETRY_STATUSES:
        return Transient(f"HTTP {response.status_code}", retry_after(response.headers.get("Retry-After")))
    return None


def _name_not_resolved(exc: BaseException) -> bool:
    """Whether a host name lookup failed somewhere down the error's chain (requests, urllib3 and
    httpx each wrap the socket.gaierror their own way)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen or len(seen) > 32:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror) or type(current).__name__ == "NameResolutionError":
            return True
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return False


def _requested_host(exc: BaseException) -> str | None:
    """The host a failed request went to, when the error kept the request (requests and httpx do)."""
    try:
        url = exc.request.url  # httpx raises RuntimeError when the error carries no request
    except (AttributeError, RuntimeError):
        return None
    return urlsplit(str(url)).hostname


def as_transient(exc: BaseException) -> Transient | None:
    """The retryable view of an error, or None when retrying cannot help. A host name that does
    not resolve is raised at once as a HubError: retrying a typo in HF_ENDPOINT only wastes time."""
    import httpx2
    import requests
    import urllib3
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, Transient):
        return exc
    if _name_not_resolved(exc):
        raise HubError(f"cannot resolve the host name {_requested_host(exc) or 'of the hub'!r} "
                       f"({foreign_message(exc)})",
                       fix="check the network, and HF_ENDPOINT (or --endpoint of download and validate; a "
                           "`ckpt serve` mirror is http://127.0.0.1:PORT)") from exc
    if isinstance(exc, OfflineModeIsEnabled):  # a setting, not a flaky network: retrying cannot help
        return None
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return transient_status(exc.response)
    network = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
               urllib3.exceptions.HTTPError, httpx2.TransportError, ConnectionError, TimeoutError)
    if isinstance(exc, network):
        return Transient(f"{type(exc).__name__}: {exc}")
    return None


def with_retries(call: Callable[[], object], policy: RetryPolicy, what: str):
    """``call()``, retried per ``policy`` while it fails transiently; a HubError naming ``what``
    when the attempts run out."""
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified right below
            transient = as_transient(exc)
            if transient is None:
                raise
            if attempt + 1 >= policy.attempts:
                raise HubError(f"{what} failed after {policy.attempts} attempts ({transient})",
                               fix="check the connection and run the same command again") from exc
            time.sleep(policy.delay(attempt, transient.retry_after))
    raise AssertionError("unreachable")  # pragma: no cover


def host(url: str) -> str:
    return urlsplit(url).netloc


def endpoint_url(endpoint: str | None = None) -> str:
    """The hub or mirror to talk to: ``endpoint``, else ``HF_ENDPOINT`` read now, else the hub."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def request_headers(token: str | bool | None = None) -> dict[str, str]:
    """The hub's headers (user agent, token) for a raw request; bodies are never re-encoded, so
    byte counts and hashes are of the file itself."""
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token, library_name=USER_AGENT_LIBRARY)
    headers["Accept-Encoding"] = "identity"
    return headers


@contextlib.contextmanager
def hub_errors(repo_id: str, path: str | None, revision: str) -> Iterator[None]:
    """Map huggingface_hub's refusals to one-line errors with a fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
                       fix="pass an existing branch, tag or full commit sha (--revision REV, or hf://ORG/NAME@REV)") from None
    except EntryNotFoundError:
        raise HubError(f"no file {path!r} at revision {revision!r}", path=repo_id, key=path,
                       fix=f"list the repo's files (ckpt download {repo_id} --dry-run), or check the revision") from None


def head_file(repo_id: str, path: str, revision: str, *, endpoint: str, token: str | bool | None,
              policy: RetryPolicy):
    """huggingface_hub's file metadata (commit, ETag, size, redirect location) of one file, the
    revision resolved by the server; refuses an endpoint that is not a hub."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    with hub_errors(repo_id, path, revision):
        meta = with_retries(lambda: get_hf_file_metadata(url, token=token, timeout=policy.timeout,
                                                         endpoint=endpoint),
                            policy, f"HEAD {url}")
    if not meta.commit_hash or not meta.etag:
        raise HubError("the server sent no X-Repo-Commit or ETag: not a hub endpoint", path=url,
                       fix="point HF_ENDPOINT (or --endpoint of download and validate) at a hub or `ckpt serve` mirror")
    return meta


class RangeFile(SizedReader):
    """A read-only, seekable view of a remote file that fetches byte ranges on demand.

    Reads are served from ``block_size`` blocks kept in a small LRU cache; contiguous missing
    blocks are fetched with one Range request. ``bytes_fetched`` counts body bytes received.
    """

    def __init__(self, url: str, size: int, *, headers: dict | None = None, etag: str | None = None,
                 block_size: int = BLOCK_SIZE, cache_blocks: int = CACHE_BLOCKS,
                 retry: RetryPolicy | None = None) -> None:
        import requests

        super().__init__(size)
        self.url, self.etag = url, etag
        self.headers = dict(headers or {})
        self.headers["Accept-Encoding"] = "identity"
        self.block_size, self.cache_blocks = block_size, cache_blocks
        self.retry = retry or RetryPolicy()
        self.bytes_fetched = 0
        self.requests = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._session = requests.Session()
        self._lock = threading.Lock()

    # -- io.RawIOBase --
    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n:
            view[:n] = self.read_at(self._pos, n)
            self._pos += n
        return n

    def readall(self) -> bytes:
        data = self.read_at(self._pos, max(0, self.size - self._pos))
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._session.close()
        super().close()

    # -- ranges --
    def read_at(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start``, from the block cache or one range request per run of
        missing blocks; a bulk read (tensor bytes) is fetched whole and not cached."""
        if length <= 0:
            return b""
        first, last = start // self.block_size, (start + length - 1) // self.block_size
        if last - first + 1 > self.cache_blocks // 2:
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
        def once() -> bytes:
            headers = {**self.headers, "Range": f"bytes={lo}-{hi}"}
            with self._session.get(self.url, headers=headers, timeout=self.retry.timeout, stream=True) as resp:
                self.requests += 1
                transient = transient_status(resp)
                if transient is not None:
                    raise transient
                if resp.status_code == 206:
                    body = resp.raw.read(hi - lo + 2, decode_content=False)
                    self.bytes_fetched += len(body)
                    expected = f"bytes {lo}-{hi}/{self.size}"
                    if resp.headers.get("Content-Range", "").strip() != expected or len(body) != hi - lo + 1:
                        raise Transient(f"unexpected range {resp.headers.get('Content-Range')!r}")
                    return body
                if resp.status_code == 200:
                    # The server ignored the Range: read up to the end of the range, drop the connection.
                    body = resp.raw.read(hi + 1, decode_content=False)
                    self.bytes_fetched += len(body)
                    if len(body) == hi + 1:
                        return body[lo:]
                    raise Transient(f"the body ended at {len(body)} of {hi + 1} bytes")
                raise HubError(f"the server answered HTTP {resp.status_code} to a range read", path=self.url,
                               fix="the endpoint must support HTTP Range requests (the hub and `ckpt serve` do)")

        return with_retries(once, self.retry, f"reading bytes {lo}-{hi} of {self.url}")


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs

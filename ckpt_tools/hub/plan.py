"""What a download will do, decided before a byte is written: ``plan_download(...) -> DownloadPlan``.

Planning talks to the hub read-only: it pins the revision to one commit (a branch or tag is
resolved once, before any file, and every file comes from that commit), lists the files when none
are named, and reads each file's metadata (size, ETag = sha256 for LFS files, a CDN redirect). It
then looks at the cache: a file already there (verified against the lock when one is obeyed) is
done; a partial file left by an interrupted run is where the transfer resumes. A file above
``chunk_size`` is planned in ranges over up to ``connections`` connections (``ranges.py``); at most
``connections`` requests run at once across all files. ``ckpt download --dry-run`` prints this
plan; ``execute`` (in ``download.py``) carries it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..convert_plan import parse_size
from ..errors import IntegrityError, UsageError
from ..fs import COMMIT_RE, SHA256_RE, check_output_name, sha256_file
from ..http import RetryPolicy, endpoint_url, head_file, host, hub_errors, request_headers, with_retries
from ..render import human_bytes, markdown_table, plural, rich_table
from .layout import CacheLayout, LocalDirLayout, default_cache_dir
from .lockfile import LockFile, read_lock
from .ranges import ALIGN, DEFAULT_CHUNK_SIZE, plan_ranges
from .transfer import DEFAULT_CONNECTIONS, Expect

HEAD_WORKERS = 8


@dataclass
class PlannedFile:
    """One file of the plan: what its bytes must be, where they come from, what is on disk."""

    path: str
    size: int | None
    expect: Expect | None  # None: cached and verified against the lock, no request needed
    url: str | None
    cached: Path | None = None  # the complete, verified local file
    partial_bytes: int = 0  # what a resume starts from
    ranges: int = 0  # 1: one stream; more: fetched in ranges (0: nothing to fetch)
    connections: int = 0  # how many connections the ranges still to fetch can use at once

    @property
    def action(self) -> str:
        if self.cached is not None:
            return "cached"
        return "resume" if self.partial_bytes else "fetch"

    @property
    def to_fetch(self) -> int | None:
        if self.cached is not None:
            return 0
        return None if self.size is None else self.size - self.partial_bytes

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.expect.sha256 if self.expect else None,
                "action": self.action, "partial_bytes": self.partial_bytes, "to_fetch": self.to_fetch,
                "ranges": self.ranges, "connections": self.connections,
                "local_path": str(self.cached) if self.cached else None}


@dataclass
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    layout: CacheLayout | LocalDirLayout
    files: list[PlannedFile] = field(default_factory=list)
    lock: LockFile | None = None  # the lock being obeyed (``locked``)
    lock_path: str | None = None  # where to record the result (a plain ``--lock``)
    token: str | bool | None = None
    headers: dict = field(default_factory=dict)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    connections: int = DEFAULT_CONNECTIONS  # at most this many requests at once, across all files
    chunk_size: int = DEFAULT_CHUNK_SIZE  # a file above this is fetched in ranges

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.to_fetch or 0 for f in self.files)

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "endpoint": self.endpoint, "bytes_to_fetch": self.bytes_to_fetch,
                "connections": self.connections, "chunk_size": self.chunk_size,
                "files": [f.to_dict() for f in self.files]}

    _HEADERS = ["path", "size", "action", "to fetch", "ranges / conns", "sha256"]

    def _rows(self) -> list[list[object]]:
        return [[f.path, "?" if f.size is None else human_bytes(f.size), f.action,
                 "?" if f.to_fetch is None else human_bytes(f.to_fetch),
                 f"{f.ranges} / {f.connections}" if f.ranges else "-",
                 (f.expect.sha256 or "-")[:16] if f.expect else "(locked)"] for f in self.files]

    def _title(self) -> str:
        return (f"{self.repo_id} @ {self.revision} -> {self.commit}: would fetch "
                f"{human_bytes(self.bytes_to_fetch)} ({sum(f.action != 'cached' for f in self.files)} of "
                f"{plural(len(self.files), 'file')})")

    def to_markdown(self) -> str:
        return f"**{self._title()}**\n\n" + markdown_table(self._HEADERS, self._rows())

    def rich_table(self):
        return rich_table(self._title(), self._HEADERS, self._rows(),
                          justify_right=("size", "to fetch", "ranges / conns"))


def plan_download(repo_id: str, filenames: Sequence[str] = (), *, revision: str = "main",
                  cache_dir: str | Path | None = None, local_dir: str | Path | None = None,
                  endpoint: str | None = None, token: str | bool | None = None, lock: str | Path | None = None,
                  locked: bool = False, retry: RetryPolicy | None = None, connections: int = DEFAULT_CONNECTIONS,
                  chunk_size: int | str = DEFAULT_CHUNK_SIZE, pinned: str | None = None) -> DownloadPlan:
    """The plan for ``download``; nothing is written. See the module docstring. ``pinned``: the
    commit ``revision`` was already resolved to (by a check just before), so no request resolves it
    again and the branch or tag still gets its ref in the cache."""
    if cache_dir is not None and local_dir is not None:
        raise UsageError("pass --cache-dir or --local-dir, not both",
                         fix="--local-dir writes plain files; --cache-dir the hub cache layout")
    if connections < 1:
        raise UsageError(f"--connections must be at least 1, not {connections}",
                         fix="pass 1 for one stream per file, more to fetch big files in parallel ranges")
    chunk_bytes = parse_size(chunk_size)
    if chunk_bytes < ALIGN:  # range boundaries sit on ALIGN multiples: a smaller range cannot be had
        raise UsageError(f"--chunk-size must be at least {human_bytes(ALIGN)}, not {human_bytes(chunk_bytes)}",
                         fix=f"pass {human_bytes(ALIGN)} or more (the default is {human_bytes(DEFAULT_CHUNK_SIZE)})")
    lockfile = read_lock(lock, locked, repo_id)
    if lock is not None and not locked:
        check_output_name(lock, "JSON")
    layout = (LocalDirLayout(Path(local_dir)) if local_dir is not None
              else CacheLayout(Path(cache_dir) if cache_dir else default_cache_dir(), repo_id))
    plan = DownloadPlan(repo_id, revision, "", endpoint_url(endpoint), layout, lock=lockfile,
                        lock_path=None if locked or lock is None else str(lock), token=token,
                        headers=request_headers(token), policy=retry or RetryPolicy(), connections=connections,
                        chunk_size=chunk_bytes)
    requested = list(dict.fromkeys(filenames))
    metas: dict[str, object] = {}
    if lockfile is not None:
        plan.revision, plan.commit = lockfile.revision, lockfile.commit
        requested = _locked_files(lockfile, requested, lock)
    elif pinned is not None or COMMIT_RE.match(revision):
        plan.commit = pinned or revision
    elif requested:
        metas[requested[0]] = head_file(repo_id, requested[0], revision, endpoint=plan.endpoint, token=token,
                                        policy=plan.policy)  # its X-Repo-Commit pins the whole call
        plan.commit = metas[requested[0]].commit_hash
    else:
        plan.commit = _resolve_revision(plan)
    if not requested:
        requested = _list_files(plan)
    with ThreadPoolExecutor(max(1, min(HEAD_WORKERS, len(requested))), thread_name_prefix="ckpt-head") as pool:
        plan.files = list(pool.map(lambda path: _plan_file(plan, path, metas.get(path)), requested))
    return plan


def _locked_files(lockfile: LockFile, requested: list[str], lock) -> list[str]:
    recorded = [f["path"] for f in lockfile.files]
    missing = [p for p in requested if p not in recorded]
    if missing:
        raise UsageError(f"{missing[0]} is not in the lock file", path=str(lock), key=missing[0],
                         fix="download it without --locked and --lock to update the lock")
    return requested or recorded


def _resolve_revision(plan: DownloadPlan) -> str:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=plan.endpoint, token=plan.token)
    with hub_errors(plan.repo_id, None, plan.revision):
        info = with_retries(lambda: api.repo_info(plan.repo_id, revision=plan.revision),
                            plan.policy, f"resolving {plan.repo_id}@{plan.revision}")
    return info.sha


def _list_files(plan: DownloadPlan) -> list[str]:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=plan.endpoint, token=plan.token)
    with hub_errors(plan.repo_id, None, plan.commit):
        return list(with_retries(lambda: api.list_repo_files(plan.repo_id, revision=plan.commit),
                                 plan.policy, f"listing {plan.repo_id}@{plan.commit}"))


def _plan_file(plan: DownloadPlan, path: str, meta=None) -> PlannedFile:
    """A locked file already in the cache with the locked bytes needs no request; any other file
    is looked up on the server (its metadata at the pinned commit) and then in the cache."""
    recorded = plan.lock.entry(path) if plan.lock is not None else None
    if recorded is not None:
        cached = plan.layout.cached(path, plan.commit)
        if cached is not None and cached.stat().st_size == recorded["size"] \
                and sha256_file(cached) == recorded["sha256"]:
            return PlannedFile(path, recorded["size"], None, None, cached=cached)
    meta = meta or head_file(plan.repo_id, path, plan.commit, endpoint=plan.endpoint, token=plan.token,
                             policy=plan.policy)
    expect = _expectation(plan, path, meta, recorded)
    planned = PlannedFile(path, expect.size, expect, _download_url(plan, path, meta))
    if plan.layout.has(path, expect.etag, expect.size):
        planned.cached = plan.layout.final(path, expect.etag)
        return planned
    partial = plan.layout.partial(path, expect.etag)
    planned.partial_bytes, planned.ranges, planned.connections = plan_ranges(partial, expect, plan.chunk_size,
                                                                             plan.connections)
    return planned


def _download_url(plan: DownloadPlan, path: str, meta) -> str:
    """The file at the pinned commit; a redirect target only when it leaves the hub (a CDN)."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(plan.repo_id, path, revision=plan.commit, endpoint=plan.endpoint)
    if meta.location and host(meta.location) != host(url):
        return meta.location
    return url


def _expectation(plan: DownloadPlan, path: str, meta, recorded: dict | None) -> Expect:
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
                path=f"{plan.repo_id}@{plan.commit}", key=path,
                fix="the mirror serves other bytes for the locked commit: check it, or re-lock deliberately")
        sha256 = recorded["sha256"]
    return Expect(etag, meta.size, sha256, git_sha1)

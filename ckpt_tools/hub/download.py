"""``download(repo_id, files, ...)``: plan, then fetch every file of the plan, verified.

The plan (``plan.py``) pins the commit and says what is cached; here each remaining file is
transferred under a per-blob ``flock`` (the same lock file huggingface_hub takes, so two processes
keep apart), several files in parallel, and made visible under its path only once its bytes are
verified: a big file in ranges over several connections (``ranges.py``), falling back to one
stream (``transfer.py``) when the server cannot serve ranges, any other file over one stream. The
lock file, when asked for, records what was fetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import IntegrityError
from ..fs import file_lock, sha256_file
from ..http import RetryPolicy
from ..render import human_bytes, markdown_table, rich_table
from .lockfile import LockFile
from .plan import DownloadPlan, PlannedFile, plan_download
from .progress import Progress
from .ranges import DEFAULT_CHUNK_SIZE, keep_prefix, plan_ranges, transfer_ranges
from .transfer import DEFAULT_CONNECTIONS, Expect, RangesUnsupported, TransferContext, Transferred, transfer


@dataclass
class DownloadedFile:
    path: str
    local_path: str
    size: int
    sha256: str
    bytes_transferred: int = 0
    resumed_from: int = 0
    ranges: int = 0  # 1: one stream; more: fetched in ranges (0: nothing fetched)
    connections: int = 0
    notes: list[str] = field(default_factory=list)


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
        return [[f.path, human_bytes(f.size), f.sha256[:16], human_bytes(f.bytes_transferred),
                 human_bytes(f.resumed_from) if f.resumed_from else "-",
                 f"{f.ranges} / {f.connections}" if f.ranges else "-", f.local_path] for f in self.files]

    _HEADERS = ["path", "size", "sha256", "transferred", "resumed from", "ranges / conns", "local path"]

    def _title(self) -> str:
        return f"{self.repo_id} @ {self.revision} -> {self.commit}"

    def to_markdown(self) -> str:
        return f"**{self._title()}**\n\n" + markdown_table(self._HEADERS, self._rows())

    def rich_table(self):
        return rich_table(self._title(), self._HEADERS, self._rows(),
                          justify_right=("size", "transferred", "resumed from", "ranges / conns"))


def download(repo_id: str, filenames: Sequence[str] = (), *, revision: str = "main",
             cache_dir: str | Path | None = None, local_dir: str | Path | None = None,
             endpoint: str | None = None, token: str | bool | None = None, lock: str | Path | None = None,
             locked: bool = False, retry: RetryPolicy | None = None, max_workers: int = 4,
             progress: bool | None = None, connections: int = DEFAULT_CONNECTIONS,
             chunk_size: int | str = DEFAULT_CHUNK_SIZE, pinned: str | None = None) -> DownloadResult:
    """Download ``filenames`` (all files of the revision when empty) of ``repo_id`` at one commit,
    verified, into the hub cache (or ``local_dir``). With ``lock``, record what was fetched; with
    ``locked=True``, fetch exactly what ``lock`` records and fail if the server's bytes differ.
    A file above ``chunk_size`` is fetched in ranges over up to ``connections`` connections; at
    most ``connections`` requests run at once across the ``max_workers`` files in flight. ``pinned``:
    the commit ``revision`` was already resolved to (see ``plan_download``)."""
    plan = plan_download(repo_id, filenames, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                         endpoint=endpoint, token=token, lock=lock, locked=locked, retry=retry,
                         connections=connections, chunk_size=chunk_size, pinned=pinned)
    return execute(plan, max_workers=max_workers, progress=progress)


def execute(plan: DownloadPlan, *, max_workers: int = 4, progress: bool | None = None) -> DownloadResult:
    """Carry out a plan: every file not cached is transferred, verified and placed."""
    ctx = TransferContext(plan.endpoint, plan.headers, plan.policy, Progress(progress), plan.connections)
    with ctx.progress:
        workers = max(1, min(max_workers, len(plan.files)))
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-download") as pool:
            futures = [pool.submit(_fetch, plan, ctx, planned) for planned in plan.files]
            try:
                files = [f.result() for f in futures]
            except KeyboardInterrupt:
                # Without this the pool's exit would wait for every transfer to finish after Ctrl-C.
                ctx.cancelled.set()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    if plan.lock is None:
        plan.layout.write_ref(plan.revision, plan.commit)
    result = DownloadResult(plan.repo_id, plan.revision, plan.commit, files)
    if plan.lock_path is not None:
        LockFile(plan.repo_id, plan.revision, plan.commit,
                 [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files]).write(plan.lock_path)
    return result


def _fetch(plan: DownloadPlan, ctx: TransferContext, planned: PlannedFile) -> DownloadedFile:
    """One file of the plan: placed from the cache, or transferred, under the blob's lock."""
    path, expect = planned.path, planned.expect
    if expect is None:  # locked and verified while planning
        return DownloadedFile(path, str(planned.cached), planned.size, plan.lock.entry(path)["sha256"])
    layout = plan.layout
    with file_lock(layout.lock(path, expect.etag)):
        if layout.has(path, expect.etag, expect.size):  # another process may have finished it meanwhile
            done = Transferred(_verify_existing(layout.final(path, expect.etag), expect, path), 0, 0, 0, 0)
        else:
            done = _transfer(plan, ctx, planned)
    local = layout.place(path, expect.etag, plan.commit)
    size = layout.final(path, expect.etag).stat().st_size
    return DownloadedFile(path, str(local), size, done.sha256, done.transferred, done.resumed_from, done.ranges,
                          done.connections, done.notes)


def _transfer(plan: DownloadPlan, ctx: TransferContext, planned: PlannedFile) -> Transferred:
    """The bytes of one file: in ranges when it is big (or a ranged partial file is there to
    resume), else, or when the server cannot serve ranges, over one stream."""
    path, expect = planned.path, planned.expect
    partial, final = plan.layout.partial(path, expect.etag), plan.layout.final(path, expect.etag)
    label = f"{plan.repo_id}@{plan.commit}"
    fallback = None
    # decided again under the lock: another process may have left a partial file since the plan
    if plan_ranges(partial, expect, plan.chunk_size, plan.connections)[1] > 1:
        try:
            return transfer_ranges(ctx, path, planned.url, expect, partial, final, label, plan.chunk_size)
        except RangesUnsupported as exc:
            fallback = f"{exc}: fetched over one stream"
            ctx.progress.note(f"{path}: {fallback}")
    keep_prefix(partial, expect)  # a ranged partial file goes on as its contiguous prefix
    done = transfer(ctx, path, planned.url, expect, partial, final, label)
    if fallback is not None:
        done.notes.insert(0, fallback)
    return done


def _verify_existing(blob: Path, expect: Expect, path: str) -> str:
    """sha256 of a cached blob: a blob named by its sha256 was checked when it was written."""
    if expect.sha256 is not None and blob.name == expect.sha256:
        return expect.sha256
    digest = sha256_file(blob)
    if expect.sha256 is not None and digest != expect.sha256:
        raise IntegrityError(f"the cached file's sha256 {digest[:16]}... differs from {expect.sha256[:16]}...",
                             path=str(blob), key=path, fix="delete the cached file and download again")
    return digest



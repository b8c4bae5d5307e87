"""Lock files: the commit and every file's size and sha256, so a later run fetches exactly that."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError
from ..fs import COMMIT_RE, atomic_write


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
        atomic_write(Path(path), (json.dumps(asdict(self), indent=2) + "\n").encode())

    def entry(self, path: str) -> dict | None:
        return next((f for f in self.files if f["path"] == path), None)


def read_lock(lock: str | Path | None, locked: bool, repo_id: str) -> LockFile | None:
    """The lock to obey (``--locked``), checked to be for ``repo_id``; None when not locked."""
    if locked and lock is None:
        raise UsageError("--locked needs --lock FILE", fix="pass the lock file written by an earlier --lock run")
    if not locked:
        return None
    lockfile = LockFile.read(lock)
    if lockfile.repo != repo_id:
        raise UsageError(f"the lock file is for {lockfile.repo}, not {repo_id}", path=str(lock),
                         fix=f"run `ckpt download {lockfile.repo} --lock {lock} --locked`")
    return lockfile

"""Where downloaded bytes go: the standard hub cache, or plain files in a local folder.

Both layouts answer the same questions (where the final blob, the partial file and the lock of a
file live; whether it is there already; how to make it visible under its path), so the transfer
code never asks which one it writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..fs import atomic_symlink, atomic_write


def default_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub read them at its import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


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
        target = os.path.relpath(self.final(path, etag), pointer.parent)
        if not (pointer.is_symlink() and os.readlink(pointer) == target):
            atomic_symlink(target, pointer)
        return pointer

    def write_ref(self, revision: str, commit: str) -> None:
        if revision == commit:
            return
        ref = self.storage / "refs" / revision
        if not ref.is_file() or ref.read_text() != commit:
            atomic_write(ref, commit.encode())


class LocalDirLayout:
    """Plain files under ``local_dir`` plus huggingface_hub's metadata files, so
    ``hf_hub_download(local_dir=...)`` recognises them."""

    def __init__(self, local_dir: Path) -> None:
        self.root = local_dir

    def final(self, path: str, etag: str) -> Path:
        return self.root / path

    def partial(self, path: str, etag: str) -> Path:
        from huggingface_hub._local_folder import get_local_download_paths

        return get_local_download_paths(self.root, path).incomplete_path(etag)

    def lock(self, path: str, etag: str) -> Path:
        return Path(f"{self.partial(path, etag)}.lock")

    def local_path(self, path: str, commit: str) -> Path:
        return self.root / path

    def has(self, path: str, etag: str, size: int | None) -> bool:
        meta = self._metadata(path)
        return meta is not None and meta.etag == etag and (size is None or self.final(path, etag).stat().st_size == size)

    def cached(self, path: str, commit: str) -> Path | None:
        meta = self._metadata(path)
        return self.root / path if meta is not None and meta.commit_hash == commit else None

    def place(self, path: str, etag: str, commit: str) -> Path:
        from huggingface_hub._local_folder import write_download_metadata

        write_download_metadata(self.root, path, commit, etag)
        return self.root / path

    def write_ref(self, revision: str, commit: str) -> None:
        pass

    def _metadata(self, path: str):
        from huggingface_hub._local_folder import read_download_metadata

        return read_download_metadata(self.root, path) if (self.root / path).is_file() else None

"""Sharded checkpoints: ``*.safetensors.index.json`` / ``pytorch_model.bin.index.json``.

The index maps each key to a shard file in the same folder. Shard names are validated (no ``..``,
no absolute paths, every shard present) before anything is opened; shards are opened lazily and
kept open, so listing a 30-shard safetensors checkpoint reads 30 headers and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ..errors import CheckpointNotFoundError, InvalidCheckpointError
from ..reader import Checkpoint

INDEX_SUFFIX = ".index.json"


def sniff(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def parse_index(raw: bytes, source: str) -> dict:
    """The index JSON, checked to hold a ``weight_map`` object."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpointError(f"index is not valid JSON ({exc})", path=source,
                                     fix="regenerate the index") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise InvalidCheckpointError("index has no 'weight_map' object", path=source,
                                     fix="an index needs {\"weight_map\": {key: shard file}}")
    return index


def shard_names(index: dict) -> list[str]:
    return list(dict.fromkeys(index["weight_map"].values()))


def check_shard_name(shard: object, source: str) -> PurePosixPath:
    """A shard name as a relative path that stays inside the index's folder."""
    if not isinstance(shard, str) or not shard:
        raise InvalidCheckpointError(f"weight_map names a shard {shard!r} that is not a file name", path=source,
                                     fix="each weight_map value must be a shard file name")
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts or "\\" in shard:
        raise InvalidCheckpointError(f"shard name {shard!r} escapes the checkpoint folder", path=source,
                                     fix="shard names must be plain relative names inside the index's folder")
    return pure


def local_shards(index_path: Path, index: dict, source: str) -> dict[str, Path]:
    """{shard name: path} for a local index, every name validated and every shard present."""
    paths = {shard: index_path.parent / check_shard_name(shard, source) for shard in shard_names(index)}
    for shard, path in paths.items():
        if not path.is_file():
            raise CheckpointNotFoundError(f"index names shard '{shard}', which is missing", path=source,
                                          fix=f"download or copy {shard} next to the index")
    return paths


class ShardedCheckpoint(Checkpoint):
    """An index and its shards, each shard opened by ``open_shard(name)`` (local or remote)."""

    format = "sharded"

    def __init__(self, source: str, index: dict, open_shard: Callable[[str], Checkpoint]) -> None:
        super().__init__(source)
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self.shards: dict[str, Checkpoint] = {}
        try:
            for shard in shard_names(index):
                check_shard_name(shard, source)
                self.shards[shard] = open_shard(shard)
        except BaseException:
            self.close()
            raise
        self._where: dict[str, Checkpoint] = {}
        for key, shard in index["weight_map"].items():
            part = self.shards[shard]
            if key not in part:
                raise InvalidCheckpointError(f"index places this key in '{shard}', which does not hold it",
                                             path=source, key=key, fix="regenerate the index from the shards")
            self._where[key] = part
            self._metas[key] = part.meta(key)
        self.format = "sharded-" + next(iter(self.shards.values())).format if self.shards else "sharded"
        self._collect_from_shards()

    def _collect_from_shards(self) -> None:
        for shard, part in self.shards.items():
            self.extras.update({f"{shard}:{k}": v for k, v in part.extras.items()})
            self.aliases.extend(part.aliases)
            self.notes.extend(f"{shard}: {note}" for note in part.notes)
            if part.wrapper and not self.wrapper:
                self.wrapper = part.wrapper

    def extra_values(self) -> dict[str, object]:
        return {f"{shard}:{k}": v for shard, part in self.shards.items() for k, v in part.extra_values().items()}

    def _load_tensor(self, key: str):
        return self._where[key].tensor(key)

    def close(self) -> None:
        for part in getattr(self, "shards", {}).values():
            part.close()


def open_index_path(index_path: Path, source: str) -> ShardedCheckpoint:
    from . import open_local

    index = parse_index(index_path.read_bytes(), source)
    paths = local_shards(index_path, index, source)
    return ShardedCheckpoint(source, index, lambda shard: open_local(paths[shard]))

"""Sharded checkpoints: ``*.safetensors.index.json`` / ``pytorch_model.bin.index.json``.

The index maps each key to a shard file in the same folder. Shard names are validated (no ``..``,
no absolute paths, every shard present) before anything is opened; shards are opened lazily and
kept open, so listing a 30-shard safetensors checkpoint reads 30 headers and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from ..errors import CheckpointNotFoundError, InvalidCheckpointError
from ..reader import Checkpoint

INDEX_SUFFIX = ".index.json"


def sniff(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def _shard_path(index_path: Path, shard: object, source: str) -> Path:
    if not isinstance(shard, str) or not shard:
        raise InvalidCheckpointError(f"weight_map names a shard {shard!r} that is not a file name", path=source,
                                     fix="each weight_map value must be a shard file name")
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts or "\\" in shard:
        raise InvalidCheckpointError(f"shard name {shard!r} escapes the checkpoint folder", path=source,
                                     fix="shard names must be plain relative names inside the index's folder")
    return index_path.parent / pure


class ShardedCheckpoint(Checkpoint):
    format = "sharded"

    def __init__(self, index_path: Path, source: str) -> None:
        super().__init__(source)
        index = self._read_index(index_path, source)
        weight_map = index["weight_map"]
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        shard_paths = {s: _shard_path(index_path, s, source) for s in dict.fromkeys(weight_map.values())}
        for shard, shard_path in shard_paths.items():
            if not shard_path.is_file():
                raise CheckpointNotFoundError(f"index names shard '{shard}', which is missing", path=source,
                                              fix=f"download or copy {shard} next to the index")
        from . import open_local

        self._shards = {}
        try:
            for shard, shard_path in shard_paths.items():
                self._shards[shard] = open_local(shard_path)
        except BaseException:
            self.close()
            raise
        self._where: dict[str, Checkpoint] = {}
        for key, shard in weight_map.items():
            part = self._shards[shard]
            if key not in part:
                raise InvalidCheckpointError(f"index places this key in '{shard}', which does not hold it",
                                             path=source, key=key, fix="regenerate the index from the shards")
            self._where[key] = part
            self._metas[key] = part.meta(key)
        self.format = "sharded-" + next(iter(self._shards.values())).format if self._shards else "sharded"
        self._collect_from_shards()

    @staticmethod
    def _read_index(index_path: Path, source: str) -> dict:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidCheckpointError(f"index is not valid JSON ({exc})", path=source,
                                         fix="regenerate the index") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise InvalidCheckpointError("index has no 'weight_map' object", path=source,
                                         fix="an index needs {\"weight_map\": {key: shard file}}")
        return index

    def _collect_from_shards(self) -> None:
        for shard, part in self._shards.items():
            self.extras.update({f"{shard}:{k}": v for k, v in part.extras.items()})
            self.aliases.extend(part.aliases)
            self.notes.extend(f"{shard}: {note}" for note in part.notes)
            if part.wrapper and not self.wrapper:
                self.wrapper = part.wrapper

    def extra_values(self) -> dict[str, object]:
        return {f"{shard}:{k}": v for shard, part in self._shards.items() for k, v in part.extra_values().items()}

    def _load_tensor(self, key: str):
        return self._where[key].tensor(key)

    def close(self) -> None:
        for part in getattr(self, "_shards", {}).values():
            part.close()

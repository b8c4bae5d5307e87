"""Sharded checkpoints: ``*.safetensors.index.json`` / ``pytorch_model.bin.index.json``.

The index maps each key to a shard file in the same folder; ``sources`` has validated every shard
name (no ``..``, no absolute paths, every local shard present) before this opens anything. Each
shard is opened by the ``open_shard`` callable the registry passes (local or remote alike) and
kept open, so listing a 30-shard safetensors checkpoint reads 30 headers and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from ..checkpoint import Checkpoint
from ..errors import InvalidCheckpointError
from ..sources import shard_names


class ShardedCheckpoint(Checkpoint):
    """An index and its shards, each shard opened by ``open_shard(name)`` (local or remote)."""

    format = "sharded"

    def __init__(self, source: str, index: dict, open_shard: Callable[[str], Checkpoint]) -> None:
        super().__init__(source)
        self._copied = 0
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self.shards: dict[str, Checkpoint] = {}
        try:
            for shard in shard_names(index):
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
        self.restore_recorded_aliases()

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

    @property
    def data_bytes_read(self) -> int:
        """Bytes read by ``read_slice``, all shards together."""
        return self._copied + sum(getattr(part, "data_bytes_read", 0) for part in self.shards.values())

    def read_slice(self, key: str, offsets, sizes, out=None):
        """A block of a tensor, read by its shard: only its byte runs where the shard's reader can,
        else copied from the mapped tensor (and its bytes counted)."""
        self.meta(key)
        key = self.stored_key(key)
        part = self._where[key]
        reader = getattr(part, "read_slice", None)
        if reader is not None:
            return reader(key, offsets, sizes, out=out)
        block = part.tensor(key)[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
        block = block.clone() if out is None else out.copy_(block)
        self._copied += block.numel() * block.element_size()
        return block

    def close(self) -> None:
        for part in getattr(self, "shards", {}).values():
            part.close()

"""The Checkpoint: what every format's reader gives, a lazy view of one checkpoint.

A Checkpoint lists keys, shapes, dtypes, aliases, metadata and non-tensor extras without reading
tensor bytes; ``tensor(key)`` materialises one tensor at a time. Readers (``formats/``) subclass it;
``formats.open_checkpoint`` picks the reader. This module imports nothing else of the project but
errors and meta, so every layer can name the type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidCheckpointError, UnsupportedFormatError
from .meta import TensorMeta

ALIASES_KEY = "ckpt_tools.aliases"  # metadata a conversion writes: JSON {name stored once: the name kept}


def recorded_aliases(metadata: dict[str, str] | None) -> dict[str, str] | None:
    """{name stored once: the name kept} from a conversion's ``ALIASES_KEY`` metadata ({} when there
    is none; None when it is not a JSON object of names)."""
    try:
        recorded = json.loads((metadata or {}).get(ALIASES_KEY) or "{}")
    except ValueError:
        return None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return None
    return recorded


class Checkpoint:
    """Base class of every format's reader. Subclasses fill the fields and implement
    ``_load_tensor``; everything else is shared.

    Fields:
      source   what the user passed (path or hf:// reference)
      format   registry name of the format (``safetensors``, ``torch-zip``, ...)
      wrapper  where inside the file the state dict was found (``model_state_dict``), or None
      metadata str -> str metadata (safetensors ``__metadata__``, index metadata)
      extras   non-tensor entries found beside the state dict: {dotted name: type name}
      notes    things the user should know about how the file was read
      aliases  groups of names that share one tensor (same storage, offset, shape, stride)
      files    the local files it reads (an index and its shards); empty when remote
      picked, other_files   when SOURCE was a folder: the file read, the folder's other files
      alternatives  other state dicts found beside the selected one, best first
               (``selection.Alternative``: path, kind, tensors, nbytes, select); [] where the
               format holds one state dict
      selection  the whole ``selection.Selection`` (what was chosen, how, alternatives, extras)
               where the reader chose a state dict inside the file; else None
      accounting  every tensor of the file and where it went (``selection.Accounting``: buckets
               selected / alternative / optimizer / extra, totals, whether ``select`` named it);
               None where the listing is the whole file
      not_executed  {global: [key paths]} of what a pickle named and was replaced by an inert
               placeholder, never imported or called ("" = the top level, [] = in no entry)
    """

    format: str = "unknown"

    def __init__(self, source: str) -> None:
        self.source = str(source)
        self.wrapper: str | None = None
        self.metadata: dict[str, str] = {}
        self.extras: dict[str, str] = {}
        self.notes: list[str] = []
        self.aliases: list[list[str]] = []
        self.alternatives: list = []
        self.accounting = None
        self.selection = None  # selection.Selection where a state dict was chosen inside the file
        self.not_executed: dict[str, list[str]] = {}
        self._metas: dict[str, TensorMeta] = {}
        self.bytes_read: int | None = None
        self.commit: str | None = None  # the hub commit a remote checkpoint was read at
        self.files: list[Path] = []
        self.picked: str | None = None
        self.other_files: list[str] = []
        self._stored_as: dict[str, str] = {}  # a recorded alias -> the name its bytes are stored under

    def restore_recorded_aliases(self) -> None:
        """List again the names a conversion stored once (``ALIASES_KEY`` metadata, written because
        safetensors cannot store one tensor under two names), as aliases of the name kept: a tied
        ``lm_head.weight`` stays in the checkpoint for every reader, diff and load."""
        recorded = recorded_aliases(self.metadata)
        if recorded is None:
            self.notes.append(f"the {ALIASES_KEY} metadata is not a JSON object of names: ignored")
            return
        for removed, kept in recorded.items():
            if kept not in self._metas or removed in self._metas:
                continue
            self._metas[removed] = self._metas[kept].renamed(removed)
            self._stored_as[removed] = kept
            group = next((g for g in self.aliases if kept in g), None)
            if group is None:
                self.aliases.append([kept, removed])
            elif removed not in group:
                group.append(removed)

    def stored_key(self, key: str) -> str:
        """The name ``key``'s bytes are stored under (itself, unless it is a recorded alias)."""
        return self._stored_as.get(key, key)

    # -- listing (no tensor bytes) --
    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        try:
            return self._metas[key]
        except KeyError:
            raise InvalidCheckpointError("no such tensor in the checkpoint", path=self.source, key=key,
                                         fix="run `ckpt inspect` to list its keys") from None

    def metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def __contains__(self, key: str) -> bool:
        return key in self._metas

    def __iter__(self) -> Iterator[str]:
        return iter(self._metas)

    def __len__(self) -> int:
        return len(self._metas)

    def extra_values(self) -> dict[str, object]:
        """{name in ``extras``: the value itself} where the format keeps it (torch pickles); else {}."""
        return {}

    def pickled_root(self):
        """The whole unpickled object, tensors included (torch pickles only)."""
        raise UnsupportedFormatError(f"a {self.format} checkpoint is not a pickle", path=self.source,
                                     fix="use ckpt convert for safetensors output")

    # -- bytes --
    def tensor(self, key: str):
        """The tensor stored under ``key`` (a CPU torch tensor), read on demand."""
        self.meta(key)
        return self._load_tensor(self.stored_key(key))

    def _load_tensor(self, key: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def check_stored_sums(self) -> int:
        """Check the bytes against checksums the file stores for them (a torch zip's CRC-32 per
        storage record), raising InvalidCheckpointError on the first that fails; the number checked. Most
        formats store none: 0."""
        return 0

    # -- lifetime --
    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source!r} format={self.format} tensors={len(self)}>"

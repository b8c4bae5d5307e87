"""Torch pickles: zip format (``torch.save`` since 1.6) and the legacy (non-zip) format.

Both are read by ``ckpt_tools.inert`` without torch.load and without running the pickle: the
structure comes back with tensor references, the model's state dict is chosen by content
(``wrappers.choose``), and tensor bytes are memory-mapped from the file on demand. Listing reads
the pickle and the zip directory (or the legacy storage headers) only, and imports no torch.

Options (``open_checkpoint(path, **options)``): ``select="dotted.path"`` takes that state dict
instead of the chosen one; ``inert=True`` also reads a pickle that names code-running globals
(they are still never imported or called; by default such a file is refused).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import Checkpoint
from ..errors import InvalidCheckpointError, UsageError
from ..fs import crc32_range
from ..inert import (
    Contents,
    MappedStorages,
    StorageRef,
    TensorRef,
    TorchName,
    is_inert,
    plain,
    read_legacy,
    read_zip,
)
from ..meta import TensorMeta
from ..pickle_safety import check_zip_records
from .wrappers import choose, selection_notes

OPTIONS = ("select", "inert")
_LEGACY_NOTE = ("legacy (non-zip) torch pickle: storages that sit unaligned after the pickles are copied "
                "when read; convert it to .safetensors for fast access")


class TorchCheckpoint(Checkpoint):
    """A torch pickle read inertly: the selected state dict lists from the pickle alone; tensors
    are views of a memory map of the file (None for a remote listing, which has no bytes).

    Beside the base fields, ``selection`` is the whole ``selection.Selection`` (its report
    methods render the choice, the alternatives and the accounting).
    """

    def __init__(self, source: str, contents: Contents, storages: MappedStorages | None,
                 select: str | None = None) -> None:
        super().__init__(source)
        self.format = contents.format
        selection = choose(contents.root, source, select)
        self.selection = selection
        self.wrapper, self.extras = selection.wrapper, dict(selection.extras)
        self.alternatives, self.accounting = list(selection.alternatives), selection.accounting
        self.not_executed = {name: list(paths) for name, paths in selection.not_executed.items()}
        for name in contents.not_executed:  # named by the pickle but left behind in no entry
            self.not_executed.setdefault(name, [])
        self.notes = [*contents.notes, *selection.notes, *selection_notes(selection, self.not_executed)]
        self._root, self._refs, self._storages = contents.root, selection.state, storages
        self._records = contents.records
        self._metas = {name: TensorMeta.of(name, ref.shape, ref.dtype) for name, ref in self._refs.items()}
        self.aliases = _alias_groups(self._refs)

    def byte_span(self, key: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) when the tensor's bytes are one contiguous range of a local file."""
        if self._storages is None:
            return None
        return self._storages.byte_span(self._refs[key])

    def check_stored_sums(self) -> int:
        """The CRC-32 of every storage record the selected tensors use. torch.load never checks
        them, so a file damaged after torch.save loads without a word. A file saved with
        ``torch.serialization.set_crc32_options(False)`` has none to check."""
        if self._storages is None:
            return 0
        used = {ref.storage.key for ref in self._refs.values() if ref.storage.key in self._records}
        checked = 0
        for key in sorted(used):
            offset, size, crc = self._records[key]
            if crc32_range(self._storages.path, offset, size) != crc:
                raise InvalidCheckpointError(f"storage record data/{key} fails its CRC-32 check: its bytes changed "
                                     "after torch.save wrote them", path=self.source,
                                     key=next(k for k, r in self._refs.items() if r.storage.key == key),
                                     fix="download or copy the file again (torch.load would read the damaged "
                                         "values without a word)")
            checked += 1
        return checked

    def _load_tensor(self, key: str):
        if self._storages is None:
            raise UsageError("tensor bytes are not available from a remote listing", path=self.source, key=key,
                             fix="download the file first (ckpt download) and open the local copy")
        return self._storages.tensor(self._refs[key])

    def extra_values(self) -> dict[str, object]:
        """The values behind ``extras``; objects that were not executed are shown as what the
        pickle said (``inert.plain``), so a Namespace's fields can be written as JSON."""
        return {name: plain(value) for name, value in self.selection.extra_values.items()}

    def tensor_ref(self, key: str) -> TensorRef:
        """Where the tensor under ``key`` lies: its storage and view, as the pickle says."""
        self.meta(key)
        return self._refs[key]

    def storage_range(self, storage: StorageRef) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) of a storage's bytes in a local file; None for a remote listing."""
        if self._storages is None:
            return None
        return self._storages.storage_span(storage)

    def inert_root(self):
        """The whole object as read inertly (``TensorRef`` leaves), for rewriting the pickle;
        refused like ``pickled_root``."""
        if self._storages is None:
            raise UsageError("tensor bytes are not available from a remote listing", path=self.source,
                             fix="download the file first (ckpt download) and open the local copy")
        found = [name for name in self.not_executed if self.not_executed[name]]
        if found:
            raise UsageError(f"the pickle holds objects that were not executed ({', '.join(found[:4])}), which "
                             "cannot be written back", path=self.source,
                             fix="convert it to safetensors with `ckpt convert` instead")
        return self._root

    def pickled_root(self):
        """The whole object with real tensors (for rewriting the pickle with torch); refused when it
        holds objects that were not executed, which cannot be written back as they were."""
        return _materialised(self.inert_root(), self._storages, self.source)

    def close(self) -> None:
        if self._storages is not None:
            self._storages.close()
        self._root, self._refs = None, {}


def _alias_groups(refs: dict[str, TensorRef]) -> list[list[str]]:
    """Names that view the same bytes (same storage, offset, shape, stride and dtype)."""
    groups: dict[tuple, list[str]] = {}
    for name, ref in refs.items():
        if math.prod(ref.shape):
            groups.setdefault(ref.identity(), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _materialised(root, storages: MappedStorages, source: str):
    """``root`` with TensorRefs as tensors (shared storages stay shared), dtype, device and size
    names as torch objects; containers keep their types."""
    import torch

    done: dict[int, object] = {}

    def convert(value, depth: int):
        if depth > 200:
            raise UsageError("the pickle nests too deeply to be written back", path=source,
                             fix="convert it to safetensors with `ckpt convert` instead")
        if isinstance(value, TensorRef):
            tensor = storages.tensor(value)
            return torch.nn.Parameter(tensor, requires_grad=False) if value.parameter else tensor
        if isinstance(value, TorchName):
            return _torch_value(value, source)
        if is_inert(value):
            raise UsageError(f"the pickle holds {value!r:.80}, which cannot be written back", path=source,
                             fix="convert it to safetensors with `ckpt convert` instead")
        if id(value) in done:
            return done[id(value)]
        if isinstance(value, dict):
            out = OrderedDict() if isinstance(value, OrderedDict) else {}
            done[id(value)] = out
            out.update((k, convert(v, depth + 1)) for k, v in value.items())
            if isinstance(out, OrderedDict) and hasattr(value, "_metadata"):  # a state dict's module versions
                out._metadata = convert(value._metadata, depth + 1)
            return out
        if isinstance(value, list):
            out = []
            done[id(value)] = out
            out.extend(convert(v, depth + 1) for v in value)
            return out
        if isinstance(value, tuple):
            items = tuple(convert(v, depth + 1) for v in value)
            return torch.Size(items) if type(value).__name__ == "Size" else items
        if isinstance(value, set | frozenset):
            return type(value)(convert(v, depth + 1) for v in value)
        return value

    return convert(root, 0)


def _torch_value(name: TorchName, source: str):
    import torch

    if name.kind == "device":
        return torch.device(str(name))
    attribute = str(name).removeprefix("torch.")
    value = getattr(torch, attribute, None) if "." not in attribute else None
    if value is None:
        raise UsageError(f"{name} has no torch counterpart here", path=source,
                         fix="convert it to safetensors with `ckpt convert` instead")
    return value


def check_options(options: dict, source: str) -> tuple[str | None, bool]:
    """(select, inert) from a reader's options; anything else is a UsageError."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)}", path=source,
                         fix=f"options of a torch checkpoint: {', '.join(OPTIONS)}")
    select, inert = options.get("select"), options.get("inert", False)
    if select is not None and not isinstance(select, str):
        raise UsageError("select takes a dotted path (a string)", path=source, fix="e.g. select='model_ema'")
    return select, bool(inert)


def open_zip_path(path: Path, source: str, **options) -> TorchCheckpoint:
    select, inert = check_options(options, source)
    check_zip_records(path, source)  # a compressed record that inflates absurdly is refused before any read
    with path.open("rb") as handle:
        contents = read_zip(handle, source, inert=inert)
    return TorchCheckpoint(source, contents, MappedStorages(path, contents.spans), select)


def open_zip_fileobj(fileobj: BinaryIO, source: str, size: int, **options) -> TorchCheckpoint:
    """A remote (range-read) file: the listing only, no tensor bytes."""
    select, inert = check_options(options, source)
    check_zip_records(fileobj, source)
    try:
        contents = read_zip(fileobj, source, locate=False, inert=inert)
    finally:
        fileobj.seek(0)
    return TorchCheckpoint(source, contents, None, select)


def open_legacy_path(path: Path, source: str, **options) -> TorchCheckpoint:
    select, inert = check_options(options, source)
    with path.open("rb") as handle:
        contents = read_legacy(handle, source, inert=inert)
    checkpoint = TorchCheckpoint(source, contents, MappedStorages(path, contents.spans), select)
    checkpoint.notes.append(_LEGACY_NOTE)
    return checkpoint

"""Torch pickles: zip format (``torch.save`` since 1.6) and the legacy (non-zip) format.

Always ``torch.load(weights_only=True)``: a pickle that needs other globals is refused, never run.
Zip files are opened with ``mmap=True`` (local) or ``map_location="meta"`` (a remote file object),
so listing keys reads only the pickle and the zip directory. Legacy files cannot be mapped and are
read in full; the checkpoint's notes say so.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import Checkpoint
from ..errors import InvalidCheckpointError, UsageError
from ..meta import TensorMeta
from ..pickle_safety import check_zip_records, unsafe_pickle_error
from .torch_zip import try_open
from .wrappers import extra_values, unwrap


def _refused(source: str, exc: Exception, fileobj_or_path) -> Exception:
    """torch refuses hostile and merely damaged pickles alike; the scan tells which (and names
    every offending global, where torch names only the first)."""
    if hasattr(fileobj_or_path, "seek"):
        fileobj_or_path.seek(0)
    return unsafe_pickle_error(fileobj_or_path, source, exc)


def _torch_load(source: str, target, **kwargs):
    import torch

    try:
        return torch.load(target, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise _refused(source, exc, target) from None
        raise InvalidCheckpointError(f"corrupt pickle ({str(exc).splitlines()[0][:160]})", path=source,
                                     fix="the file is damaged: download or save it again") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            TypeError, AttributeError, MemoryError, RecursionError, UnicodeDecodeError, OverflowError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise InvalidCheckpointError(f"truncated or corrupt torch checkpoint ({first})", path=source,
                                     fix="the file is damaged: download or save it again") from None


class TorchCheckpoint(Checkpoint):
    """A torch pickle loaded lazily (mmap or meta); tensors stay where torch.load put them."""

    def __init__(self, source: str, obj, format_name: str) -> None:
        super().__init__(source)
        self.format = format_name
        state, self.wrapper, self.extras = unwrap(obj, source)
        self._state = state
        self._root = obj  # the extras' values (convert --extras); costs nothing, torch.load made it
        self._metas = {name: TensorMeta.from_tensor(name, t) for name, t in state.items()}
        self.aliases = _alias_groups(state)

    def _load_tensor(self, key: str):
        tensor = self._state[key]
        if tensor.device.type == "meta":
            raise UsageError("tensor bytes are not available from a remote listing", path=self.source,
                             key=key, fix="download the file first (ckpt download) and open the local copy")
        return tensor

    def pickled_root(self):
        return self._root

    def extra_values(self) -> dict[str, object]:
        return extra_values(self._root, self.wrapper, self.extras)

    def close(self) -> None:
        self._state = {}
        self._root = None


def _alias_groups(state: Mapping) -> list[list[str]]:
    """Names that view the same bytes (same storage, offset, shape and stride)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        where = storage.data_ptr() if tensor.device.type != "meta" else storage._cdata
        if tensor.device.type != "meta" and where == 0:
            where = ("empty", name)  # zero-size storages all share address 0
        key = (where, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def open_zip_path(path: Path, source: str) -> Checkpoint:
    """A plain state dict is listed without torch (see torch_zip.py); anything else, or a file
    that reader cannot vouch for, goes through torch.load(weights_only=True, mmap=True)."""
    check_zip_records(path, source)  # torch would inflate a compressed record fully in memory
    with path.open("rb") as handle:
        shallow = try_open(handle, source, path, load_zip_path)
    return shallow or load_zip_path(path, source)


def load_zip_path(path: Path, source: str) -> TorchCheckpoint:
    return TorchCheckpoint(source, _torch_load(source, str(path), mmap=True, map_location="cpu"), "torch-zip")


def open_zip_fileobj(fileobj: BinaryIO, source: str, size: int) -> Checkpoint:
    check_zip_records(fileobj, source)
    shallow = try_open(fileobj, source, None, load_zip_path)
    return shallow or TorchCheckpoint(source, _torch_load(source, fileobj, map_location="meta"), "torch-zip")


def open_legacy_path(path: Path, source: str) -> TorchCheckpoint:
    checkpoint = TorchCheckpoint(source, _torch_load(source, str(path), map_location="cpu"), "torch-legacy")
    checkpoint.notes.append("legacy (non-zip) torch pickle: read in full, since it cannot be memory-mapped; "
                            "convert it to .safetensors for fast access")
    checkpoint.bytes_read = path.stat().st_size
    return checkpoint

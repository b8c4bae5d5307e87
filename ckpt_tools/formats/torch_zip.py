"""Zip-format torch checkpoints listed without importing torch.

``torch.save`` writes a zip holding ``data.pkl`` (the object, whose tensors are persistent
references to storages) and one uncompressed record per storage (``data/<key>``). A plain state
dict's pickle uses a handful of globals only (the tensor and parameter rebuild functions, the
typed storage classes, ``OrderedDict``). ``ShallowUnpickler`` resolves exactly those to inert
stand-ins and refuses every other global, so nothing is imported or called: the result is the same
structure with ``TensorRef`` leaves (storage key, dtype, offset, shape, stride), and the zip
directory gives each storage's byte range. Listing a 4 GB checkpoint then costs milliseconds and
no torch import; ``tensor(key)`` still goes through ``torch.load(mmap=True, weights_only=True)``.

Anything outside that subset (another global, a damaged record, a big-endian file) is not an error
here: the caller falls back to ``torch.load(weights_only=True)``, which decides and reports.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import Checkpoint
from ..errors import CkptError, UsageError
from ..meta import DTYPES, TensorMeta
from .tensor_ref import StorageRef, TensorRef
from .wrappers import extra_values, unwrap

# torch's typed storage classes, as pickled by torch.save -> safetensors dtype names
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64", "ComplexDoubleStorage": "C128",
}
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a state dict's pickle is KBs to a few MBs
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length (30 bytes)


class Unsupported(Exception):
    """The file is outside what the shallow reader handles; use torch.load instead."""


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, StorageRef):
        raise Unsupported("tensor without a storage reference")
    return TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=True, hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise Unsupported("parameter without tensor data")
    return data


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class ShallowUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, scalars and TensorRefs; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise Unsupported(f"global {module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise Unsupported(f"persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        return StorageRef(str(key), kind.dtype, int(numel))


def _records(archive: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise Unsupported("not exactly one data.pkl")
    prefix = pickles[0].filename[: -len("data.pkl")]
    return prefix, {i.filename: i for i in archive.infolist()}


def _data_offset(fileobj: BinaryIO, info: zipfile.ZipInfo) -> int:
    fileobj.seek(info.header_offset)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(fileobj.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise Unsupported("bad local header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def read_structure(fileobj: BinaryIO, *, locate: bool = True) -> tuple[object, dict[str, tuple[int, int]]]:
    """(the unpickled object with TensorRef leaves, {storage key: (file offset, nbytes)}). Without
    ``locate`` the offsets are -1: finding them reads each record's local header, which a remote
    listing avoids (one range request each)."""
    with zipfile.ZipFile(fileobj) as archive:
        prefix, infos = _records(archive)
        byteorder = infos.get(prefix + "byteorder")
        if byteorder is not None and archive.read(byteorder).strip() != b"little":
            raise Unsupported("big-endian storages")
        info = infos[prefix + "data.pkl"]
        if info.file_size > MAX_PICKLE_BYTES:
            raise Unsupported("pickle too large")
        obj = ShallowUnpickler(io.BytesIO(archive.read(info))).load()
    storages = _storages(obj)
    spans = {}
    for ref in storages.values():
        record = infos.get(f"{prefix}data/{ref.key}")
        nbytes = ref.numel * int(DTYPES[ref.dtype][0])
        if record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != nbytes:
            raise Unsupported(f"storage record {ref.key} missing or not as promised")
        spans[ref.key] = (_data_offset(fileobj, record) if locate else -1, nbytes)
    return obj, spans


def _storages(obj, found: dict | None = None, depth: int = 0) -> dict[str, StorageRef]:
    found = {} if found is None else found
    if depth > 64:
        raise Unsupported("nested too deeply")
    if isinstance(obj, TensorRef):
        found[obj.storage.key] = obj.storage
    elif isinstance(obj, dict):
        for value in obj.values():
            _storages(value, found, depth + 1)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _storages(value, found, depth + 1)
    return found


class TorchZipCheckpoint(Checkpoint):
    """Listing from the shallow read; tensor bytes through torch on first use."""

    format = "torch-zip"

    def __init__(self, source: str, obj, spans: dict[str, tuple[int, int]], path: Path | None,
                 load_full: Callable[[Path, str], Checkpoint]) -> None:
        super().__init__(source)
        state, self.wrapper, self.extras = unwrap(obj, source)
        self._root, self._refs, self._spans, self._path = obj, state, spans, path
        self._torch: Checkpoint | None = None
        self._load_full = load_full  # torch.load(mmap=True) of the same file, for tensor bytes
        for name, ref in state.items():
            self._check_bounds(name, ref)
            self._metas[name] = TensorMeta.of(name, ref.shape, ref.dtype)
        groups: dict[tuple, list[str]] = {}
        for name, ref in state.items():
            if math.prod(ref.shape):
                groups.setdefault(ref.identity(), []).append(name)
        self.aliases = [names for names in groups.values() if len(names) > 1]

    def _check_bounds(self, name: str, ref: TensorRef) -> None:
        if not ref.shape:
            last = ref.offset
        else:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
        if math.prod(ref.shape) and (ref.offset < 0 or last >= ref.storage.numel):
            raise Unsupported(f"tensor {name} reaches past its storage")

    def byte_span(self, key: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) when the tensor's bytes are one contiguous range of a local file."""
        ref = self._refs[key]
        if self._path is None or not ref.contiguous():
            return None
        start, _ = self._spans[ref.storage.key]
        itemsize = int(DTYPES[ref.dtype][0])
        return self._path, start + ref.offset * itemsize, self._metas[key].nbytes

    def _load_tensor(self, key: str):
        return self._loaded().tensor(key)

    def pickled_root(self):
        return self._loaded().pickled_root()

    def _loaded(self) -> Checkpoint:
        if self._torch is None:
            if self._path is None:
                raise UsageError("tensor bytes are not available from a remote listing", path=self.source,
                                 fix="download the file first (ckpt download) and open the local copy")
            self._torch = self._load_full(self._path, self.source)
        return self._torch

    def extra_values(self) -> dict[str, object]:
        return extra_values(self._root, self.wrapper, self.extras)

    def close(self) -> None:
        if self._torch is not None:
            self._torch.close()
        self._root = self._refs = None


def try_open(fileobj: BinaryIO, source: str, path: Path | None,
             load_full: Callable[[Path, str], Checkpoint]) -> TorchZipCheckpoint | None:
    """The shallow reading, or None when the file needs torch.load to decide."""
    try:
        obj, spans = read_structure(fileobj, locate=path is not None)
        return TorchZipCheckpoint(source, obj, spans, path, load_full)
    except CkptError:
        return None  # let torch.load's path give its own (established) message
    except (Unsupported, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError,
            IndexError, TypeError, AttributeError, struct.error, RecursionError, MemoryError, OSError):
        return None
    finally:
        fileobj.seek(0)

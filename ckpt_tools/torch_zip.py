"""A torch zip checkpoint written without torch: the pickle ``torch.save`` would write, storages
copied file to file.

``plan_torch_zip(root, source, storage_range)`` takes an object read inertly (``inert.TensorRef``
leaves) and returns a ``TorchZipPlan``: ``data.pkl`` as ``torch.save`` writes it for the same object
with CPU tensors (protocol 2, the same globals, persistent ids and memo), every storage it names as
a range of the source file, and the source's own small records (``byteorder``, ``version``, ...).
It returns None when the object holds something only torch can write back (a device, a tensor
subclass, a storage viewed as two dtypes, ...): the caller then goes through torch.

``write_torch_zip(out, plan)`` writes the archive into an ``fs.AtomicFile``: stored records, each
record's data aligned as the source's ``.storage_alignment`` says (64 bytes by default, by a
padding extra field as torch does), ZIP64 structures where sizes or offsets need them, tensor
bytes copied inside the kernel. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidCheckpointError
from .fs import AtomicFile, crc32_range
from .inert import STORAGE_DTYPES, Size, StorageRef, TensorRef, TorchName
from .meta import DTYPES
from .safetensors_writer import FileRange, write_range
from .zip_members import read_member

PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
DEFAULT_ALIGNMENT = 64  # torch's storage alignment when the source does not record one
MAX_DEPTH = 200
ZIP64_LIMIT = 0xFFFFFFFF
# the records torch.save writes besides data.pkl and data/<key>, before the storages and after
# them; they are kept from the source, and a source with any other record is left to torch
LEADING_RECORDS = (".format_version", ".storage_alignment", "byteorder")
TRAILING_RECORDS = ("version", ".data/version", ".data/serialization_id")
SERIALIZATION_ID = ".data/serialization_id"  # a new file gets a new one
_TYPED_STORAGE = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}
_PADDING_FIELD = 0x4246  # "FB", the extra field torch pads local headers with
_DOS_DATE = (1 << 5) | 1  # 1980-01-01: fixed, so the same input writes the same bytes
_UTF8_NAMES = 0x800


class _NeedsTorch(Exception):
    """The object holds something this writer does not write the way torch does."""


# ---------------------------------------------------------------------------------------------
# what the pickle holds instead of torch objects

class _Global:
    """A global written by name (GLOBAL opcode), never imported; one object per name, so the
    pickle memo refers back to it as torch's pickler does."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires a reduce function to be callable; never called
        raise TypeError(f"{self.module}.{self.name} is written by name only")


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    return _GLOBALS.setdefault((module, name), _Global(module, name))


@dataclass(eq=False)
class _Reduce:
    """An object pickled as ``func(*args)`` (REDUCE); a fresh one per occurrence, as torch builds
    a fresh tensor per occurrence."""

    func: _Global
    args: tuple


@dataclass(eq=False)
class _Storage:
    """An output storage: its persistent id once the pickler reaches it (keys count up in the
    order torch gives them), where its bytes come from."""

    type: _Global
    numel: int
    source: StorageRef | None  # None: an empty tensor's own storage (no bytes)
    dtype: str  # what its tensors view it as
    key: str | None = None


# ---------------------------------------------------------------------------------------------
# the pickle

class _TorchPickler(pickle._Pickler):
    """The pure-Python pickler (whose save_global can be replaced) with torch.save's persistent
    ids: ``('storage', storage type, key, 'cpu', numel)``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream, protocol=PICKLE_PROTOCOL)
        self.storages: list[_Storage] = []

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        if obj.key is None:
            obj.key = str(len(self.storages))  # one string object per storage, as torch's id map
            self.storages.append(obj)
        return (_STORAGE, obj.type, obj.key, _CPU, obj.numel)

    def reducer_override(self, obj):
        if isinstance(obj, _Reduce):
            return obj.func, obj.args
        return NotImplemented

    def save_named_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_named_global


_STORAGE, _CPU = "storage", "cpu"  # the same string objects every time: memoized once, like torch's


class _Converter:
    """The object torch.save would be handed (see ``formats.torch_pickle``'s materialising: dicts
    stay dicts, OrderedDicts become fresh OrderedDicts, shared containers stay shared), with
    stand-ins for tensors, dtypes and sizes."""

    def __init__(self) -> None:
        self.done: dict[int, object] = {}
        self.storages: dict[str, _Storage] = {}

    def convert(self, value, depth: int = 0):
        if depth > MAX_DEPTH:
            raise _NeedsTorch("nesting")
        if isinstance(value, TensorRef):
            return self.tensor(value)
        if isinstance(value, TorchName):
            if value.kind != "dtype":
                raise _NeedsTorch(value.kind)
            return _global("torch", str(value).removeprefix("torch."))
        if _plain(value):
            return value
        if id(value) in self.done:
            return self.done[id(value)]
        if isinstance(value, dict):
            out = OrderedDict() if isinstance(value, OrderedDict) else {}
            self.done[id(value)] = out
            for key, item in value.items():
                if not _plain(key):
                    raise _NeedsTorch("key")
                out[key] = self.convert(item, depth + 1)
            if isinstance(out, OrderedDict) and hasattr(value, "_metadata"):  # a state dict's module versions
                out._metadata = self.convert(value._metadata, depth + 1)
            return out
        if type(value) is list:
            out = []
            self.done[id(value)] = out
            out.extend(self.convert(item, depth + 1) for item in value)
            return out
        if isinstance(value, Size):
            return _Reduce(_global("torch", "Size"), (tuple(self.convert(v, depth + 1) for v in value),))
        if type(value) is tuple:
            return tuple(self.convert(item, depth + 1) for item in value)
        raise _NeedsTorch(type(value).__name__)

    def tensor(self, ref: TensorRef) -> _Reduce:
        if ref.numel:
            storage, offset, stride = self.storage(ref), ref.offset, ref.stride
        else:  # torch writes an empty tensor as torch.empty made it: its own storage, contiguous
            storage, offset, stride = _storage_for(ref.dtype, None), 0, _contiguous(ref.shape)
        args = (storage, offset, tuple(list(ref.shape)), tuple(list(stride)), False, OrderedDict())
        if ref.dtype in _TYPED_STORAGE:
            made = _Reduce(_global("torch._utils", "_rebuild_tensor_v2"), args)
        else:  # dtypes without a typed storage: a byte storage and the dtype
            dtype = _global("torch", DTYPES[ref.dtype][1])
            made = _Reduce(_global("torch._utils", "_rebuild_tensor_v3"), (*args, dtype))
        if ref.parameter:
            return _Reduce(_global("torch._utils", "_rebuild_parameter"), (made, False, OrderedDict()))
        return made

    def storage(self, ref: TensorRef) -> _Storage:
        source = ref.storage
        if source.base:
            raise _NeedsTorch("storage view")
        found = self.storages.get(source.key)
        if found is None:
            found = self.storages[source.key] = _storage_for(ref.dtype, source)
        elif found.dtype != ref.dtype:
            raise _NeedsTorch("one storage viewed as two dtypes")  # torch.save refuses that too
        return found


def _storage_for(dtype: str, source: StorageRef | None) -> _Storage:
    """A typed storage counts elements of its dtype; an untyped one (torch.storage.UntypedStorage,
    for dtypes without a typed storage) counts bytes."""
    nbytes = source.nbytes if source is not None else 0
    if dtype in _TYPED_STORAGE:
        return _Storage(_global("torch", _TYPED_STORAGE[dtype]), nbytes // int(DTYPES[dtype][0]), source, dtype)
    return _Storage(_global("torch.storage", "UntypedStorage"), nbytes, source, dtype)


def _plain(value) -> bool:
    return type(value) in (str, int, float, bool, bytes) or value is None


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def torch_pickle(root) -> tuple[bytes, list[_Storage]] | None:
    """``data.pkl`` as torch.save writes ``root`` (TensorRefs as CPU tensors, parameters as
    parameters) and the storages it names, in key order; None when only torch can write it."""
    converter = _Converter()
    try:
        converted = converter.convert(root)
    except _NeedsTorch:
        return None
    stream = io.BytesIO()
    pickler = _TorchPickler(stream)
    try:
        pickler.dump(converted)
    except RecursionError:  # the pure-Python pickler recurses deeper than torch's
        return None
    return stream.getvalue(), pickler.storages


# ---------------------------------------------------------------------------------------------
# the plan

@dataclass(frozen=True)
class ZipRecord:
    """One record: its name under the archive prefix, its bytes (or where they are) and CRC-32."""

    name: str
    data: bytes | FileRange
    crc: int

    @property
    def size(self) -> int:
        return self.data.nbytes if isinstance(self.data, FileRange) else len(self.data)


@dataclass
class TorchZipPlan:
    prefix: str  # the archive folder, as in the source (``model/``)
    alignment: int
    records: list[ZipRecord] = field(default_factory=list)
    storages: dict[str, str] = field(default_factory=dict)  # output storage key -> source storage key

    @property
    def nbytes(self) -> int:
        return sum(r.size for r in self.records)


def plan_torch_zip(root, source: Path,
                   storage_range: Callable[[StorageRef], tuple[Path, int, int] | None]) -> TorchZipPlan | None:
    """What ``write_torch_zip`` writes for ``root`` read from the torch zip ``source``; None when
    only torch can write it (see ``torch_pickle``) or the source holds records torch.save does not
    write. ``storage_range`` says where a storage's bytes lie in the source."""
    pickled = torch_pickle(root)
    if pickled is None:
        return None
    data, storages = pickled
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0].filename.removesuffix("data.pkl")
        small = {}
        for info in infos:
            name = info.filename.removeprefix(prefix) if info.filename.startswith(prefix) else None
            if name in LEADING_RECORDS + TRAILING_RECORDS:
                small[name] = read_member(archive, info)
            elif name is None or not (name == "data.pkl" or name.startswith("data/")):
                return None
    try:
        alignment = int(small.get(".storage_alignment", DEFAULT_ALIGNMENT))
    except ValueError:
        return None
    if alignment < 1:
        return None
    plan = TorchZipPlan(prefix, alignment)
    plan.records.append(_record("data.pkl", data))
    for name in LEADING_RECORDS:
        if name in small:
            plan.records.append(_record(name, small[name]))
    for storage in storages:
        record = _storage_record(storage, storage_range)
        if record is None:
            return None
        plan.records.append(record)
        if storage.source is not None:
            plan.storages[storage.key] = storage.source.key
    for name in TRAILING_RECORDS:
        if name in small:
            plan.records.append(_record(name, _serialization_id(small[name], data) if name == SERIALIZATION_ID
                                        else small[name]))
    return plan


def _record(name: str, data: bytes) -> ZipRecord:
    return ZipRecord(name, data, zlib.crc32(data))


def _storage_record(storage: _Storage, storage_range) -> ZipRecord | None:
    """The record of a storage: its source's bytes, with a CRC of its own (the source record's may
    cover other bytes, or be wrong: torch never checks a storage's, and torch.save writes a fresh one)."""
    name = f"data/{storage.key}"
    if storage.source is None:
        return _record(name, b"")
    found = storage_range(storage.source)
    if found is None:
        return None
    source = FileRange(Path(found[0]), found[1], found[2])
    return ZipRecord(name, source, crc32_range(source.path, source.offset, source.nbytes))


def _serialization_id(old: bytes, data: bytes) -> bytes:
    """A new id for a new file (torch's are 40 decimal digits), derived from the old one and the
    new pickle, so the same input writes the same bytes."""
    digest = hashlib.sha256(old + b"\0" + data).digest()
    return str(int.from_bytes(digest[:16], "big")).zfill(40).encode("ascii")


# ---------------------------------------------------------------------------------------------
# the archive

def write_torch_zip(out: AtomicFile, plan: TorchZipPlan, *, zip64_from: int = ZIP64_LIMIT) -> dict[str, int]:
    """Write the planned archive to ``out``; returns where each record's data starts (record name
    -> file offset). Sizes and offsets from ``zip64_from`` on are written as ZIP64 (a test lowers
    it to check those structures)."""
    position, directory, starts = 0, [], {}
    for record in plan.records:
        name = (plan.prefix + record.name).encode("utf-8")
        header = _local_header(name, record, position, plan.alignment, zip64_from)
        directory.append(_central_header(name, record, position, zip64_from))
        position += out.write(header)
        starts[record.name] = position
        written = write_range(out, record.data) if isinstance(record.data, FileRange) else out.write(record.data)
        if written != record.size:
            raise InvalidCheckpointError(f"copied {written} bytes of record '{record.name}', expected {record.size}",
                                         fix="the source file changed or shrank while reading")
        position += written
    start = position
    position += out.write(b"".join(directory))
    out.write(_end_records(len(directory), start, position - start, zip64_from))
    return starts


def _version(zip64: bool) -> int:
    return 45 if zip64 else 20


def _local_header(name: bytes, record: ZipRecord, position: int, alignment: int, zip64_from: int) -> bytes:
    zip64 = record.size >= zip64_from
    extra = struct.pack("<HHQQ", 1, 16, record.size, record.size) if zip64 else b""
    fixed = 30 + len(name) + len(extra) + 4
    padding = -(position + fixed) % alignment
    extra += struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
    size = ZIP64_LIMIT if zip64 else record.size
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, _version(zip64), _UTF8_NAMES, zipfile.ZIP_STORED, 0,
                       _DOS_DATE, record.crc, size, size, len(name), len(extra)) + name + extra


def _central_header(name: bytes, record: ZipRecord, position: int, zip64_from: int) -> bytes:
    big_size, big_offset = record.size >= zip64_from, position >= zip64_from
    extra = b""
    if big_size or big_offset:
        values = ([record.size, record.size] if big_size else []) + ([position] if big_offset else [])
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)
    size = ZIP64_LIMIT if big_size else record.size
    offset = ZIP64_LIMIT if big_offset else position
    version = _version(bool(extra))
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, _UTF8_NAMES, zipfile.ZIP_STORED, 0,
                       _DOS_DATE, record.crc, size, size, len(name), len(extra), 0, 0, 0, 0, offset) + name + extra


def _end_records(count: int, start: int, size: int, zip64_from: int) -> bytes:
    out = b""
    if count >= 0xFFFF or start >= zip64_from or size >= zip64_from:
        end64 = start + size
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, size, start)
        out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
        count, start, size = min(count, 0xFFFF), min(start, ZIP64_LIMIT), min(size, ZIP64_LIMIT)
    return out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, start, 0)

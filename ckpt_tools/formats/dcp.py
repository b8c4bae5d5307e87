"""torch.distributed.checkpoint (DCP) folders: a ``.metadata`` pickle and ``__<rank>_<n>.distcp`` files.

``.metadata`` is a pickled ``torch.distributed.checkpoint.metadata.Metadata``: ``state_dict_metadata``
maps each flattened name (``model.layers.0.weight``, ``optim.state.…``) to
``TensorStorageMetadata(properties(dtype, …), size, chunks=[ChunkStorageMetadata(offsets, sizes)])``
or ``BytesStorageMetadata`` (any other object, pickled); ``storage_data`` maps
``MetadataIndex(fqn, offset)`` to ``_StorageInfo(relative_path, offset, length)``, where each
chunk's bytes lie; ``planner_data`` maps each flattened name back to its path in the nested state
dict that was saved (``("model", "layers.0.weight")``).

It is read with ``inert.loads``: nothing it names is imported or called, and a ``.metadata`` that
names code-running globals is refused like any hostile pickle (``inert=True`` reads it inertly).
The listing (global shapes, dtypes, the chunks each rank wrote, what is not a tensor) comes from it
alone; the model's state dict is chosen among the nested entries by the selection rules of every
training checkpoint (``model`` over ``optim``; ``select`` names another).

A chunk's bytes are, as torch's ``FileSystemWriter`` writes them, a whole ``torch.save`` zip stored
at its offset (the default), raw bytes (a length equal to the chunk's bytes), or a tensor of a
``.distcp`` file that is itself a safetensors file (``SerializationFormat.SAFETENSORS``). A zip is
read with the inert zip reader over its byte range; then only the byte runs a tensor, or a slice
of it, needs are read (``ranges.runs``), straight into the tensor's memory.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from ..inert import MAX_PICKLE_BYTES, TORCH_DTYPES, is_inert, loads, plain, read_zip
from ..magic import HEAD_BYTES, is_safetensors
from ..meta import DTYPES, TensorMeta, torch_dtype
from ..render import plural
from ..selection import is_tensor
from ..sources import check_shard_name
from .ranges import FileWindow, intersect, read_runs, runs, slice_buffer
from .safetensors import parse_header
from .torch_pickle import check_options
from .wrappers import choose, selection_notes

OPTIONS = ("select", "inert")
_MODULE = "torch.distributed.checkpoint.metadata"
# The globals a .metadata written by torch names: data classes, read as data. ``ckpt scan`` allows
# them in a .metadata (torch itself reads the file with a plain pickle.load); anything else a
# .metadata names is reported as not executed, or refused when it runs code.
METADATA_GLOBALS = frozenset({
    *(f"{_MODULE}.{name}" for name in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                       "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                       "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",  # torch < 2.2
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path", "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",  # StorageMeta.checkpoint_id
})
_RANK_FILE = re.compile(r"__(\d+)_(\d+)\.distcp")
_BAD = "the .metadata is damaged or not a torch.distributed.checkpoint metadata file: save the checkpoint again"
_TRUNCATED = "the folder is incomplete or a file was cut short: copy or save the checkpoint again"


# ---------------------------------------------------------------------------------------------
# the metadata as plain values

@dataclass(frozen=True)
class Chunk:
    """One stored block of a tensor: where it sits in the global tensor and where its bytes lie."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative to the folder
    offset: int
    length: int
    transforms: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def rank(self) -> int | None:
        """The rank that wrote it, from torch's file name ``__<rank>_<n>.distcp``."""
        match = _RANK_FILE.fullmatch(self.file)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the checkpoint: its flattened name, global shape, dtype and chunks (a tensor
    leaf for ``selection``)."""

    ckpt_leaf = "tensor"
    ckpt_type_name = "Tensor"

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * int(DTYPES[self.dtype][0])

    def identity(self) -> tuple:
        return ("dcp", self.fqn)


@dataclass(frozen=True)
class DcpObject:
    """An entry that is not a tensor (an optimizer hyperparameter, a dataloader's state...): a
    pickle stored at ``offset`` in ``file``, read only when its value is asked for."""

    fqn: str
    file: str
    offset: int
    length: int

    @property
    def ckpt_type_name(self) -> str:
        return f"object ({self.length:,}-byte pickle in {self.file})"


@dataclass
class DcpMetadata:
    version: str | None
    entries: dict[str, DcpTensor | DcpObject]  # in the order of state_dict_metadata
    paths: dict[str, tuple]  # flattened name -> its path in the saved state dict (planner_data)
    not_executed: list[str]
    notes: list[str]

    @property
    def files(self) -> list[str]:
        names = [c.file for e in self.entries.values() if isinstance(e, DcpTensor) for c in e.chunks]
        names += [e.file for e in self.entries.values() if isinstance(e, DcpObject)]
        return sorted(set(names))


def _bad(source: str, message: str, key: str | None = None) -> InvalidCheckpointError:
    return InvalidCheckpointError(message, path=source, key=key, fix=_BAD)


def _fields(value, what: str, source: str, key: str | None = None) -> dict:
    """The fields of a dataclass the pickle described (an inert placeholder's state)."""
    if getattr(value, "ckpt_leaf", None) != "inert":
        raise _bad(source, f"{what} is a {type(value).__name__}, not a DCP {what}", key)
    return value.fields()


def _ints(value, what: str, source: str, key: str | None) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                     for v in value):
        raise _bad(source, f"{what} {value!r:.60} is not a tuple of non-negative integers", key)
    return tuple(value)


def _int(value, what: str, source: str, key: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(source, f"{what} {value!r:.60} is not a non-negative integer", key)
    return value


def _dtype(properties, source: str, key: str) -> str:
    """TensorProperties pickles its state as a tuple (dtype first) since torch 2.2, a dict before."""
    dtype = None
    if getattr(properties, "ckpt_leaf", None) == "inert":
        state = properties.state
        dtype = state[0] if isinstance(state, tuple) and state else properties.fields().get("dtype")
    name = TORCH_DTYPES.get(str(dtype).removeprefix("torch.")) if getattr(dtype, "kind", None) == "dtype" else None
    if name is None:
        raise UnsupportedFormatError(f"dtype {dtype!s:.40} has no safetensors name", path=source, key=key,
                                     fix="convert this tensor with torch itself")
    return name


def read_metadata(path: Path, source: str, *, inert: bool = False) -> DcpMetadata:
    """The ``.metadata`` at ``path``, read inertly and checked: every tensor tiled by its chunks,
    every chunk and object stored in a file inside the folder."""
    try:
        size = path.stat().st_size
        if size > MAX_PICKLE_BYTES:
            raise _bad(source, f".metadata is {size:,} bytes, more than a checkpoint's metadata holds")
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read .metadata ({exc.strerror})", path=source,
                                      fix="check the path and its permissions") from None
    if not data:
        raise InvalidCheckpointError(".metadata is empty", path=source, fix=_TRUNCATED)
    contents = loads(data, source=source, inert=inert, record=".metadata")
    root = contents.root
    if getattr(root, "dotted", None) != f"{_MODULE}.Metadata":
        raise _bad(source, f"the pickle holds {getattr(root, 'dotted', type(root).__name__)}, not a DCP Metadata")
    fields = root.fields()
    described = fields.get("state_dict_metadata")
    if not isinstance(described, dict):
        raise _bad(source, "Metadata has no state_dict_metadata mapping")
    storage = _storage(fields.get("storage_data"), source)
    entries: dict[str, DcpTensor | DcpObject] = {}
    for fqn, value in described.items():
        if not isinstance(fqn, str):
            raise _bad(source, f"state_dict_metadata is keyed by {type(fqn).__name__}, not names")
        entries[fqn] = _entry(fqn, value, storage, source)
    version = fields.get("version")
    odd = [u.dotted for u in contents.uses.values() if u.status != "stand-in" and u.dotted not in METADATA_GLOBALS]
    return DcpMetadata(str(version) if version is not None else None, entries,
                       _paths(fields.get("planner_data"), entries), odd, list(contents.notes))


def _storage(storage_data, source: str) -> dict[tuple, tuple[str, int, int, tuple[str, ...]]]:
    """(fqn, chunk offsets or None) -> (file, offset, length, transforms)."""
    if not isinstance(storage_data, dict):
        raise _bad(source, "Metadata has no storage_data mapping (not written by a file-system writer?)")
    out = {}
    for index, info in storage_data.items():
        where = _fields(index, "MetadataIndex", source)
        fqn = where.get("fqn")
        offset = where.get("offset")
        at = None if offset is None else _ints(offset, "a chunk offset", source, fqn)
        stored = _fields(info, "_StorageInfo", source, fqn)
        name = stored.get("relative_path")
        check_shard_name(name, source, named_by=".metadata")
        transforms = stored.get("transform_descriptors") or ()
        out[(fqn, at)] = (name, _int(stored.get("offset"), "a storage offset", source, fqn),
                          _int(stored.get("length"), "a storage length", source, fqn),
                          tuple(str(t) for t in transforms))
    return out


def _entry(fqn: str, value, storage: dict, source: str) -> DcpTensor | DcpObject:
    dotted = getattr(value, "dotted", None)
    if dotted == f"{_MODULE}.BytesStorageMetadata":
        where = storage.get((fqn, None))
        if where is None:
            raise _bad(source, "the object has no storage_data entry", fqn)
        return DcpObject(fqn, where[0], where[1], where[2])
    if dotted != f"{_MODULE}.TensorStorageMetadata":
        raise _bad(source, f"an entry of state_dict_metadata is a {dotted or type(value).__name__}", fqn)
    fields = value.fields()
    shape = _ints(fields.get("size"), "the size", source, fqn)
    dtype = _dtype(fields.get("properties"), source, fqn)
    described = fields.get("chunks")
    if not isinstance(described, list):
        raise _bad(source, "the tensor has no list of chunks", fqn)
    chunks = []
    for item in described:
        box = _fields(item, "ChunkStorageMetadata", source, fqn)
        offsets = _ints(box.get("offsets"), "a chunk's offsets", source, fqn)
        sizes = _ints(box.get("sizes"), "a chunk's sizes", source, fqn)
        if len(offsets) != len(shape) or len(sizes) != len(shape) or \
                any(o + n > s for o, n, s in zip(offsets, sizes, shape, strict=True)):
            raise _bad(source, f"a chunk at {list(offsets)} of size {list(sizes)} does not fit the shape "
                               f"{list(shape)}", fqn)
        where = storage.get((fqn, offsets))
        if where is None:
            raise _bad(source, f"the chunk at {list(offsets)} has no storage_data entry", fqn)
        chunks.append(Chunk(offsets, sizes, *where))
    _check_tiling(fqn, shape, chunks, source)
    return DcpTensor(fqn, shape, dtype, tuple(chunks))


def _check_tiling(fqn: str, shape: tuple[int, ...], chunks: list[Chunk], source: str) -> None:
    """The chunks cover the tensor exactly: their sizes add up, and (for the usual handful of
    chunks per tensor) no two overlap."""
    covered = sum(c.numel for c in chunks)
    if covered != math.prod(shape):
        raise _bad(source, f"the chunks hold {covered:,} elements of a tensor of {math.prod(shape):,}", fqn)
    filled = [c for c in chunks if c.numel]
    if len(filled) <= 256:
        for i, a in enumerate(filled):
            for b in filled[i + 1:]:
                if intersect((a.offsets, a.sizes), (b.offsets, b.sizes)) is not None:
                    raise _bad(source, f"the chunks at {list(a.offsets)} and {list(b.offsets)} overlap", fqn)


def _paths(planner_data, entries: dict) -> dict[str, tuple]:
    """Each flattened name's path in the saved state dict, where ``planner_data`` gives one that
    joins back to the name; otherwise the name stands alone at the top level."""
    found = planner_data if isinstance(planner_data, dict) else {}
    out = {}
    for fqn in entries:
        path = found.get(fqn)
        ok = isinstance(path, tuple) and path and all(isinstance(p, str | int) and not isinstance(p, bool)
                                                      for p in path)
        out[fqn] = tuple(path) if ok and ".".join(map(str, path)) == fqn else (fqn,)
    return out


def pickled_chunks(metadata: DcpMetadata) -> dict[str, list[tuple[str, int, int]]]:
    """{file: [(fqn, offset, length)]} of every byte range that is a ``torch.save`` zip: the
    objects (torch's ``dcp.load`` unpickles them without the weights-only restriction) and the tensor chunks
    not stored as raw bytes."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for fqn, entry in metadata.entries.items():
        if isinstance(entry, DcpObject):
            found.setdefault(entry.file, []).append((fqn, entry.offset, entry.length))
            continue
        for chunk in entry.chunks:
            if chunk.length != chunk.numel * int(DTYPES[entry.dtype][0]):
                found.setdefault(chunk.file, []).append((fqn, chunk.offset, chunk.length))
    return {name: sorted(ranges, key=lambda r: r[1]) for name, ranges in sorted(found.items())}


def tree(metadata: DcpMetadata) -> dict:
    """The nested state dict that was saved, with DcpTensor and DcpObject leaves (flat, each name
    at the top level, if the paths contradict each other)."""
    root: dict = {}
    for fqn, leaf in metadata.entries.items():
        path = metadata.paths[fqn]
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                return dict(metadata.entries)
        if path[-1] in node:
            return dict(metadata.entries)
        node[path[-1]] = leaf
    return root


# ---------------------------------------------------------------------------------------------
# the reader

@dataclass(frozen=True)
class _Stored:
    """Where one chunk's elements lie: ``base`` is the byte of its first element in ``file``; a
    chunk stored with other strides (never written by torch, but a zip may say so) has ``ref``."""

    file: str
    base: int
    ref: object = None  # an inert TensorRef with its own strides, read through ``_strided``
    storage_nbytes: int = 0


class DcpCheckpoint(Checkpoint):
    """A DCP folder listed from its ``.metadata``; tensors (and slices of them) are assembled from
    their chunks reading only their byte ranges.

    Beside the base fields: ``selection`` (as for torch pickles), ``dcp`` (the metadata as plain
    values), ``folder``, and ``data_bytes_read``, the bytes read from ``.distcp`` files so far.
    """

    format = "dcp"

    def __init__(self, source: str, metadata_path: Path, *, select: str | None = None,
                 inert: bool = False) -> None:
        super().__init__(source)
        self.folder = metadata_path.parent
        self._inert = inert
        self._fds: dict[str, int] = {}
        self._stored: dict[tuple[str, Chunk], _Stored] = {}  # chunks of different tensors may be equal
        self._blobs: dict[tuple[str, int], tuple | None] = {}  # safetensors headers inside .distcp files
        self.data_bytes_read = 0
        self.dcp = read_metadata(metadata_path, source, inert=inert)
        selection = choose(tree(self.dcp), source, select)
        sizes, damaged = self._check_files(selection)
        starts = Counter((c.file, c.offset) for e in self.dcp.entries.values() if isinstance(e, DcpTensor)
                         for c in e.chunks)
        self._shared_starts = {file for (file, _), n in starts.items() if n > 1}
        self.selection = selection
        self.wrapper, self.extras = selection.wrapper, dict(selection.extras)
        self.alternatives, self.accounting = list(selection.alternatives), selection.accounting
        self.not_executed = {name: [] for name in self.dcp.not_executed}
        self._entries: dict[str, DcpTensor] = dict(selection.state)
        self._metas = {name: TensorMeta.of(name, e.shape, e.dtype) for name, e in self._entries.items()}
        if self.dcp.version:
            self.metadata["dcp_version"] = self.dcp.version
        unnamed = sorted(p.name for p in self.folder.glob("*.distcp") if p.name not in sizes)
        if unnamed:  # torch never reads them: left from an earlier save with more ranks?
            damaged.append(f"not named by .metadata, so never read: {', '.join(unnamed[:8])}"
                           + (f" (+{len(unnamed) - 8})" if len(unnamed) > 8 else "")
                           + "; left over from an earlier save?")
        self.notes = [*self.dcp.notes, *self._layout_notes(sizes), *damaged, *selection.notes,
                      *selection_notes(selection, self.not_executed)]

    # -- checks and listing --
    def _check_files(self, selection) -> tuple[dict[str, int], list[str]]:
        """Every file the metadata names is there and long enough for what it holds: the selected
        state's tensors must be (an error otherwise); an entry outside it that is cut short (an
        optimizer moment in a truncated rank file) is a note, read only if asked for."""
        sizes = {}
        for name in self.dcp.files:
            try:
                sizes[name] = (self.folder / name).stat().st_size
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"the .metadata names {name}, which is missing", path=self.source,
                                              fix=f"copy {name} into the folder with the rest of the checkpoint") \
                    from None
        selected = {id(entry) for entry in selection.state.values()}
        cut = []
        for fqn, entry in self.dcp.entries.items():
            spans = ([(c.file, c.offset + c.length) for c in entry.chunks] if isinstance(entry, DcpTensor)
                     else [(entry.file, entry.offset + entry.length)])
            for name, end in spans:
                if end <= sizes[name]:
                    continue
                if id(entry) in selected:
                    raise InvalidCheckpointError(f"truncated: {name} is {sizes[name]:,} bytes but this entry's "
                                                 f"bytes end at {end:,}", path=self.source, key=fqn, fix=_TRUNCATED)
                cut.append(fqn)
                break
        damaged = [f"truncated: {len(cut)} {'entry' if len(cut) == 1 else 'entries'} outside the selected state end past their "
                   f"file's end ({', '.join(cut[:4])}{', ...' if len(cut) > 4 else ''}); they cannot be read"] \
            if cut else []
        return sizes, damaged

    def _layout_notes(self, sizes: dict[str, int]) -> list[str]:
        tensors = [e for e in self.dcp.entries.values() if isinstance(e, DcpTensor)]
        per_file: dict[str, list[int]] = {name: [0, 0] for name in sizes}
        for entry in tensors:
            for chunk in entry.chunks:
                per_file[chunk.file][0] += 1
                per_file[chunk.file][1] += chunk.numel * int(DTYPES[entry.dtype][0])
        ranks = {c.rank for e in tensors for c in e.chunks}
        split = sum(1 for e in tensors if len(e.chunks) > 1)
        others = len(self.dcp.entries) - len(tensors)
        lines = [f"{plural(len(tensors), 'tensor')} ({split} split into chunks) and "
                 f"{others} other {'entry' if others == 1 else 'entries'} in {plural(len(sizes), '.distcp file')}"
                 + (f" written by {plural(len(ranks), 'rank')}" if None not in ranks else "")]
        lines.append("chunks per file: " + ", ".join(f"{name} {plural(n, 'chunk')}, {nbytes:,} tensor bytes"
                                                   for name, (n, nbytes) in per_file.items()))
        if any(c.transforms for e in tensors for c in e.chunks):
            lines.append("some chunks were written through stream transforms (compression?); their bytes "
                         "cannot be read here")
        return lines

    def entry(self, key: str) -> DcpTensor:
        self.meta(key)
        return self._entries[key]

    def chunk_layout(self) -> dict[str, list[dict]]:
        """{key: [{file, rank, offsets, sizes, nbytes}]}: which rank wrote which block of each tensor."""
        return {key: [{"file": c.file, "rank": c.rank, "offsets": list(c.offsets), "sizes": list(c.sizes),
                       "nbytes": c.numel * int(DTYPES[e.dtype][0])} for c in e.chunks]
                for key, e in self._entries.items()}

    # -- bytes --
    def _fd(self, name: str) -> int:
        if name not in self._fds:
            try:
                self._fds[name] = os.open(self.folder / name, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{name} is missing", path=self.source,
                                              fix=f"copy {name} into the folder with the rest of the checkpoint") \
                    from None
        return self._fds[name]

    def _stored_at(self, entry: DcpTensor, chunk: Chunk) -> _Stored:
        found = self._stored.get((entry.fqn, chunk))
        if found is None:
            found = self._stored[(entry.fqn, chunk)] = self._locate(entry, chunk)
        return found

    def _locate(self, entry: DcpTensor, chunk: Chunk) -> _Stored:
        where = f"{self.source}/{chunk.file}"
        if chunk.transforms:
            raise UnsupportedFormatError(f"the chunk at {list(chunk.offsets)} was written through stream transforms "
                                         f"({', '.join(chunk.transforms)})", path=where, key=entry.fqn,
                                         fix="load it with torch.distributed.checkpoint and save it again without them")
        itemsize = int(DTYPES[entry.dtype][0])
        fd = self._fd(chunk.file)
        if chunk.length == chunk.numel * itemsize:  # raw bytes: a torch.save zip is always longer
            blob = self._safetensors_at(fd, chunk, where)
            if blob is None:
                if chunk.file in self._shared_starts:
                    # torch's safetensors serialization points every chunk of a file at its start
                    raise InvalidCheckpointError(
                        "several chunks of this file start at the same byte, as in torch's safetensors "
                        "serialization, but no valid safetensors header is there", path=where, key=entry.fqn,
                        fix="the file is damaged: copy it again, or save the checkpoint again")
                return _Stored(chunk.file, chunk.offset)
            return self._in_safetensors(entry, chunk, blob, where)
        window = FileWindow(fd, chunk.offset, chunk.length)
        try:
            contents = read_zip(window, where, inert=self._inert)
        finally:
            self.data_bytes_read += window.bytes_read
        ref = contents.root
        if not is_tensor(ref) or ref.dtype != entry.dtype or tuple(ref.shape) != chunk.sizes:
            shown = f"a {ref.dtype} tensor of shape {list(ref.shape)}" if is_tensor(ref) else f"a {type(ref).__name__}"
            raise InvalidCheckpointError(f"the chunk at {list(chunk.offsets)} holds {shown}, the metadata says "
                                         f"{entry.dtype} {list(chunk.sizes)}", path=where, key=entry.fqn, fix=_BAD)
        start, nbytes = contents.spans[ref.storage.key]
        first = chunk.offset + start + ref.storage.base * int(DTYPES[ref.storage.dtype][0])
        if ref.contiguous():
            return _Stored(chunk.file, first + ref.offset * itemsize)
        return _Stored(chunk.file, first, ref, nbytes)

    def _safetensors_at(self, fd: int, chunk: Chunk, where: str):
        """The header of a safetensors file that starts where the chunk does, or None. torch's
        ``SerializationFormat.SAFETENSORS`` writes each rank's tensors as one safetensors file
        inside the ``.distcp`` and points every tensor at that file's start."""
        place = (chunk.file, chunk.offset)
        if place not in self._blobs:
            head = os.pread(fd, HEAD_BYTES, chunk.offset)
            self.data_bytes_read += len(head)
            found = None
            if is_safetensors(head):
                size = os.fstat(fd).st_size - chunk.offset
                window = FileWindow(fd, chunk.offset, size)
                found = parse_header(window.read(8), window.read, size, where)
                self.data_bytes_read += window.bytes_read
            self._blobs[place] = found
        return self._blobs[place]

    @staticmethod
    def _in_safetensors(entry: DcpTensor, chunk: Chunk, blob, where: str) -> _Stored:
        """The chunk is the blob's tensor named like the entry; the blob's metadata says at which
        offsets of the global tensor it was saved."""
        import json

        metas, metadata, offsets, start = blob
        meta = metas.get(entry.fqn)
        try:
            saved = json.loads(metadata.get("DCP_SHARDING_INFO", "{}")).get(entry.fqn, {}).get("saved_offsets")
        except (ValueError, AttributeError):
            saved = None
        if meta is None or meta.dtype != entry.dtype or meta.shape != chunk.sizes or \
                (saved is not None and tuple(saved) != chunk.offsets):
            raise InvalidCheckpointError(f"the file holds no {entry.dtype} tensor {list(chunk.sizes)} saved at "
                                         f"{list(chunk.offsets)} under this name", path=where, key=entry.fqn, fix=_BAD)
        return _Stored(chunk.file, chunk.offset + start + offsets[entry.fqn][0])

    def _load_tensor(self, key: str):
        entry = self._entries[key]
        return self._read_box(entry, ((0,) * len(entry.shape), entry.shape))

    def read_slice(self, key: str, offsets, sizes, out=None):
        """The block ``[offsets, offsets + sizes)`` of a tensor, reading only the chunks' bytes it
        covers, into ``out`` when given (a contiguous tensor of the block's shape and dtype)."""
        entry = self.entry(key)
        box = (tuple(int(o) for o in offsets), tuple(int(n) for n in sizes))
        if len(box[0]) != len(entry.shape) or any(o + n > s for o, n, s in zip(*box, entry.shape, strict=True)):
            raise InvalidCheckpointError(f"a slice at {list(box[0])} of size {list(box[1])} does not fit the "
                                         f"shape {list(entry.shape)}", path=self.source, key=key,
                                         fix="check that the model's tensor has the checkpoint's shape")
        return self._read_box(entry, box, out)

    def _read_box(self, entry: DcpTensor, box, out=None):
        out = slice_buffer(out, box[1], entry.dtype, self.source, entry.fqn)
        if out.numel() == 0:
            return out
        itemsize = int(DTYPES[entry.dtype][0])
        for chunk in entry.chunks:
            part = intersect(box, (chunk.offsets, chunk.sizes))
            if part is None or not chunk.numel:
                continue
            stored = self._stored_at(entry, chunk)
            in_chunk = tuple(p - c for p, c in zip(part[0], chunk.offsets, strict=True))
            in_out = tuple(p - b for p, b in zip(part[0], box[0], strict=True))
            if stored.ref is not None:
                self._strided(entry, chunk, stored, part, in_chunk, in_out, out)
                continue
            pieces = runs(itemsize, part[1], chunk.sizes, in_chunk, box[1], in_out)
            self.data_bytes_read += read_runs(self._fd(chunk.file), stored.base, pieces, out,
                                              source=f"{self.source}/{chunk.file}", key=entry.fqn)
        return out

    def _strided(self, entry, chunk, stored: _Stored, part, in_chunk, in_out, out) -> None:
        """A chunk whose zip stores it with other strides: its storage read whole, then viewed."""
        import torch

        raw = torch.empty(stored.storage_nbytes, dtype=torch.uint8)
        self.data_bytes_read += read_runs(self._fd(chunk.file), stored.base, [(0, 0, stored.storage_nbytes)], raw,
                                          source=f"{self.source}/{chunk.file}", key=entry.fqn)
        ref = stored.ref
        usable = stored.storage_nbytes - stored.storage_nbytes % int(DTYPES[ref.dtype][0])
        view = raw[:usable].view(torch_dtype(ref.dtype)).as_strided(ref.shape, ref.stride, ref.offset)
        source = view[tuple(slice(a, a + n) for a, n in zip(in_chunk, part[1], strict=True))]
        out[tuple(slice(a, a + n) for a, n in zip(in_out, part[1], strict=True))].copy_(source)

    def byte_spans(self, key: str) -> list[tuple[Path, int, int]] | None:
        """(file, offset, nbytes) of each chunk in the tensor's row-major order, when every chunk is
        one contiguous run of both its file and the tensor (a ``Shard(0)`` layout); else None."""
        entry = self.entry(key)
        itemsize = int(DTYPES[entry.dtype][0])
        found = []
        for chunk in entry.chunks:
            if not chunk.numel:
                continue
            stored = self._stored_at(entry, chunk)
            pieces = list(runs(itemsize, chunk.sizes, chunk.sizes, (0,) * len(chunk.sizes), entry.shape,
                               chunk.offsets))
            if stored.ref is not None or len(pieces) != 1:
                return None
            src, dst, nbytes = pieces[0]
            found.append((dst, self.folder / chunk.file, stored.base + src, nbytes))
        found.sort(key=lambda item: item[0])
        position = 0
        for dst, _, _, nbytes in found:
            if dst != position:
                return None
            position += nbytes
        return [(path, offset, nbytes) for _, path, offset, nbytes in found] if position == entry.nbytes else None

    def extra_values(self) -> dict[str, object]:
        """The values behind ``extras``: each object entry's pickle read inertly (refused, unless the
        checkpoint was opened with ``inert``, when it names code-running globals)."""
        return {name: self._value(value) for name, value in self.selection.extra_values.items()}

    def _value(self, value):
        if isinstance(value, DcpObject):
            window = FileWindow(self._fd(value.file), value.offset, value.length)
            where = f"{self.source}/{value.file}"
            try:
                return plain(read_zip(window, where, inert=self._inert).root)
            except UnsafePickleError as exc:  # a rank's file alone cannot be scanned: name the folder
                exc.fix = (exc.fix or "").replace(f"ckpt scan {where}", f"ckpt scan {self.source}")
                exc.args = (exc.one_line(),)
                raise
            finally:
                self.data_bytes_read += window.bytes_read
        if isinstance(value, dict):
            return {key: self._value(item) for key, item in value.items()}
        return value if not is_inert(value) else plain(value)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_path(path: Path, source: str, **options) -> DcpCheckpoint:
    """``path`` is the folder's ``.metadata`` (``sources.resolve`` found it)."""
    select, inert = check_options(options, source)
    return DcpCheckpoint(source, path, select=select, inert=inert)

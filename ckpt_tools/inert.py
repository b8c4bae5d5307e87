"""Inert unpickling of torch checkpoints: the structure a pickle describes, without running it.

``torch.save`` writes a pickle whose tensors are persistent references to storages. In a zip file
(torch >= 1.6) the pickle is ``<archive>/data.pkl`` and each storage is an uncompressed record
``<archive>/data/<key>``; a legacy file is five pickles in a row (magic number, protocol version,
sys info, the object, the sorted storage keys) followed by the raw storages, each an 8-byte
little-endian element count and then its bytes, in the order of the keys.

``InertUnpickler`` reads such a pickle without importing a module or calling anything outside a
short allow-list of harmless constructors (``CONSTRUCTORS``: containers, ``OrderedDict``, the
tensor and parameter rebuild stand-ins that make ``TensorRef`` leaves, ``torch.Size`` as a tuple,
dtypes, devices and layouts as their names, ``_codecs.encode`` for latin-1 bytes, ``copyreg``'s
reconstructors as inert). Every other global becomes a placeholder that carries only its dotted
name: calling it (REDUCE), instantiating it (NEWOBJ, NEWOBJ_EX, INST, OBJ), setting its state
(BUILD) or filling it (SETITEM(S), APPEND(S), ADDITEMS) is recorded on an ``InertObject`` and never
executed. So a pickled ``argparse.Namespace`` becomes an InertObject whose ``state`` holds its
fields; a pickled ``nn.Module`` one whose state holds ``_parameters``, ``_buffers`` and ``_modules``.

Where the line is. Nothing is ever executed, whatever the pickle names. What differs is whether
the file is read by default or refused unless the caller opts in (``inert=True``, ``--inert``):

* read inertly by default: classes and functions of data-holding modules, i.e. anything not in
  the next list: argparse.Namespace, omegaconf containers, Lightning's AttributeDict,
  transformers' TrainingArguments, enums, pathlib paths, numpy scalars and arrays, nn.Module
  subclasses, user classes from ``__main__``; they are listed as "not executed" with their key path.
* hostile, refused by default: any global of a module that exists to run code, load code or reach
  the system (``CODE_MODULES``: os, posix, nt, subprocess, sys, shutil, socket, importlib, runpy,
  pty, ctypes, marshal, pickle, types, operator, functools, code, webbrowser, multiprocessing, ...),
  of the code-running corners of otherwise data-holding packages (``CODE_PREFIXES``: torch.hub,
  torch.jit, torch.fx, torch.load, numpy.load, ...), every ``builtins`` name that is not a plain
  data type (eval, exec, open, getattr, __import__, compile, ...), and any name reached through
  an attribute (``pathlib Path.unlink``), which is how pickles call methods by name. A reference
  counts even without a call: a pickle only names such a global to use it.

Tensor bytes are never read here while listing: ``read_zip`` and ``read_legacy`` return the
structure with ``TensorRef`` leaves and, for each storage, where its bytes lie in the file.
``MappedStorages`` turns a TensorRef into a CPU torch tensor over a copy-on-write memory map of the
file (``torch.frombuffer`` then ``as_strided``), so aliases keep sharing one storage and nothing is
copied unless a storage sits at an offset its dtype cannot be aligned to (legacy files).

This module imports nothing from the pickle, and torch only inside ``MappedStorages``.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import mmap
import pickle
import struct
import zipfile
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidCheckpointError, UnsafePickleError, UnsupportedFormatError, foreign_message
from .meta import DTYPES, torch_dtype
from .zip_members import read_member, written_without_crcs

_BAD_FILE = "the file is damaged: download or save it again"
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a checkpoint's pickle is KBs to a few MBs; tensors live elsewhere
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local header: signature ... name length, extra length

# ---------------------------------------------------------------------------------------------
# what a tensor is, without torch

# torch's typed storage classes, as pickled by torch.save, -> safetensors dtype names
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64", "ComplexDoubleStorage": "C128",
    "UntypedStorage": "U8",  # torch >= 2: dtypes without a typed storage (uint16, float8...) use bytes
}
# torch dtype attribute names (``torch.float16`` pickles as GLOBAL 'torch float16') -> safetensors names
TORCH_DTYPES: dict[str, str] = {torch_name: name for name, (_, torch_name) in DTYPES.items()}
# other torch values that pickle as globals; kept as their names
TORCH_NAMES: dict[str, str] = {
    **{name: "layout" for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                                   "sparse_bsc", "_mkldnn", "jagged")},
    **{name: "memory_format" for name in ("contiguous_format", "channels_last", "channels_last_3d",
                                          "preserve_format")},
}


@dataclass(frozen=True)
class StorageRef:
    """One storage of the file: its key, dtype (safetensors name) and length in elements.
    ``base`` is the element where a legacy storage view starts inside its root storage."""

    key: str
    dtype: str
    numel: int
    base: int = 0

    @property
    def nbytes(self) -> int:
        return self.numel * int(DTYPES[self.dtype][0])

    def __setstate__(self, state) -> None:  # BUILD: a pickle may not change what was checked
        raise _Malformed("BUILD on a storage")


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: storage, offset (in elements of ``dtype``), shape,
    stride. Its bytes stay in the file until ``MappedStorages.tensor`` maps them."""

    ckpt_leaf = "tensor"  # the marker selection.py recognises tensor leaves by

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    parameter: bool = field(default=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * int(DTYPES[self.dtype][0])

    @property
    def ckpt_type_name(self) -> str:
        return "Parameter" if self.parameter else "Tensor"

    def contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape, strict=True) if n != 1)

    def identity(self) -> tuple:
        """Equal for two references to the same bytes viewed the same way (aliases)."""
        return (self.storage.key, self.storage.base + self.offset, self.shape, self.stride, self.dtype)

    def __setstate__(self, state) -> None:  # BUILD: a pickle may not change a checked shape or offset
        raise _Malformed("BUILD on a tensor")


class TorchName(str):
    """A torch dtype, device, layout or memory format, kept as its name (``torch.float16``)."""

    kind = "dtype"

    def __new__(cls, text: str, kind: str) -> TorchName:
        made = super().__new__(cls, text)
        made.kind = kind
        return made

    @property
    def ckpt_type_name(self) -> str:
        return self.kind


class Size(tuple):
    """``torch.Size``, kept as the tuple it is."""


class DefaultDict(dict):
    """``collections.defaultdict`` without its factory ever being called (no ``__missing__``)."""

    default_factory: object = None
    ckpt_type_name = "defaultdict"


# ---------------------------------------------------------------------------------------------
# placeholders

class InertObject:
    """What the pickle asked for, recorded and never executed.

    ``dotted``: the global that made it; ``how``: REDUCE (a call), NEWOBJ / NEWOBJ_EX (an
    instance), or the name of the inert reconstructor; ``args`` / ``kwargs``: what it was called
    with; ``state``: what BUILD set (a Namespace's or dataclass's fields, a module's
    ``_parameters``...); ``items`` / ``listitems``: what SETITEM(S), APPEND(S) and ADDITEMS put
    in it (a dict or list subclass's contents); ``ops``: every operation, in order.
    """

    ckpt_leaf = "inert"
    dotted = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ and NEWOBJ_EX call cls.__new__(cls, *args, **kwargs)
        return _made(cls.dotted, "NEWOBJ_EX" if kwargs else "NEWOBJ", args, kwargs)

    # -- the mutations the unpickler makes, recorded --
    def __setstate__(self, state) -> None:  # BUILD
        self.ops.append("BUILD")
        self.state = state

    def __setitem__(self, key, value) -> None:  # SETITEM(S) on a dict subclass
        self.ops.append("SETITEM")
        self.items.append((key, value))

    def append(self, value) -> None:  # APPEND(S) on a list subclass
        self.ops.append("APPEND")
        self.listitems.append(value)

    def extend(self, values) -> None:
        self.ops.append("APPENDS")
        self.listitems.extend(values)

    def add(self, value) -> None:  # ADDITEMS on a set subclass
        self.ops.append("ADDITEMS")
        self.listitems.append(value)

    def __call__(self, *args, **kwargs):  # REDUCE with this object as the callable
        self.ops.append("called")
        return _made(f"{self.dotted}()", "REDUCE", args, kwargs)

    # -- reading it --
    @property
    def ckpt_type_name(self) -> str:
        return f"{self.dotted} (not executed)"

    def fields(self) -> dict:
        """The attributes BUILD set (``state`` as a dict; a ``(dict, slots)`` pair merged)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, Mapping) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return dict(state) if isinstance(state, Mapping) else {}

    def inert_entries(self) -> list[tuple[str, object]]:
        """(key path segment, value) of everything it holds: fields by name, items by key,
        list items as ``[i]``, call arguments as ``(i)`` / ``(name)``, other state as ``(state)``."""
        entries: list[tuple[str, object]] = [(f"({i})", a) for i, a in enumerate(self.args)]
        entries += [(f"({k})", v) for k, v in self.kwargs.items()]
        fields = self.fields()
        if fields:
            entries += [(str(k), v) for k, v in fields.items()]
        elif self.state is not None:
            entries.append(("(state)", self.state))
        entries += [(str(k), v) for k, v in self.items]
        entries += [(f"[{i}]", v) for i, v in enumerate(self.listitems)]
        return entries

    def __repr__(self) -> str:
        return f"<{self.dotted} (not executed)>"


def _made(dotted: str, how: str, args: tuple, kwargs: dict) -> InertObject:
    obj = object.__new__(InertObject)
    obj.dotted, obj.how, obj.args, obj.kwargs = dotted, how, tuple(args), dict(kwargs)
    obj.state, obj.items, obj.listitems, obj.ops = None, [], [], [how]
    return obj


class _GlobalType(type):
    """The type of a placeholder global: a class only so that NEWOBJ accepts it; calling it
    (REDUCE, INST, OBJ) records the call."""

    def __call__(cls, *args, **kwargs):
        return _made(cls.dotted, "REDUCE", args, kwargs)

    @property
    def ckpt_leaf(cls) -> str:
        return "global"

    @property
    def ckpt_type_name(cls) -> str:
        return f"{cls.dotted} (global, not imported)"

    def __repr__(cls) -> str:
        return f"<global {cls.dotted} (not imported)>"


def placeholder_global(dotted: str) -> type:
    """A stand-in for the global ``dotted``: nothing is imported, only the name is kept."""
    return _GlobalType(dotted.rpartition(".")[2] or dotted, (InertObject,),
                       {"dotted": dotted, "__module__": __name__, "__slots__": ()})


def is_inert(value) -> bool:
    """A placeholder, or a bare reference to a global: nothing a rewritten pickle could hold."""
    return isinstance(value, InertObject | _GlobalType | _Constructor | _StorageType)


# ---------------------------------------------------------------------------------------------
# the line: globals whose module runs code, loads code or reaches the system

CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket", "_socket", "ssl",
    "importlib", "imp", "zipimport", "pkgutil", "runpy", "pty", "tty", "ctypes", "_ctypes", "cffi",
    "marshal", "pickle", "_pickle", "pickletools", "shelve", "dill", "cloudpickle", "joblib", "types",
    "operator", "_operator", "functools", "_functools", "code", "codeop", "webbrowser", "multiprocessing",
    "concurrent", "asyncio", "threading", "_thread", "signal", "pdb", "bdb", "trace", "timeit", "cProfile",
    "profile", "doctest", "unittest", "tempfile", "io", "_io", "codecs", "fileinput", "mmap", "resource",
    "fcntl", "select", "selectors", "platform", "site", "sysconfig", "ensurepip", "venv", "distutils",
    "setuptools", "pip", "idlelib", "tkinter", "http", "urllib", "urllib3", "requests", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "sqlite3", "dbm", "glob", "inspect", "gc", "_imp", "_winapi",
    "_frozen_importlib", "_frozen_importlib_external", "_sitebuiltins", "commands", "popen2",
})
CODE_PREFIXES = (
    "torch.hub", "torch.jit", "torch.fx", "torch.package", "torch.utils.cpp_extension", "torch._C",
    "torch.ops", "torch._ops", "torch.serialization", "torch.load", "torch.save", "torch.compile",
    "torch.distributed.rpc", "torch.classes", "torch.library", "torch.utils.data.datapipes",
    "numpy.load", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.lib.npyio", "numpy.lib.format",
    "logging.config", "jinja2", "IPython",
)
# builtins that only hold data; every other builtins name (eval, exec, open, getattr, ...) is hostile
BUILTIN_DATA = frozenset({
    "set", "frozenset", "bytearray", "bytes", "complex", "slice", "object", "int", "float", "str", "bool",
    "tuple", "list", "dict", "NotImplemented", "Ellipsis",
})


# data holders that live in code-running modules: a BytesIO holds bytes and opens nothing
# (TransformerEngine saves its modules' ``_extra_state`` as one)
DATA_IN_CODE_MODULES = frozenset({"io.BytesIO", "_io.BytesIO"})


def is_code_global(module: str, name: str) -> bool:
    """True for a global that runs code, loads code or reaches the system (see the module docstring)."""
    if "." in name:  # ``Path.unlink``: a method reached by name through its class
        return True
    if f"{module}.{name}" in DATA_IN_CODE_MODULES:
        return False
    if module == "builtins":
        return name not in BUILTIN_DATA
    if module.split(".")[0] in CODE_MODULES:
        return True
    dotted = f"{module}.{name}"
    return any(dotted == p or dotted.startswith(p + ".") for p in CODE_PREFIXES)


# ---------------------------------------------------------------------------------------------
# the allow-list: the only callables a pickle reaches, each inert

class _Malformed(Exception):
    """A tensor record that does not describe a tensor: the file is damaged."""


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple | list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _Malformed(f"{what} is not a tuple of integers")
    return tuple(values)


def _tensor(storage, offset, size, stride, dtype: str | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _Malformed("a tensor without a storage reference")
    if not isinstance(offset, int) or offset < 0:
        raise _Malformed("a tensor with a bad storage offset")
    shape, strides = _ints(size, "a tensor's shape"), _ints(stride, "a tensor's stride")
    if len(shape) != len(strides) or any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise _Malformed("a tensor whose shape and stride disagree")
    dtype = dtype or storage.dtype
    ref = TensorRef(storage, offset, shape, strides, dtype)
    if ref.numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        itemsize = int(DTYPES[dtype][0])
        if (last + 1) * itemsize > storage.nbytes:
            raise _Malformed(f"a tensor reaches past its storage '{storage.key}'")
    return ref


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor / _rebuild_tensor_v2 (requires_grad, hooks, metadata ignored)."""
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_ignored):
    """torch._utils._rebuild_tensor_v3: a byte storage viewed as ``dtype`` (uint16, float8, ...)."""
    name = TORCH_DTYPES.get(str(dtype).removeprefix("torch.")) if isinstance(dtype, TorchName) else None
    if name is None:
        return _made("torch._utils._rebuild_tensor_v3", f"REDUCE (dtype {dtype} has no safetensors name)",
                     (storage, storage_offset, size, stride, requires_grad, hooks, dtype), {})
    return _tensor(storage, storage_offset, size, stride, name)


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): the tensor, marked as a parameter."""
    if not isinstance(data, TensorRef):
        raise _Malformed("a parameter without tensor data")
    return replace(data, parameter=True)


_PLAIN_TENSOR_TYPES = frozenset({"torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter"})


def _rebuild_from_type(func, new_type, args, state):
    """torch._tensor._rebuild_from_type_v2: rebuild with ``func``; a subclass other than
    Parameter stays a placeholder around the tensor (its class is never imported)."""
    inner = func.func if isinstance(func, _Constructor) else None
    if inner not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(args, tuple):
        return _made("torch._tensor._rebuild_from_type_v2", "REDUCE", (func, new_type, args, state), {})
    tensor = inner(*args)
    name = getattr(new_type, "dotted", None) or str(new_type)
    if name in _PLAIN_TENSOR_TYPES and isinstance(tensor, TensorRef):
        return replace(tensor, parameter=name.endswith("Parameter"))
    wrapped = _made(name, "tensor subclass", (tensor,), {})
    wrapped.state = state
    return wrapped


def _size(dims=()):
    return Size(_ints(dims, "torch.Size"))


def _device(*args):
    text = ":".join(str(a) for a in args if a is not None)
    return TorchName(text, "device")


def _layout(text):
    return TorchName(str(text), "layout")


_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _encode(obj, encoding="utf-8", errors="strict"):
    """_codecs.encode as protocol 2 pickles bytes: ``encode(text, 'latin1')``; nothing else runs."""
    if isinstance(obj, str) and isinstance(encoding, str) and encoding.lower() in _LATIN1 | {"utf-8", "utf8", "ascii"}:
        return obj.encode(encoding, "strict")
    return _made("_codecs.encode", "REDUCE", (obj, encoding, errors), {})


def _bytes_like(kind: type) -> Callable:
    def make(source=b"", encoding=None, errors=None):
        # never from an integer: bytearray(10**12) would allocate it
        if isinstance(source, bytes | bytearray):
            return kind(source)
        if isinstance(source, str) and isinstance(encoding, str):
            return kind(_encode(source, encoding) if encoding.lower() in _LATIN1 else source.encode("utf-8"))
        return _made(f"builtins.{kind.__name__}", "REDUCE", (source, encoding, errors), {})
    return make


def _defaultdict(factory=None, *args):
    made = DefaultDict(*args)
    made.default_factory = factory
    return made


def _reconstructor(cls, base, value):
    """copyreg._reconstructor (protocols 0 and 1): ``base.__new__(cls, value)``, recorded, never
    built; a dict or list subclass's contents (``value``) become its items."""
    dotted = getattr(cls, "dotted", None) or f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"
    base_name = getattr(base, "dotted", None) or f"builtins.{getattr(base, '__name__', '?')}"
    obj = _made(dotted, "copyreg._reconstructor", (), {})
    if base_name == "builtins.dict" and isinstance(value, Mapping):
        obj.items.extend(value.items())
    elif base_name == "builtins.list" and isinstance(value, list):
        obj.listitems.extend(value)
    elif value is not None or base_name != "builtins.object":
        obj.args = (base, value)
    return obj


def _newobj(cls, *args):
    """copyreg.__newobj__ (what NEWOBJ stands for): ``cls.__new__(cls, *args)`` on a placeholder."""
    if isinstance(cls, _GlobalType):
        return cls.__new__(cls, *args)
    return _made("copyreg.__newobj__", "REDUCE", (cls, *args), {})


def _newobj_ex(cls, args=(), kwargs=None):
    if isinstance(cls, _GlobalType):
        return cls.__new__(cls, *tuple(args), **dict(kwargs or {}))
    return _made("copyreg.__newobj_ex__", "REDUCE", (cls, args, kwargs), {})


class _ReadOnly:
    """Stand-ins a pickle receives cannot be changed by it (BUILD with slot state sets attributes)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise _Malformed(f"a pickle tried to set '{name}' on {self!r:.60}")


class _StorageType(_ReadOnly):
    """``torch.FloatStorage`` and friends, as they appear in persistent ids."""

    __slots__ = ("dotted", "dtype")

    def __init__(self, name: str, dtype: str) -> None:
        object.__setattr__(self, "dotted", f"torch.{name}")
        object.__setattr__(self, "dtype", dtype)


class _Constructor(_ReadOnly):
    """One allow-listed callable as one unpickler hands it out: the pickle can call it, not change
    it, and what it does to its own copy cannot reach another read."""

    __slots__ = ("dotted", "func")

    def __init__(self, func, dotted: str) -> None:
        object.__setattr__(self, "func", func)
        object.__setattr__(self, "dotted", dotted)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    @property
    def ckpt_type_name(self) -> str:
        return f"{self.dotted} (global)"

    def __repr__(self) -> str:
        return f"<stand-in for {self.dotted}>"


def _fresh(value, dotted: str):
    """A private copy of an allow-list entry for one unpickler."""
    if isinstance(value, TorchName):
        return TorchName(str(value), value.kind)
    if isinstance(value, _StorageType):
        return _StorageType(value.dotted.removeprefix("torch."), value.dtype)
    return _Constructor(value, dotted)


# (module, name) -> what the pickle gets instead of the global; nothing else is ever called
CONSTRUCTORS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("collections", "Counter"): Counter,
    ("collections", "deque"): deque,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("builtins", "bytearray"): _bytes_like(bytearray),
    ("builtins", "bytes"): _bytes_like(bytes),
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
    ("copyreg", "__newobj_ex__"): _newobj_ex,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch.serialization", "_get_layout"): _layout,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("storage.UntypedStorage", "U8"),  # how torch 2 names it
    **{("torch", name): TorchName(f"torch.{name}", "dtype") for name in TORCH_DTYPES},
    **{("torch", name): TorchName(f"torch.{name}", kind) for name, kind in TORCH_NAMES.items()},
    **{(module, "Tensor"): TorchName("torch.Tensor", "type") for module in ("torch", "torch._tensor")},
    ("torch.nn.parameter", "Parameter"): TorchName("torch.nn.parameter.Parameter", "type"),
}


# ---------------------------------------------------------------------------------------------
# the unpickler

@dataclass
class GlobalUse:
    """One global a pickle named: ``status`` is ``stand-in`` (on the allow-list, an inert
    replacement ran), ``not executed`` (a placeholder) or ``hostile`` (a placeholder of a
    code-running global: the file is refused unless read with ``inert=True``)."""

    dotted: str
    status: str
    pickle: str


class InertUnpickler(pickle.Unpickler):
    """An unpickler that imports nothing: ``find_class`` answers from ``CONSTRUCTORS`` or with a
    placeholder; storages become ``StorageRef`` through ``on_storage``."""

    def __init__(self, file, uses: dict[str, GlobalUse], record: str,
                 on_storage: Callable[[tuple], object] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.uses, self.record, self.on_storage = uses, record, on_storage
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # name the global as the standard unpickler would resolve it (``__builtin__`` -> ``builtins``)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        if (module, name) in CONSTRUCTORS:
            self.uses.setdefault(dotted, GlobalUse(dotted, "stand-in", self.record))
            return _fresh(CONSTRUCTORS[(module, name)], dotted)
        status = "hostile" if is_code_global(module, name) else "not executed"
        self.uses.setdefault(dotted, GlobalUse(dotted, status, self.record))
        if dotted not in self.placeholders:
            self.placeholders[dotted] = placeholder_global(dotted)
        return self.placeholders[dotted]

    def persistent_load(self, pid):
        if self.on_storage is None or not isinstance(pid, tuple) or not pid:
            raise _Malformed(f"unexpected persistent id {pid!r:.80}")
        return self.on_storage(pid)


@dataclass
class Contents:
    """A torch file read inertly: the object (``TensorRef`` leaves, ``InertObject`` placeholders),
    its storages and where their bytes lie, and every global its pickles named."""

    format: str
    root: object
    storages: dict[str, StorageRef]
    spans: dict[str, tuple[int, int]]  # storage key -> (offset of its first byte in the file, or -1; nbytes)
    uses: dict[str, GlobalUse]
    notes: list[str] = field(default_factory=list)
    # storage key -> (offset of its record's data, the record's size, its CRC-32), zip files that
    # recorded CRCs only
    records: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def hostile(self) -> list[str]:
        return [u.dotted for u in self.uses.values() if u.status == "hostile"]

    @property
    def not_executed(self) -> list[str]:
        """Every global replaced by a placeholder (hostile ones included), first named first."""
        return [u.dotted for u in self.uses.values() if u.status != "stand-in"]


def refusal(source: str, hostile: list[str]) -> UnsafePickleError:
    return UnsafePickleError(
        f"the pickle needs globals that safe (weights_only) loading refuses: {', '.join(hostile)}; they would run "
        "code, and nothing was executed", globals_=hostile, path=source,
        fix=f"run `ckpt scan {source}` to see what they would do; to read its tensors without running anything, "
            "pass --inert (inert=True); only load files you trust")


def _unpickle(stream, uses: dict[str, GlobalUse], record: str, source: str, on_storage=None):
    """One pickle from ``stream``; a damaged pickle is InvalidCheckpointError, unless the part
    already read named a hostile global: then the refusal is what the caller raises."""
    unpickler = InertUnpickler(stream, uses, record, on_storage)
    try:
        return unpickler.load()
    except _Malformed as exc:
        raise _damaged(source, f"pickle '{record}': {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError, UnicodeDecodeError, struct.error) as exc:
        raise _damaged(source, f"pickle '{record}' is corrupt ({foreign_message(exc)})") from None


def _damaged(source: str, what: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"truncated or corrupt torch checkpoint: {what}", path=source, fix=_BAD_FILE)


def _check_hostile(uses: dict[str, GlobalUse], source: str, inert: bool, notes: list[str]) -> None:
    hostile = [u.dotted for u in uses.values() if u.status == "hostile"]
    if hostile and not inert:
        raise refusal(source, hostile)
    if hostile:
        notes.append(f"read inertly as asked: the pickle names code-running globals ({', '.join(hostile)}); "
                     "none was imported or called")


class _Storages:
    """persistent_load for torch's storage ids; one StorageRef per key."""

    def __init__(self, legacy: bool) -> None:
        self.legacy = legacy
        self.refs: dict[str, StorageRef] = {}
        self.roots: dict[str, StorageRef] = {}

    def __call__(self, pid: tuple):
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and self.legacy and len(pid) == 4:
            return pid[1]  # a legacy file names each nn.Module class (and its source) this way
        if kind != "storage" or len(pid) != (6 if self.legacy else 5) or not isinstance(pid[1], _StorageType):
            raise _Malformed(f"unexpected persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if storage_type.dtype not in DTYPES or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise _Malformed(f"storage '{key}' has a bad size")
        root = self.roots.setdefault(key, StorageRef(key, storage_type.dtype, numel))
        if root.dtype != storage_type.dtype or root.numel != numel:
            raise _Malformed(f"storage '{key}' is described twice, differently")
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        view_key, offset, view_numel = view  # pre-1.0 files: a storage that is a slice of another
        ref = StorageRef(key, root.dtype, int(view_numel), int(offset))
        if ref.base + ref.numel > root.numel:
            raise _Malformed(f"storage view '{view_key}' reaches past storage '{key}'")
        return self.refs.setdefault(str(view_key), ref)


def loads(data: bytes, *, source: str = "<pickle>", inert: bool = False, record: str = "pickle") -> Contents:
    """One pickle held in memory (no torch storages), read inertly; refused like a checkpoint's
    pickle when it names code-running globals, unless ``inert``. ``record`` names it in errors."""
    uses: dict[str, GlobalUse] = {}
    notes: list[str] = []
    try:
        root = _unpickle(io.BytesIO(data), uses, record, source)
    except InvalidCheckpointError:
        _check_hostile(uses, source, inert, notes)
        raise
    _check_hostile(uses, source, inert, notes)
    return Contents("pickle", root, {}, {}, uses, notes)


# ---------------------------------------------------------------------------------------------
# zip files

def _data_offset(fileobj: BinaryIO, info: zipfile.ZipInfo, source: str) -> int:
    fileobj.seek(info.header_offset)
    head = fileobj.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size:
        raise _damaged(source, f"record '{info.filename}' is cut short")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    if signature != b"PK\x03\x04":
        raise _damaged(source, f"record '{info.filename}' has no local header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _archive_prefix(names: list[str], source: str) -> str:
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _damaged(source, "the zip archive does not hold exactly one <archive>/data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in names) or prefix + "constants.pkl" in names:
        raise UnsupportedFormatError("a TorchScript archive (torch.jit.save), which holds code, not a torch.save "
                                     "checkpoint", path=source,
                                     fix="save its weights with torch.save(model.state_dict(), path) where you trust it")
    return prefix


def read_zip(fileobj: BinaryIO, source: str, *, locate: bool = True, inert: bool = False) -> Contents:
    """Read a zip-format torch file's pickle inertly. With ``locate`` each storage's offset in the
    file is found (one local-header read per record); a remote listing skips that (offsets -1)."""
    try:
        with zipfile.ZipFile(fileobj) as archive:
            infos = {i.filename: i for i in archive.infolist()}
            prefix = _archive_prefix(list(infos), source)
            byteorder = infos.get(prefix + "byteorder")
            if byteorder is not None and read_member(archive, byteorder).strip() not in (b"little", b""):
                raise UnsupportedFormatError("a big-endian torch file", path=source,
                                             fix="re-save it on a little-endian machine")
            info = infos[prefix + "data.pkl"]
            if info.file_size > MAX_PICKLE_BYTES:
                raise _damaged(source, f"data.pkl is {info.file_size} bytes, more than a checkpoint's pickle holds")
            data = read_member(archive, info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, OSError, ValueError,
            NotImplementedError) as exc:
        if isinstance(exc, InvalidCheckpointError | UnsupportedFormatError):
            raise
        raise _damaged(source, f"unreadable zip archive ({foreign_message(exc)})") from None
    uses: dict[str, GlobalUse] = {}
    storages = _Storages(legacy=False)
    notes: list[str] = []
    try:
        root = _unpickle(io.BytesIO(data), uses, "data.pkl", source, storages)
    except InvalidCheckpointError:
        _check_hostile(uses, source, inert, notes)
        raise
    _check_hostile(uses, source, inert, notes)
    spans, records = {}, {}
    crc_checked = not written_without_crcs(list(infos.values()))
    for key, ref in storages.roots.items():
        record = infos.get(f"{prefix}data/{key}")
        if record is None:
            raise _damaged(source, f"the record of storage '{key}' (data/{key}) is missing")
        if record.compress_type != zipfile.ZIP_STORED:
            raise _damaged(source, f"the record of storage '{key}' is compressed; torch stores them as they are")
        if record.file_size < ref.nbytes:
            raise _damaged(source, f"the record of storage '{key}' holds {record.file_size} bytes, "
                                   f"its tensors need {ref.nbytes}")
        spans[key] = (_data_offset(fileobj, record, source) if locate else -1, ref.nbytes)
        if crc_checked:
            records[key] = (spans[key][0], record.file_size, record.CRC)
    return Contents("torch-zip", root, {**storages.roots, **storages.refs}, spans, uses, notes, records)


# ---------------------------------------------------------------------------------------------
# legacy files

def read_legacy(fileobj: BinaryIO, source: str, *, inert: bool = False) -> Contents:
    """Read a legacy (pre-zip) torch file: its five pickles inertly, then the position of each
    storage's bytes (the 8-byte count before each one is read, the bytes are not)."""
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(0)
    uses: dict[str, GlobalUse] = {}
    notes: list[str] = []
    storages = _Storages(legacy=True)
    try:
        if _unpickle(fileobj, uses, "magic", source) != LEGACY_MAGIC_NUMBER:
            raise _damaged(source, "not torch's magic number")
        if _unpickle(fileobj, uses, "protocol", source) != LEGACY_PROTOCOL:
            raise _damaged(source, "an unknown legacy protocol version")
        sys_info = _unpickle(fileobj, uses, "sys_info", source)
        if isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False:
            raise UnsupportedFormatError("a big-endian torch file", path=source,
                                         fix="re-save it on a little-endian machine")
        root = _unpickle(fileobj, uses, "object", source, storages)
        keys = _unpickle(fileobj, uses, "storage_keys", source)
    except InvalidCheckpointError:
        _check_hostile(uses, source, inert, notes)
        raise
    _check_hostile(uses, source, inert, notes)
    if not isinstance(keys, list) or any(str(k) not in storages.roots for k in keys):
        raise _damaged(source, "the storage key list does not match the storages the pickle names")
    spans, cursor = {}, fileobj.tell()
    for key in map(str, keys):
        ref = storages.roots[key]
        fileobj.seek(cursor)
        head = fileobj.read(8)
        if len(head) != 8 or struct.unpack("<q", head)[0] != ref.numel:
            raise _damaged(source, f"storage '{key}' does not start where the one before it ends")
        spans[key] = (cursor + 8, ref.nbytes)
        cursor += 8 + ref.nbytes
        if cursor > size:
            raise _damaged(source, f"storage '{key}' runs past the end of the file (truncated?)")
    if set(spans) != set(storages.roots):
        raise _damaged(source, "a storage the pickle names is not in the file")
    return Contents("torch-legacy", root, {**storages.roots, **storages.refs}, spans, uses, notes)


# ---------------------------------------------------------------------------------------------
# tensor bytes

class MappedStorages:
    """CPU torch tensors over a copy-on-write memory map of one local file.

    One base tensor per storage, so tensors that share a storage in the file share it here too.
    Writes to a tensor stay in this process. A storage whose offset is not a multiple of its
    element size (legacy files) is copied once into aligned memory instead.
    """

    def __init__(self, path: Path, spans: dict[str, tuple[int, int]]) -> None:
        self.path, self.spans = path, spans
        self._map = None
        self._bases: dict[tuple[str, str], object] = {}

    def _mapped(self):
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def _base(self, ref: TensorRef):
        """The storage's bytes as a flat tensor of ``ref.dtype``."""
        import torch

        cache_key = (ref.storage.key, ref.dtype)
        if cache_key in self._bases:
            return self._bases[cache_key]
        start, nbytes = self.spans[ref.storage.key]
        itemsize = int(DTYPES[ref.dtype][0])
        raw = torch.frombuffer(self._mapped(), dtype=torch.uint8, count=nbytes, offset=start)
        if start % itemsize:
            raw = raw.clone()  # unaligned in the file: one aligned copy
        base = raw[: nbytes - nbytes % itemsize].view(torch_dtype(ref.dtype))
        self._bases[cache_key] = base
        return base

    def tensor(self, ref: TensorRef):
        import torch

        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=torch_dtype(ref.dtype))
        base = self._base(ref)
        itemsize = int(DTYPES[ref.dtype][0])
        storage_itemsize = int(DTYPES[ref.storage.dtype][0])
        start = ref.storage.base * storage_itemsize // itemsize + ref.offset
        return base.as_strided(ref.shape, ref.stride, start)

    def byte_span(self, ref: TensorRef) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) when the tensor is one contiguous run of the file's bytes."""
        if not ref.contiguous():
            return None
        start, _ = self.spans[ref.storage.key]
        first = ref.storage.base * int(DTYPES[ref.storage.dtype][0]) + ref.offset * int(DTYPES[ref.dtype][0])
        return self.path, start + first, ref.nbytes

    def storage_span(self, storage: StorageRef) -> tuple[Path, int, int]:
        """(file, offset, nbytes) of a storage's own bytes."""
        start, _ = self.spans[storage.key]
        return self.path, start + storage.base * int(DTYPES[storage.dtype][0]), storage.nbytes

    def close(self) -> None:
        # The map is released, never closed: torch.frombuffer keeps the mmap object alive but holds
        # no buffer export, so closing it would unmap the memory under tensors already handed out
        # (a crash on their next read). Dropped here, it is unmapped once the last tensor goes.
        self._bases.clear()
        self._map = None


# ---------------------------------------------------------------------------------------------
# reading what was not executed

def plain(value, depth: int = 0):
    """A JSON-able view of ``value`` in which placeholders show what the pickle said
    (``{"__global__": "argparse.Namespace", "fields": {...}}``); tensors stay TensorRefs."""
    if depth > 32:
        return "..."
    if isinstance(value, TorchName):
        return str(value)
    if isinstance(value, str | int | float | bool | type(None) | TensorRef):
        return value
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    if isinstance(value, _GlobalType | _Constructor):
        return {"__global__": value.dotted}
    if isinstance(value, InertObject):
        out: dict = {"__global__": value.dotted, "__not_executed__": value.how}
        for name, part in (("args", list(value.args)), ("kwargs", value.kwargs), ("fields", value.fields()),
                           ("items", dict((str(k), v) for k, v in value.items)), ("list", value.listitems)):
            if part:
                out[name] = plain(part, depth + 1)
        if value.state is not None and not value.fields():
            out["state"] = plain(value.state, depth + 1)
        return out
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | deque):
        return [plain(v, depth + 1) for v in value]
    return repr(value)

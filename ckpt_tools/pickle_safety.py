"""Pickle safety: what a pickle would import and call, found without executing it.

The walker steps through opcodes with ``pickletools.genops`` and simulates only the stack *shape*
(strings, memo slots, which global made which object), so it can name the callable behind every
REDUCE/NEWOBJ/BUILD even when the global came from the memo. Nothing is imported from the pickle
and nothing is called. Every GLOBAL-like opcode is recorded whatever the simulation thinks, so a
pickle that confuses the simulation still cannot hide an import.

The allow-list is the one ``torch.load(weights_only=True)`` uses: read live from torch when this
process has imported it (so whatever the caller registered with
``torch.serialization.add_safe_globals`` counts), otherwise taken from the snapshot shipped for the
installed torch version (``data/weights_only_allowlist.json``, written by
``scripts/allowlist_snapshot.py``), so a scan imports no torch.

This module sits below the readers: they call ``check_zip_records`` before reading a zip, so a
record that inflates absurdly is refused first. ``scan.py`` resolves SOURCEs and reports on top.
"""

from __future__ import annotations

import _compat_pickle
import ast
import copyreg
import functools
import io
import json
import os
import pickletools
import struct
import sys
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import BinaryIO

from .errors import CkptError, InvalidCheckpointError, foreign_message
from .magic import HEAD_BYTES, detect
from .render import markdown_table, plural, rich_table
from .zip_members import open_member, written_without_crcs

# torch.serialization's magic number: the first of the pickles in a legacy (non-zip) file.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# magic, protocol version, sys info, the object, then the storage keys; raw bytes follow.
LEGACY_PICKLES = ("magic", "protocol", "sys_info", "object", "storage_keys")
# A compressed pickle record that inflates more than this ratio (and past the size floor) is
# treated as a zip bomb: torch stores its records uncompressed.
BOMB_RATIO, BOMB_FLOOR = 100, 16 * 1024 * 1024
MAX_LINE = 16 * 1024 * 1024  # longest text-protocol line we read (one GLOBAL, STRING, ...)
MAX_TITLE_PICKLES = 8  # pickles named in a table's title; the rest are counted
BAD_FILE = "the file is damaged or not a checkpoint: download or save it again"
# zip flag bits torch's reader ignores (it reads stored records as they are): a record flagged so is
# read differently by Python's zipfile, so a scanner and a loader would not see the same bytes
SUSPICIOUS_FLAG_BITS = {0: "encrypted", 5: "compressed patched data", 6: "strongly encrypted"}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
ALLOWLIST_SNAPSHOT = "data/weights_only_allowlist.json"  # {"versions": {torch version: {allowed, blocked}}}

# Opcodes the weights-only unpickler implements; any other makes torch refuse the file even
# when every global is allowed (reported as a note, the verdict is about code, not opcodes).
_WEIGHTS_ONLY_OPCODES = frozenset(
    "GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 "
    "NONE NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 "
    "BINFLOAT BINUNICODE SHORT_BINSTRING BINPERSID BINGET LONG_BINGET BINPUT LONG_BINPUT LONG1 "
    "PROTO STOP".split()
)
# Used only when torch's private allow-list cannot be read (a future torch moved it).
_FALLBACK_ALLOWED = frozenset({
    "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
    "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage", "torch.DoubleStorage",
    "torch.LongStorage", "torch.IntStorage", "torch.ByteStorage", "torch.BoolStorage",
    "torch.float32", "torch.float16", "torch.bfloat16", "torch.float64", "torch.int64", "torch.int32",
    "torch.uint8", "torch.int8", "torch.bool",
})
_FALLBACK_BLOCKED = ("sys", "os", "posix", "nt")



# ---------------------------------------------------------------------------------------------
# the report

@dataclass
class ScanReport:
    """Every global a checkpoint's pickles import and every call they would make."""

    source: str
    format: str
    pickles: list[str] = field(default_factory=list)
    globals: list[dict] = field(default_factory=list)  # {"module", "name", "allowed", "pickle"}
    calls: list[dict] = field(default_factory=list)  # {"opcode", "callable", "allowed", "count", "pickle"}
    notes: list[str] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False, compare=False)

    @property
    def offenders(self) -> list[str]:
        """``module.name`` of every import or call target that is not allowed, first seen first."""
        names = [f"{g['module']}.{g['name']}" for g in self.globals if not g["allowed"]]
        names += [c["callable"] for c in self.calls if not c["allowed"]]
        return list(dict.fromkeys(names))

    @property
    def verdict(self) -> str:
        return "unsafe" if self.offenders else "safe"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "verdict": self.verdict,
            "offenders": self.offenders,
            "globals": [{k: g[k] for k in ("module", "name", "allowed")} for g in self.globals],
            "calls": [dict(c) for c in self.calls],
            "pickles": list(self.pickles),
            "notes": list(self.notes),
        }

    def _rows(self) -> list[list[object]]:
        uses = Counter()
        for call in self.calls:
            uses[call["callable"]] += call["count"]
        return [[f"{g['module']}.{g['name']}", "yes" if g["allowed"] else "NO", uses.get(f"{g['module']}.{g['name']}", 0),
                 g["pickle"]] for g in self.globals]

    def _headline(self) -> str:
        if not self.pickles:
            return f"{self.source}: safe, no pickle: nothing to scan ({self.format})"
        counted = f"{len(self.pickles)} pickle{'s' if len(self.pickles) != 1 else ''}"
        if self.verdict == "safe":
            return (f"{self.source}: safe ({counted}, {plural(len(self.globals), 'global')}, all on the weights-only "
                    "allow-list)")
        return f"{self.source}: UNSAFE, imports or calls {', '.join(self.offenders)} ({counted} walked)"

    def _title(self) -> str:
        shown = ", ".join(self.pickles[:MAX_TITLE_PICKLES])
        more = f" and {len(self.pickles) - MAX_TITLE_PICKLES} more" if len(self.pickles) > MAX_TITLE_PICKLES else ""
        return f"{self.format}: pickles {shown}{more}"

    def to_markdown(self) -> str:
        lines = [f"**{self._headline()}**", ""]
        if self.globals:
            lines.append(markdown_table(["global", "allowed", "calls", "pickle"], self._rows()))
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        style = "bold green" if self.verdict == "safe" else "bold red"
        parts = [Text(self._headline(), style=style)]
        if self.globals:
            parts.append(rich_table(self._title(), ["global", "allowed", "calls", "pickle"], self._rows(),
                                    justify_right=("calls",)))
        parts += [Text(f"note: {n}", style="dim") for n in self.notes]
        return Group(*parts)


# ---------------------------------------------------------------------------------------------
# the allow-list

def allow_list() -> tuple[frozenset[str], tuple[str, ...]]:
    """(allowed ``module.name`` strings, modules never allowed), as ``torch.load(weights_only=True)``
    would have them in this process.

    When torch is already imported, it is read live: ``add_safe_globals`` registrations exist only
    in a process that imported torch. Otherwise the snapshot shipped for the installed torch version
    is used, so a scan needs no torch; a version the snapshot lacks is read from torch itself."""
    if "torch" not in sys.modules:
        snapshot = snapshot_allow_list(installed_torch_version())
        if snapshot is not None:
            return snapshot
    try:
        return live_allow_list()
    except (ImportError, AttributeError):
        return _FALLBACK_ALLOWED, _FALLBACK_BLOCKED


def live_allow_list() -> tuple[frozenset[str], tuple[str, ...]]:
    """The allow-list read from torch now (imports torch; ImportError or AttributeError when this
    torch has none where it is looked for)."""
    import torch._weights_only_unpickler as wo

    allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    return frozenset(allowed), tuple(wo._blocklisted_modules)


def installed_torch_version() -> str | None:
    """The installed torch distribution's version, read from its metadata (torch is not imported)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _snapshots() -> dict:
    try:
        text = resources.files(__package__).joinpath(ALLOWLIST_SNAPSHOT).read_text(encoding="utf-8")
        return json.loads(text)["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a damaged or missing snapshot only costs the torch import


def snapshot_allow_list(version: str | None) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """The allow-list shipped for torch ``version`` (what a fresh ``import torch`` registers), or None."""
    entry = _snapshots().get(version) if version else None
    if not isinstance(entry, dict):
        return None
    return frozenset(entry["allowed"]), tuple(entry["blocked"])


def _is_allowed(module: str, name: str, allowed: frozenset[str], blocked: tuple[str, ...]) -> bool:
    return module.split(".")[0] not in blocked and f"{module}.{name}" in allowed


# ---------------------------------------------------------------------------------------------
# the opcode walk

class _Mark:
    pass


_MARK = _Mark()
_UNKNOWN = object()


@dataclass(frozen=True)
class _Global:
    module: str
    name: str

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class _Made:
    """An object some global produced (called or instantiated): BUILD on it runs that type's code."""

    origin: str


_UNRESOLVED = "<unresolved>"
_KEEPS_TARGET = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}


class _CappedReader:
    """Reads at most ``limit`` bytes, so a length field cannot make us allocate past the data."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw, self._left, self._pos = raw, limit, 0

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._raw.read(n)
        self._left -= len(data)
        self._pos += len(data)
        return data

    def readline(self) -> bytes:
        line = self._raw.readline(min(self._left, MAX_LINE))
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            raise ValueError(f"a text line longer than {MAX_LINE} bytes")
        self._left -= len(line)
        self._pos += len(line)
        return line

    def tell(self) -> int:
        return self._pos

    @property
    def left(self) -> int:
        return self._left


class _Walker:
    """Simulates one pickle's stack shape and records globals and calls into a report."""

    def __init__(self, report: ScanReport, record: str, allowed: frozenset[str], blocked: tuple[str, ...]):
        self.report, self.record = report, record
        self.allowed, self.blocked = allowed, blocked
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.calls: Counter = Counter()
        self.opcodes: set[str] = set()
        self.anomalies: list[str] = []

    # -- stack primitives (lenient: a malformed pickle is noted, never crashes the scan) --
    def pop(self):
        if self.stack:
            return self.stack.pop()
        self._anomaly("stack underflow")
        return _UNKNOWN

    def pop_mark(self) -> list:
        items = self.stack
        if not self.metastack:
            self._anomaly("no MARK to pop to")
            self.stack = []
            return items
        self.stack = self.metastack.pop()
        return items

    def _anomaly(self, text: str) -> None:
        if text not in self.anomalies:
            self.anomalies.append(text)

    # -- recording --
    def add_global(self, module: str, name: str) -> _Global:
        # the unpickler maps Python 2 names (``__builtin__``) the same way before importing
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        glob = _Global(module, name)
        if (module, name) not in self.report._seen:
            self.report._seen.add((module, name))
            self.report.globals.append({"module": module, "name": name, "pickle": self.record,
                                        "allowed": _is_allowed(module, name, self.allowed, self.blocked)})
        return glob

    def call(self, opcode: str, target) -> _Made:
        origin = target.dotted if isinstance(target, _Global) else (
            target.origin if isinstance(target, _Made) else _UNRESOLVED)
        self.calls[(opcode, origin)] += 1
        return _Made(origin)

    def _allowed_origin(self, origin: str) -> bool:
        module, _, name = origin.rpartition(".")
        return origin != _UNRESOLVED and _is_allowed(module, name, self.allowed, self.blocked)

    def flush_calls(self) -> None:
        for (opcode, origin), count in self.calls.items():
            self.report.calls.append({"opcode": opcode, "callable": origin, "count": count,
                                      "allowed": self._allowed_origin(origin), "pickle": self.record})

    # -- the walk --
    def walk(self, stream: _CappedReader):
        """Walk to STOP; returns the constant the pickle evaluates to (or a placeholder)."""
        result = _UNKNOWN
        for opcode, arg, _pos in pickletools.genops(stream):
            self.opcodes.add(opcode.name)
            handler = getattr(self, f"op_{opcode.name}", None)
            if handler is not None:
                out = handler(arg)
                if opcode.name == "STOP":
                    result = out
            else:
                self.generic(opcode, arg)
        return result

    def generic(self, opcode, arg) -> None:
        before = opcode.stack_before
        if pickletools.markobject in before:
            self.pop_mark()
            popped = [self.pop() for _ in range(before.index(pickletools.markobject))]
        else:
            popped = [self.pop() for _ in before]
        if opcode.name in _KEEPS_TARGET:
            self.stack.append(popped[-1])
            return
        for _ in opcode.stack_after:
            keep = isinstance(arg, str | int) and not isinstance(arg, bool) and not before
            self.stack.append(arg if keep else _UNKNOWN)

    def op_MARK(self, _arg) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_POP(self, _arg) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_POP_MARK(self, _arg) -> None:
        self.pop_mark()

    def op_DUP(self, _arg) -> None:
        self.stack.append(self.stack[-1] if self.stack else _UNKNOWN)

    def op_STOP(self, _arg):
        return self.pop()

    def _put(self, index) -> None:
        self.memo[index] = self.stack[-1] if self.stack else _UNKNOWN

    def op_PUT(self, arg) -> None:
        self._put(arg)

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, _arg) -> None:
        self._put(len(self.memo))

    def op_GET(self, arg) -> None:
        if arg not in self.memo:
            self._anomaly(f"memo slot {arg} read before it was written")
        self.stack.append(self.memo.get(arg, _UNKNOWN))

    op_BINGET = op_LONG_BINGET = op_GET

    def op_GLOBAL(self, arg) -> None:
        module, _, name = arg.partition(" ")
        self.stack.append(self.add_global(module, name))

    def op_STACK_GLOBAL(self, _arg) -> None:
        name, module = self.pop(), self.pop()
        if isinstance(module, str) and isinstance(name, str):
            self.stack.append(self.add_global(module, name))
        else:
            self.stack.append(self.add_global("<unresolved>", "STACK_GLOBAL"))

    def _extension(self, code) -> None:
        module, name = copyreg._inverted_registry.get(code, ("copyreg", f"<extension {code}>"))
        self.stack.append(self.add_global(module, name))

    op_EXT1 = op_EXT2 = op_EXT4 = _extension

    def op_INST(self, arg) -> None:
        self.pop_mark()
        module, _, name = arg.partition(" ")
        self.stack.append(self.call("INST", self.add_global(module, name)))

    def op_OBJ(self, _arg) -> None:
        items = self.pop_mark()
        self.stack.append(self.call("OBJ", items[0] if items else _UNKNOWN))

    def op_REDUCE(self, _arg) -> None:
        self.pop()
        self.stack.append(self.call("REDUCE", self.pop()))

    def op_NEWOBJ(self, _arg) -> None:
        self.pop()
        self.stack.append(self.call("NEWOBJ", self.pop()))

    def op_NEWOBJ_EX(self, _arg) -> None:
        self.pop()
        self.pop()
        self.stack.append(self.call("NEWOBJ_EX", self.pop()))

    def op_BUILD(self, _arg) -> None:
        self.pop()
        target = self.stack[-1] if self.stack else _UNKNOWN
        # BUILD on a plain container runs no user code; on an object it runs its type's __setstate__
        if isinstance(target, _Made | _Global):
            self.call("BUILD", target)

    def op_PERSID(self, _arg) -> None:
        self.stack.append(_UNKNOWN)

    def op_BINPERSID(self, _arg) -> None:
        self.pop()
        self.stack.append(_UNKNOWN)


# ---------------------------------------------------------------------------------------------
# containers: zip, legacy/plain pickle streams, safetensors

def _scan_one(report: ScanReport, raw: BinaryIO, limit: int, record: str, allow) -> tuple[object, int] | None:
    """Walk one pickle from ``raw``: (the constant it evaluates to, bytes left after it).

    A parse error becomes InvalidCheckpointError, unless the part already walked imports an
    offender: then the verdict is what matters, the error is a note, and None stops the scan."""
    walker = _Walker(report, record, *allow)
    stream = _CappedReader(raw, limit)
    try:
        value = walker.walk(stream)
    except (ValueError, EOFError, OverflowError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
        walker.flush_calls()
        report.pickles.append(record)
        message = f"pickle '{record}' is malformed near byte {stream.tell()}: {foreign_message(exc)}"
        if report.offenders:
            report.notes.append(message)
            return None
        raise InvalidCheckpointError(message, path=report.source, fix=BAD_FILE) from None
    walker.flush_calls()
    report.pickles.append(record)
    unsupported = sorted(walker.opcodes - _WEIGHTS_ONLY_OPCODES)
    if unsupported:
        report.notes.append(f"pickle '{record}' uses opcodes the weights-only loader rejects: {', '.join(unsupported)}")
    for anomaly in walker.anomalies:
        report.notes.append(f"pickle '{record}': {anomaly} (a loader would fail here)")
    return value, stream.left


def _refuse_bombs(infos: list[zipfile.ZipInfo], source: str) -> None:
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > BOMB_FLOOR and \
                info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise InvalidCheckpointError(
                f"record '{info.filename}' inflates {info.compress_size} bytes to {info.file_size} (a zip bomb?)",
                path=source, fix=BAD_FILE)


def check_zip_records(fileobj_or_path: str | os.PathLike | BinaryIO, source: str) -> None:
    """Refuse a zip that a loader and a scanner could read differently, before anything reads it.

    torch stores every record plainly; an archive whose records inflate absurdly (a bomb), are
    flagged encrypted or patched, or whose pickle records' local headers disagree with the central
    directory (name, method, sizes) or fail their CRC is refused in one line: the bytes a scanner
    checks must be the bytes a loader runs. A directory too damaged to list is left to the reader.
    """
    try:
        with zipfile.ZipFile(fileobj_or_path) as archive:
            infos = archive.infolist()
            _refuse_bombs(infos, source)
            for info in infos:
                _check_flags(info, source)
            checked = not written_without_crcs(infos)
            for info in infos:
                if info.filename.endswith(".pkl"):
                    _check_local_header(archive.fp, info, source, checked)
    except CkptError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return
    finally:
        if hasattr(fileobj_or_path, "seek"):
            fileobj_or_path.seek(0)


def _check_flags(info: zipfile.ZipInfo, source: str) -> None:
    for bit, what in SUSPICIOUS_FLAG_BITS.items():
        if info.flag_bits & (1 << bit):
            raise InvalidCheckpointError(
                f"record '{info.filename}' is flagged {what} (zip flag bit {bit}), which torch's reader ignores "
                "and a scanner cannot read the same way", path=source, fix=BAD_FILE)


def _check_local_header(handle: BinaryIO, info: zipfile.ZipInfo, source: str, crc_checked: bool) -> None:
    """The local header of a pickle record says what the central directory says, and its bytes
    have the CRC the directory promises (``crc_checked``: unless the archive recorded none)."""
    handle.seek(info.header_offset)
    (signature, _version, flags, method, _time, _date, crc, compressed, size, name_len,
     extra_len) = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
    name = handle.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", "replace")
    described = flags & 0x8  # sizes and CRC follow the data instead
    flags_differ = any((flags ^ info.flag_bits) & (1 << bit) for bit in (3, *SUSPICIOUS_FLAG_BITS))
    if signature != b"PK\x03\x04" or name != info.filename or method != info.compress_type or flags_differ or (
            not described and (compressed, size, crc) != (info.compress_size, info.file_size, info.CRC)):
        raise InvalidCheckpointError(
            f"record '{info.filename}': its local header disagrees with the zip's central directory",
            path=source, fix=BAD_FILE)
    if info.compress_type != zipfile.ZIP_STORED:
        return  # inflating checks the CRC itself
    handle.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    if crc_checked and zlib.crc32(handle.read(info.file_size)) != info.CRC:
        raise InvalidCheckpointError(f"record '{info.filename}' fails its CRC check", path=source, fix=BAD_FILE)


def _scan_zip(report: ScanReport, fileobj: BinaryIO, allow) -> None:
    try:
        archive = zipfile.ZipFile(fileobj)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InvalidCheckpointError(f"unreadable zip archive ({foreign_message(exc)})", path=report.source, fix=BAD_FILE) from None
    records = [i for i in infos if i.filename.endswith(".pkl")]
    if not records:
        raise InvalidCheckpointError("zip archive without a .pkl record (not a torch checkpoint)",
                                     path=report.source, fix=BAD_FILE)
    fileobj.seek(0)
    check_zip_records(fileobj, report.source)
    for info in records:
        try:
            with open_member(archive, info) as member:
                _scan_one(report, member, info.file_size, info.filename, allow)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
            raise InvalidCheckpointError(f"record '{info.filename}' is unreadable ({foreign_message(exc)})",
                                         path=report.source, fix=BAD_FILE) from None


def _scan_stream(report: ScanReport, fileobj: BinaryIO, size: int, allow) -> None:
    """Pickles in a row: a legacy torch file (magic number first) or a plain pickle file."""
    first = _scan_one(report, fileobj, size, "pickle 0", allow)
    if first is None:
        return
    value, left = first
    if value == LEGACY_MAGIC:
        report.format = "torch-legacy"
        report.pickles[-1] = LEGACY_PICKLES[0]
        for name in LEGACY_PICKLES[1:]:
            if left <= 0:
                raise InvalidCheckpointError(f"legacy torch file ends before its '{name}' pickle (truncated?)",
                                             path=report.source, fix=BAD_FILE)
            step = _scan_one(report, fileobj, left, name, allow)
            if step is None:
                return
            left = step[1]
        return
    index = 1
    # loaders read one pickle; a second one behind it is scanned too, since a caller may read on
    while left > 0 and fileobj.read(1).decode("latin-1") in pickletools.code2op:
        fileobj.seek(fileobj.tell() - 1)
        try:
            step = _scan_one(report, fileobj, left, f"pickle {index}", allow)
        except InvalidCheckpointError:
            report.notes.append(f"{left} trailing bytes after the pickle are not a pickle (loaders ignore them)")
            return
        if step is None:
            return
        left, index = step[1], index + 1



def scan_file(fileobj: BinaryIO, source: str, size: int | None = None, kind: str | None = None,
              also_allowed: frozenset[str] = frozenset()) -> ScanReport:
    """Walk every pickle of one file (a torch zip, a legacy torch file or a plain pickle stream).
    ``also_allowed``: ``module.name`` globals allowed beside the weights-only allow-list (the data
    classes of a DCP ``.metadata``)."""
    if size is None:
        size = fileobj.seek(0, io.SEEK_END)
    if kind is None:
        fileobj.seek(0)
        kind = detect(fileobj.read(HEAD_BYTES))
    fileobj.seek(0)
    report = ScanReport(source, "torch-zip" if kind == "zip" else "pickle")
    allowed, blocked = allow_list()
    allow = (allowed | also_allowed, blocked)
    if kind == "zip":
        _scan_zip(report, fileobj, allow)
    elif kind in ("pickle", "torch-legacy"):
        _scan_stream(report, fileobj, size, allow)
    else:
        raise InvalidCheckpointError("not a pickle or a torch zip archive", path=source, fix=BAD_FILE)
    return report


def merge_reports(source: str, parts: list[tuple[str, ScanReport]], *, always: bool = False) -> ScanReport:
    """One report for several files (the shards of an index, a folder), each entry named by its file;
    a single part is returned as it is unless ``always``."""
    if len(parts) == 1 and not always:
        parts[0][1].source = source
        return parts[0][1]
    merged = ScanReport(source, "folder" if always else "sharded-" + parts[0][1].format)
    for name, part in parts:
        merged.pickles += [f"{name}:{record}" for record in part.pickles]
        for entry in part.globals:
            if (entry["module"], entry["name"]) not in merged._seen:
                merged._seen.add((entry["module"], entry["name"]))
                merged.globals.append({**entry, "pickle": f"{name}:{entry['pickle']}"})
        merged.calls += [{**call, "pickle": f"{name}:{call['pickle']}"} for call in part.calls]
        merged.notes += [f"{name}: {note}" for note in part.notes]
    return merged


def unsafe_globals(fileobj_or_path: str | os.PathLike | BinaryIO) -> list[str]:
    """``module.name`` of every import or call the weights-only loader would refuse, in one file."""
    if hasattr(fileobj_or_path, "read"):
        return scan_file(fileobj_or_path, str(getattr(fileobj_or_path, "name", "<file object>"))).offenders
    with open(fileobj_or_path, "rb") as handle:
        return scan_file(handle, str(fileobj_or_path)).offenders


# ---------------------------------------------------------------------------------------------
# NumPy files: a numeric array holds no code; an object array is a pickle

NUMPY_MAGIC = b"\x93NUMPY"


def numpy_header(fileobj: BinaryIO, source: str) -> tuple[dict, int]:
    """The header dict of a ``.npy`` stream (read as a literal, never evaluated) and where the data starts."""
    magic = fileobj.read(8)
    if magic[:6] != NUMPY_MAGIC or len(magic) < 8:
        raise InvalidCheckpointError("not a NumPy .npy file", path=source, fix=BAD_FILE)
    width = 2 if magic[6] == 1 else 4
    raw = fileobj.read(width)
    if len(raw) < width:
        raise InvalidCheckpointError("a NumPy header cut short", path=source, fix=BAD_FILE)
    (length,) = struct.unpack("<H" if width == 2 else "<I", raw)
    if length > MAX_LINE:
        raise InvalidCheckpointError(f"a NumPy header of {length} bytes (absurd)", path=source, fix=BAD_FILE)
    text = fileobj.read(length)
    try:
        header = ast.literal_eval(text.decode("latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise InvalidCheckpointError(f"the NumPy header is not a literal dict ({type(exc).__name__})", path=source,
                                     fix=BAD_FILE) from None
    if not isinstance(header, dict) or "descr" not in header:
        raise InvalidCheckpointError("the NumPy header has no 'descr'", path=source, fix=BAD_FILE)
    return header, 8 + width + length


def _holds_objects(descr) -> bool:
    """Whether a NumPy dtype description has an object field anywhere (``'|O'``, or in a record)."""
    if isinstance(descr, str):
        return "O" in descr
    if isinstance(descr, list | tuple):
        return any(_holds_objects(part) for part in descr)
    return True  # anything else is not a dtype NumPy writes: treat it as able to hold objects


def scan_numpy(report: ScanReport, fileobj: BinaryIO, size: int, record: str) -> None:
    """One ``.npy`` stream: a numeric array is noted safe; an object array's pickle is walked."""
    header, data_start = numpy_header(fileobj, report.source)  # the stream is now at the data
    if not _holds_objects(header["descr"]):
        report.notes.append(f"{record}: NumPy array of {header['descr']} {tuple(header.get('shape', ()))}, "
                            "no pickle: loading it runs no code")
        return
    _scan_one(report, fileobj, size - data_start, record, allow_list())


def scan_npz(report: ScanReport, fileobj: BinaryIO) -> None:
    """A ``.npz`` archive: every ``.npy`` member, read in order (an object member's pickle is walked)."""
    check_zip_records(fileobj, report.source)
    try:
        with zipfile.ZipFile(fileobj) as archive:
            for info in archive.infolist():
                with open_member(archive, info) as member:
                    scan_numpy(report, member, info.file_size, info.filename)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
        raise InvalidCheckpointError(f"unreadable .npz archive ({foreign_message(exc)})", path=report.source, fix=BAD_FILE) from None


def is_npz(fileobj: BinaryIO) -> bool:
    """A zip whose members are all ``.npy`` arrays (what numpy.savez writes), not a torch archive."""
    try:
        with zipfile.ZipFile(fileobj) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    finally:
        fileobj.seek(0)
    return bool(names) and all(name.endswith(".npy") for name in names)

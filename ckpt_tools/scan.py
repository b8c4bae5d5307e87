"""``scan_pickle(source) -> ScanReport``: what a checkpoint's pickles would import and call.

The SOURCE is resolved like every other (``sources.resolve``: a file, a folder, a sharded index,
an ``hf://`` file read by ranges, or a file object); each pickle file it stands for is walked by
``pickle_safety`` without running anything, and the reports are merged. A safetensors file holds
no pickle: its header is still validated, so a broken file exits 2 like everywhere else.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .formats import empty_file_error
from .formats.dcp import METADATA_GLOBALS, pickled_chunks, read_metadata
from .formats.ranges import FileWindow
from .formats.safetensors import SafetensorsCheckpoint
from .http import RangeFile
from .magic import may_be_old_pickle
from .pickle_safety import (
    BAD_FILE,
    ScanReport,
    is_npz,
    merge_reports,
    scan_file,
    scan_npz,
    scan_numpy,
    unsafe_globals,
)
from .sources import DCP_METADATA, Source, resolve

REMOTE_BUFFER = 64 * 1024

__all__ = ["ScanReport", "scan_pickle", "unsafe_globals"]


SCANNABLE = frozenset({"zip", "pickle", "torch-legacy", "numpy", "safetensors"})


def scan_pickle(source: str | os.PathLike | BinaryIO) -> ScanReport:
    """Scan a local file, folder or sharded index, an ``hf://`` file or a seekable file object.

    A folder is scanned whole (a DCP folder through its ``.metadata``): every file in it that can hold a pickle (a training folder keeps
    ``training_args.bin`` or ``rng_state.pth`` beside its weights), and the report lists the files
    that cannot. Never executes the pickle. Raises CheckpointNotFoundError or
    InvalidCheckpointError when there is nothing scannable; otherwise returns a report whose
    ``verdict`` is ``safe`` or ``unsafe``.
    """
    if isinstance(source, str | os.PathLike) and Path(source).is_dir() \
            and not (Path(source) / DCP_METADATA).is_file():  # a DCP folder is read through its .metadata
        return _scan_folder(Path(source))
    resolved = resolve(source)
    try:
        if resolved.format == "index":
            parts = [(name, _scan_one(resolved.shard(name))) for name in resolved.shards()]
            return merge_reports(resolved.given, parts)
        if resolved.format == "dcp":
            return _scan_dcp(resolved)
        return _scan_one(resolved)
    finally:
        if resolved.fileobj is not source:
            resolved.close()


def _scan_folder(folder: Path) -> ScanReport:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    parts, skipped = [], []
    for path in files:
        name = path.relative_to(folder).as_posix()
        resolved = resolve(path)
        if resolved.format in SCANNABLE or _old_pickle(resolved):
            parts.append((name, _scan_one(resolved)))
        else:
            skipped.append(name)
    if not parts:
        raise InvalidCheckpointError("the folder holds no file that can hold a pickle (torch, NumPy, pickle or "
                                     "safetensors)", path=str(folder), fix="pass the file to scan")
    report = merge_reports(str(folder), parts, always=True)
    if skipped:
        report.notes.append(f"not scanned (no pickle, NumPy or safetensors format): {', '.join(skipped[:20])}"
                            + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""))
    return report


def _old_pickle(resolved: Source) -> bool:
    """A protocol 0/1 pickle (no header): walked to its STOP without a stumble."""
    if resolved.format != "unknown" or resolved.path is None or not may_be_old_pickle(resolved.head):
        return False
    try:
        with open(resolved.path, "rb") as handle:
            report = scan_file(handle, resolved.given, resolved.size, "pickle")
    except InvalidCheckpointError:
        return False
    # a text file walks as garbage: it stumbles (a malformed opcode, an empty stack) before any STOP
    return not any("a loader would fail here" in note or "is malformed" in note for note in report.notes)


def _scan_one(resolved: Source) -> ScanReport:
    if resolved.format == "safetensors":
        return _scan_safetensors(resolved)
    if resolved.format == "numpy" or (resolved.format == "zip" and resolved.path is not None and _npz(resolved.path)):
        return _scan_numpy(resolved)
    if resolved.format == "unknown" and _old_pickle(resolved):
        resolved.format = "pickle"
    if resolved.size == 0:
        raise empty_file_error(resolved.given)
    if resolved.format not in ("zip", "pickle", "torch-legacy"):
        raise InvalidCheckpointError("not a pickle, a torch zip archive, a NumPy file or a safetensors file",
                                     path=resolved.given, fix=BAD_FILE)
    if isinstance(resolved.fileobj, RangeFile):  # the walker reads byte by byte: buffer the ranges
        return scan_file(io.BufferedReader(resolved.fileobj, REMOTE_BUFFER), resolved.given, resolved.size,
                         resolved.format)
    if resolved.fileobj is not None:
        return scan_file(resolved.fileobj, resolved.given, resolved.size, resolved.format)
    try:
        with open(resolved.path, "rb") as handle:
            report = scan_file(handle, resolved.given, resolved.size, resolved.format)
    finally:
        resolved.close()
    return report


def _npz(path) -> bool:
    with open(path, "rb") as handle:
        return is_npz(handle)


def _scan_numpy(resolved: Source) -> ScanReport:
    """``.npy``: a numeric array holds no code, an object array a pickle (walked); ``.npz``: each member."""
    report = ScanReport(resolved.given, resolved.format if resolved.format == "numpy" else "npz")
    with open(resolved.path, "rb") as handle:
        if resolved.format == "numpy":
            scan_numpy(report, handle, resolved.size, resolved.name)
        else:
            scan_npz(report, handle)
    return report


def _scan_dcp(resolved: Source) -> ScanReport:
    """A torch.distributed.checkpoint folder: its ``.metadata`` (the data classes torch writes there
    are allowed), then every byte range of the ``.distcp`` files that is a ``torch.save`` zip."""
    with open(resolved.path, "rb") as handle:
        first = scan_file(handle, resolved.given, resolved.size, also_allowed=METADATA_GLOBALS)
    # torch reads a .metadata with pickle.load, not the weights-only loader: its opcodes are no concern
    first.notes = [n for n in first.notes if "opcodes the weights-only loader rejects" not in n]
    parts = [(resolved.path.name, first)]
    if first.offenders:
        first.notes.append("the .distcp files were not scanned: the .metadata that says where their pickles lie "
                           "is itself unsafe")
    else:
        metadata = read_metadata(resolved.path, resolved.given, inert=True)  # nothing it names runs
        for name, ranges in pickled_chunks(metadata).items():
            parts += _scan_ranges(resolved, name, ranges)
    report = merge_reports(resolved.given, parts) if len(parts) > 1 else first
    report.format = "dcp"
    report.notes.append("the .metadata's own globals (torch.distributed.checkpoint's metadata data classes, "
                        "pathlib paths) are allowed there: torch writes them, and they hold data only")
    report.notes.append("torch's dcp.load unpickles the objects of a DCP folder (optimizer settings, "
                        "dataloader state) without the weights-only restriction: every pickle in the .distcp files was walked")
    return report


def _scan_ranges(resolved: Source, name: str, ranges: list[tuple[str, int, int]]) -> list[tuple[str, ScanReport]]:
    path = resolved.path.parent / name
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"the .metadata names {name}, which is missing", path=resolved.given,
                                      fix=f"copy {name} into the folder with the rest of the checkpoint") from None
    with handle:
        size = handle.seek(0, io.SEEK_END)
        parts = []
        for fqn, offset, length in ranges:
            if offset + length > size:
                raise InvalidCheckpointError(f"truncated: {name} is {size:,} bytes but this entry's bytes end at "
                                             f"{offset + length:,}", path=resolved.given, key=fqn, fix=BAD_FILE)
            window = io.BufferedReader(FileWindow(handle.fileno(), offset, length))
            parts.append((f"{name}:{fqn}", scan_file(window, f"{resolved.given}/{name}", length, "zip")))
    return parts


def _scan_safetensors(resolved: Source) -> ScanReport:
    """safetensors holds no code; the header is still validated so broken files exit 2."""
    handle = resolved.fileobj or open(resolved.path, "rb")
    try:
        SafetensorsCheckpoint(resolved.given, handle, resolved.size)
    finally:
        if handle is not resolved.fileobj:
            handle.close()
    report = ScanReport(resolved.given, "safetensors")
    report.notes.append("safetensors holds no pickle: loading it runs no code")
    return report

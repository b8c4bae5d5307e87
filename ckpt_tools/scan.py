"""``scan_pickle(source) -> ScanReport``: what a checkpoint's pickles would import and call.

The SOURCE is resolved like every other (``sources.resolve``: a file, a folder, a sharded index,
an ``hf://`` file read by ranges, or a file object); each pickle file it stands for is walked by
``pickle_safety`` without running anything, and the reports are merged. A safetensors file holds
no pickle: its header is still validated, so a broken file exits 2 like everywhere else.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from .errors import CheckpointNotFoundError, InvalidCheckpointError
from .formats.dcp import METADATA_GLOBALS, pickled_chunks, read_metadata
from .formats.ranges import FileWindow
from .formats.safetensors import SafetensorsCheckpoint
from .http import RangeFile
from .pickle_safety import BAD_FILE, ScanReport, merge_reports, scan_file, unsafe_globals
from .sources import Source, resolve

REMOTE_BUFFER = 64 * 1024

__all__ = ["ScanReport", "scan_pickle", "unsafe_globals"]


def scan_pickle(source: str | os.PathLike | BinaryIO) -> ScanReport:
    """Scan a local file, folder or sharded index, an ``hf://`` file or a seekable file object.

    Never executes the pickle. Raises CheckpointNotFoundError or InvalidCheckpointError when there
    is nothing scannable; otherwise returns a report whose ``verdict`` is ``safe`` or ``unsafe``.
    """
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


def _scan_one(resolved: Source) -> ScanReport:
    if resolved.format == "safetensors":
        return _scan_safetensors(resolved)
    if resolved.format not in ("zip", "pickle", "torch-legacy"):
        raise InvalidCheckpointError("not a pickle, a torch zip archive or a safetensors file",
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
                        "dataloader state) with weights_only=False: every pickle in the .distcp files was walked")
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

"""The registry of checkpoint readers, and ``open_checkpoint``: resolve the SOURCE, then look up
its format here.

``sources.resolve`` decides what a SOURCE is (a file and its format from its magic, an index, a
remote file at a commit); this module only maps a format to the reader that opens it, from a local
path or, where the format can be read lazily from a seekable stream (a remote file read by
ranges), from a file object. A sharded index gets the same ``open_source`` as its way to open each
shard, so the sharded reader never imports this package back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import Checkpoint
from ..errors import InvalidCheckpointError, UnsupportedFormatError, UsageError
from ..http import RetryPolicy
from ..pickle_safety import is_npz
from ..render import plural
from ..sources import Source, resolve
from . import dcp
from . import safetensors as st
from . import torch_pickle as tp
from .sharded import ShardedCheckpoint


@dataclass(frozen=True)
class Format:
    open_path: Callable[..., Checkpoint]  # (path, source, **options)
    open_fileobj: Callable[..., Checkpoint] | None = None  # (fileobj, source, size, **options)
    options: tuple[str, ...] = ()  # the reader options it takes


# magic.detect's name -> its reader
FORMATS: dict[str, Format] = {
    "safetensors": Format(st.open_path, st.open_fileobj),
    "zip": Format(tp.open_zip_path, tp.open_zip_fileobj, tp.OPTIONS),
    "torch-legacy": Format(tp.open_legacy_path, None, tp.OPTIONS),
    "dcp": Format(dcp.open_path, None, dcp.OPTIONS),  # sources.resolve names a DCP folder's format
}
# What ``select`` and ``inert`` mean; a file that holds no pickle has nothing to select inside and
# nothing to run, so ``inert`` is harmless there and ``select`` an error.
READER_OPTIONS: dict[str, str] = {
    "select": "a dotted path to the state dict inside a torch pickle or DCP folder (e.g. model_ema)",
    "inert": "read a pickle that names code-running globals, without running it",
}


def open_checkpoint(source: str | Path | BinaryIO | Source, *, select: str | None = None, inert: bool = False,
                    revision: str | None = None, endpoint: str | None = None, token: str | bool | None = None,
                    retry: RetryPolicy | None = None, block_size: int | None = None) -> Checkpoint:
    """Open a local file, folder, index or ``hf://ORG/NAME[@REV]/PATH`` reference lazily.

    ``select``: the dotted path of the state dict to take inside a torch pickle (by default it is
    chosen by content); ``inert``: read a pickle that names code-running globals without running
    it (by default such a file is refused). ``revision``, ``endpoint``, ``token``, ``retry`` and
    ``block_size`` apply to hub sources; a remote checkpoint's ``commit`` is the commit it was read
    at and ``bytes_read`` what was fetched.
    """
    resolved = source if isinstance(source, Source) else resolve(
        source, revision=revision, endpoint=endpoint, token=token, retry=retry, block_size=block_size)
    options = {k: v for k, v in (("select", select), ("inert", inert)) if v}
    return open_source(resolved, **options)


def open_source(resolved: Source, **options) -> Checkpoint:
    """The reader for a resolved SOURCE; ``options`` are reader options (``READER_OPTIONS``)."""
    if resolved.format == "index":
        _reader_options((), options, resolved.given)
        checkpoint = ShardedCheckpoint(resolved.given, resolved.index,
                                       lambda name: open_source(resolved.shard(name), **options))
    else:
        checkpoint = _open_file(resolved, options)
    checkpoint.notes[:0] = resolved.notes
    checkpoint.files = resolved.local_files()
    checkpoint.picked, checkpoint.other_files = resolved.picked, list(resolved.others)
    if resolved.ref is not None:
        _remote_bookkeeping(checkpoint, resolved)
    return checkpoint


def _open_file(resolved: Source, options: dict) -> Checkpoint:
    if resolved.format == "zip" and resolved.path is not None and _npz(resolved.path):
        raise UnsupportedFormatError("a NumPy .npz archive, not a checkpoint", path=resolved.given,
                                     fix="load it with numpy.load and save the tensors with safetensors "
                                         "(`ckpt scan` tells whether it holds pickled objects)")
    reader = FORMATS.get(resolved.format)
    if reader is None:
        if resolved.format == "unknown" and resolved.path is not None and resolved.path.suffix == ".safetensors" \
                and 0 < resolved.size < 9:
            return st.open_path(resolved.path, resolved.given)  # the parser says exactly how it is truncated
        resolved.close()
        raise _unrecognised(resolved)
    options = _reader_options(reader.options, options, resolved.given)
    if resolved.path is not None:
        return reader.open_path(resolved.path, resolved.given, **options)
    if reader.open_fileobj is None:
        resolved.close()
        raise UnsupportedFormatError(f"{resolved.format} files cannot be read remotely", path=resolved.given,
                                     fix="download the file first (ckpt download)")
    return reader.open_fileobj(resolved.fileobj, resolved.given, resolved.size, **options)


def _reader_options(accepted: tuple[str, ...], options: dict, source: str) -> dict:
    """The options a reader takes; ``select`` on a file without a pickle is an error."""
    if "select" in options and "select" not in accepted:
        raise UsageError("--select picks a state dict inside a torch pickle; this checkpoint holds no pickle",
                         path=source, fix="drop --select (a safetensors file or index is one state dict)")
    return {k: v for k, v in options.items() if k in accepted}


def _npz(path: Path) -> bool:
    with open(path, "rb") as handle:
        return is_npz(handle)


def _remote_bookkeeping(checkpoint: Checkpoint, resolved: Source) -> None:
    checkpoint.commit = resolved.commit
    if resolved.fileobj is not None:
        fetched, total, requests = resolved.bytes_fetched(), resolved.fileobj.size, resolved.fileobj.requests
        checkpoint.bytes_read = fetched
        checkpoint.notes.append(f"read remotely at commit {resolved.commit}: {fetched} of {total} bytes "
                                f"fetched in {plural(requests, 'range request')}")
    else:  # an index: what its shards fetched
        checkpoint.bytes_read = sum(part.bytes_read or 0 for part in checkpoint.shards.values())


def empty_file_error(where: str) -> InvalidCheckpointError:
    """What every command says of a file of zero bytes."""
    return InvalidCheckpointError("the file is empty", path=where,
                                  fix="the download or save was interrupted: fetch or save it again")


def _unrecognised(resolved: Source) -> Exception:
    head, where = resolved.head, resolved.given
    if not resolved.size:
        return empty_file_error(where)
    if resolved.format == "pickle":
        return UnsupportedFormatError("a plain pickle, not a torch checkpoint", path=where,
                                      fix="run `ckpt scan` on it; re-save the tensors with torch.save or safetensors")
    if resolved.format == "numpy":
        return UnsupportedFormatError("a NumPy array file, not a checkpoint", path=where,
                                      fix="load it with numpy.load and save the tensors with safetensors")
    if head[:2] == b"PK":
        return InvalidCheckpointError("a truncated or corrupt zip archive", path=where,
                                      fix="the file is damaged: download or save it again")
    return UnsupportedFormatError("not a checkpoint this tool recognises (safetensors, torch zip or legacy pickle, "
                                  "or a *.index.json)", path=where, fix="check the path")

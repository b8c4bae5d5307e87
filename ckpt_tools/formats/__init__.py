"""The registry of checkpoint formats.

Each format says how to recognise it from the first bytes of a file and how to open a path and,
where it can be read lazily from a seekable stream (remote reading), a file object. Files are
recognised by content, not by name: a ``.bin`` may be a zip pickle, a legacy pickle or safetensors.
Folders are resolved to their index or single checkpoint file by ``FOLDER_CANDIDATES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointNotFoundError, InvalidCheckpointError, UnsupportedFormatError, UsageError
from ..reader import Checkpoint
from . import safetensors as st
from . import sharded
from . import torch_pickle as tp

SNIFF_BYTES = 32


@dataclass(frozen=True)
class Format:
    name: str
    sniff: Callable[[bytes], bool]
    open_path: Callable[..., Checkpoint]  # (path, source, **options)
    open_fileobj: Callable[..., Checkpoint] | None = None  # (fileobj, source, size, **options)
    options: tuple[str, ...] = ()  # reader options it takes; the others must be left unset


FORMATS: list[Format] = [
    Format("safetensors", st.sniff, st.open_path, st.open_fileobj),
    Format("torch-zip", tp.sniff_zip, tp.open_zip_path, tp.open_zip_fileobj, tp.OPTIONS),
    Format("torch-legacy", tp.sniff_legacy, tp.open_legacy_path, None, tp.OPTIONS),
]
# Every reader option: ``select`` picks a state dict inside a pickle; ``inert`` lets a pickle that
# names code-running globals be read (never run). Files that hold no pickle have nothing to run.
OPTIONS: dict[str, str] = {"select": "a dotted path to the state dict inside a torch pickle",
                           "inert": "read a pickle that names code-running globals, without running it"}
_HARMLESS_ELSEWHERE = ("inert",)

# Looked for, in order, when SOURCE is a folder: an index first, then a lone checkpoint file.
FOLDER_CANDIDATES: tuple[str, ...] = (
    "model.safetensors.index.json", "*.safetensors.index.json", "pytorch_model.bin.index.json", "*.bin.index.json",
    "model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt",
)


def _sniff_fail(path: Path, head: bytes) -> Exception:
    if not head:
        return InvalidCheckpointError("the file is empty", path=str(path),
                                      fix="the download or save was interrupted: fetch or save it again")
    if head[:1] == b"\x80":
        return UnsupportedFormatError("a plain pickle, not a torch checkpoint", path=str(path),
                                      fix="run `ckpt scan` on it; re-save the tensors with torch.save or safetensors")
    if head[:4] == b"PK\x05\x06" or head[:2] == b"PK":
        return InvalidCheckpointError("a truncated or corrupt zip archive", path=str(path),
                                      fix="the file is damaged: download or save it again")
    return UnsupportedFormatError("not a checkpoint this tool recognises (safetensors, torch zip or legacy pickle, "
                                  "or a *.index.json)", path=str(path), fix="check the path")


def _options_for(fmt_name: str, accepted: tuple[str, ...], options: dict, source: str) -> dict:
    """The options a format takes; an unknown option, or one this format cannot honour, is a UsageError."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)}", path=source, fix=f"known: {', '.join(OPTIONS)}")
    given = {k: v for k, v in options.items() if v not in (None, False)}
    refused = sorted(k for k in given if k not in accepted and k not in _HARMLESS_ELSEWHERE)
    if refused:
        raise UsageError(f"a {fmt_name} checkpoint takes no {', '.join(refused)} option (it holds one flat state dict)",
                         path=source, fix=f"drop {', '.join(refused)}; it applies to torch pickles (.pt, .bin, .ckpt)")
    return {k: v for k, v in given.items() if k in accepted}


def open_local(path: Path, **options) -> Checkpoint:
    if path.is_dir():
        return open_local(_pick_from_folder(path), **options)
    if sharded.sniff(path):
        _options_for("sharded", (), options, str(path))
        return sharded.open_index_path(path, str(path))
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read ({exc.strerror})", path=str(path),
                                      fix="check the path and its permissions") from None
    for fmt in FORMATS:
        if fmt.sniff(head):
            return fmt.open_path(path, str(path), **_options_for(fmt.name, fmt.options, options, str(path)))
    _options_for("unrecognised", tuple(OPTIONS), options, str(path))  # only unknown names fail here
    if 0 < len(head) < 9 and path.suffix == ".safetensors":
        return st.open_path(path, str(path))  # lets the parser say exactly how it is truncated
    raise _sniff_fail(path, head)


def _pick_from_folder(folder: Path) -> Path:
    for pattern in FOLDER_CANDIDATES:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:5])
            raise UnsupportedFormatError(f"the folder holds several checkpoints ({names}) and no index",
                                         path=str(folder), fix="pass one file, or add a *.index.json")
    raise CheckpointNotFoundError("the folder holds no checkpoint (no *.index.json, .safetensors, .bin or .pt)",
                                  path=str(folder), fix="pass a checkpoint file, or the folder that holds one")


def open_fileobj(fileobj: BinaryIO, name: str, source: str, **options) -> Checkpoint:
    """Open a seekable binary stream (e.g. a remote file read by ranges), sniffing its format."""
    size = fileobj.seek(0, 2)
    fileobj.seek(0)
    head = fileobj.read(SNIFF_BYTES)
    fileobj.seek(0)
    for fmt in FORMATS:
        if fmt.sniff(head):
            if fmt.open_fileobj is None:
                raise UnsupportedFormatError(f"{fmt.name} files cannot be read remotely", path=source,
                                             fix="download the file first (ckpt download)")
            return fmt.open_fileobj(fileobj, source, size, **_options_for(fmt.name, fmt.options, options, source))
    raise _sniff_fail(Path(name), head)


def open_remote_reference(ref: str, **options) -> Checkpoint:
    from .remote import open_remote

    return open_remote(ref, **options)

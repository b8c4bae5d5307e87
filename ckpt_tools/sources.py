"""SOURCE -> what it names, resolved once: local files, or remote files pinned to one commit.

Every command and library call that takes a SOURCE resolves it here, and only here:

- a file: its format is detected from its first bytes (``magic.detect``);
- a sharded index (``*.index.json``): parsed, every shard name validated (no ``..``, no absolute
  path, every local shard present) before anything is opened;
- a folder: its index, else its one checkpoint file, picked by ``FOLDER_CANDIDATES``; the choice
  and the other candidates are said in ``notes``;
- a torch.distributed.checkpoint (DCP) folder, or the path of its ``.metadata`` file: format
  ``dcp``, ``path`` the ``.metadata`` file (the reader checks the ``.distcp`` files it names);
- ``hf://ORG/NAME[@REVISION]/PATH``, or ``ORG/NAME`` with a revision and a file name: the revision
  is resolved to a commit with one HEAD, and the file is read through a ``RangeFile`` at that
  commit (an index's shards too, at the same commit).

A ``Source`` is the result; readers (``formats/``) and the scanner open it without ever looking at
the string again.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote

from .errors import CheckpointNotFoundError, InvalidCheckpointError, UnsupportedFormatError, UsageError
from .http import RangeFile, RetryPolicy, endpoint_url, head_file, request_headers
from .magic import HEAD_BYTES, detect, is_index_name
from .render import plural

REFERENCE_RE = re.compile(r"^hf://(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")
REPO_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
# Looked for, in order, when SOURCE is a folder: an index first, then a lone checkpoint file.
FOLDER_CANDIDATES: tuple[str, ...] = (
    "model.safetensors.index.json", "*.safetensors.index.json", "pytorch_model.bin.index.json", "*.bin.index.json",
    "model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt",
)
_HUB_FIX = "check the path, or use hf://ORG/NAME[@REVISION]/PATH for the hub"
# A torch.distributed.checkpoint (DCP) folder: this pickled metadata file, and the chunk files it
# names (``__<rank>_<n>.distcp`` as torch's FileSystemWriter writes them).
DCP_METADATA = ".metadata"
DCP_DATA_SUFFIX = ".distcp"
DCP_DATA_GLOB = "*" + DCP_DATA_SUFFIX


# ---------------------------------------------------------------------------------------------
# hub references

@dataclass(frozen=True)
class HfReference:
    repo_id: str
    revision: str
    path: str

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf://{self.repo_id}{rev}/{self.path}"

    def sibling(self, name: str) -> HfReference:
        """Another file of the same folder at the same revision (an index's shard)."""
        folder = posixpath.dirname(self.path)
        return HfReference(self.repo_id, self.revision, posixpath.join(folder, name) if folder else name)


def parse_hf_reference(ref: str) -> HfReference:
    """``hf://ORG/NAME[@REV]/PATH`` -> HfReference (a revision holding '/' is written %2F-encoded)."""
    match = REFERENCE_RE.match(ref)
    if match is None:
        raise UsageError("not a hub reference", path=ref,
                         fix="write hf://ORG/NAME[@REVISION]/PATH, e.g. hf://openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt")
    revision = unquote(match["rev"]) if match["rev"] else "main"
    path = match["path"]
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise UsageError("the file path in a hub reference must not contain '..' or empty parts", path=ref)
    return HfReference(f"{match['org']}/{match['name']}", revision, path)


def hub_reference(source: str, *, revision: str | None = None, filename: str | None = None) -> HfReference | None:
    """The hub file a SOURCE string names, or None for a local path. ``revision`` overrides the
    default ``main`` (contradicting an ``@REV`` is an error); ``ORG/NAME`` (not a local path) needs
    ``filename``, e.g. the one a model preset names."""
    if source.startswith("hf://"):
        ref = parse_hf_reference(source)
        written = "@" in source.split("/", 4)[3]
        if revision and written and revision != ref.revision:
            raise UsageError(f"--revision {revision} contradicts the reference's @{ref.revision}", path=source,
                             fix="give the revision once")
        return HfReference(ref.repo_id, revision or ref.revision, ref.path)
    if Path(source).exists() or not REPO_ID_RE.match(source):
        return None
    if not filename:
        raise UsageError("a repo id needs the checkpoint's file name", path=source,
                         fix=f"write hf://{source}[@REVISION]/FILE, or give --model with a preset that names it")
    return HfReference(source, revision or "main", filename)


def open_remote_file(ref: HfReference, *, endpoint: str | None = None, token: str | bool | None = None,
                     retry: RetryPolicy | None = None, block_size: int | None = None) -> tuple[RangeFile, str]:
    """Resolve ``ref``'s revision to a commit (one HEAD) and return (RangeFile at that commit, commit)."""
    from huggingface_hub import hf_hub_url

    endpoint = endpoint_url(endpoint)
    policy = retry or RetryPolicy()
    meta = head_file(ref.repo_id, ref.path, ref.revision, endpoint=endpoint, token=token, policy=policy)
    if meta.size is None:
        raise UnsupportedFormatError("the server sent no Content-Length for the file", path=str(ref),
                                     fix="download it with `ckpt download` and inspect the local copy")
    url = hf_hub_url(ref.repo_id, ref.path, revision=meta.commit_hash, endpoint=endpoint)
    extra = {} if block_size is None else {"block_size": block_size}
    return RangeFile(url, meta.size, headers=request_headers(token), etag=meta.etag, retry=policy, **extra), \
        meta.commit_hash


# ---------------------------------------------------------------------------------------------
# sharded indexes

def parse_index(raw: bytes, source: str) -> dict:
    """The index JSON, checked to hold a ``weight_map`` object."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpointError(f"index is not valid JSON ({exc})", path=source,
                                     fix="regenerate the index") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise InvalidCheckpointError("index has no 'weight_map' object", path=source,
                                     fix="an index needs {\"weight_map\": {key: shard file}}")
    for shard in index["weight_map"].values():
        check_shard_name(shard, source)
    return index


def shard_names(index: dict) -> list[str]:
    return list(dict.fromkeys(index["weight_map"].values()))


def check_shard_name(shard: object, source: str, named_by: str = "weight_map") -> PurePosixPath:
    """A shard name (an index's, or a file a DCP ``.metadata`` names) as a relative path that stays
    inside the checkpoint's folder."""
    if not isinstance(shard, str) or not shard:
        raise InvalidCheckpointError(f"{named_by} names a shard {shard!r} that is not a file name", path=source,
                                     fix=f"each file {named_by} names must be a file name")
    pure = PurePosixPath(shard)
    if pure.is_absolute() or ".." in pure.parts or "\\" in shard:
        raise InvalidCheckpointError(f"shard name {shard!r} escapes the checkpoint folder", path=source,
                                     fix="shard names must be plain relative names inside the checkpoint's folder")
    return pure


# ---------------------------------------------------------------------------------------------
# the resolved source

@dataclass
class Source:
    """What a SOURCE names, resolved: one file (``format`` from its magic) or an index.

    given    the SOURCE as the user wrote it (what reports show)
    format   ``index``, ``dcp`` (a torch.distributed.checkpoint folder), or what ``magic.detect``
             says (``zip``, ``safetensors``, ``torch-legacy``, ``pickle``, ``numpy``), or ``unknown``
    path     the local file, if local (for ``dcp``, the folder's ``.metadata``)
    ref      the hub file at its commit, if remote (``commit`` is its revision)
    fileobj  an open binary file for a remote file or a caller's file object; local files are
             opened by the reader that needs them (mmap, safe_open)
    index    the parsed index, for ``format == "index"``
    notes    how it was resolved (the file picked from a folder and why, the others there)
    picked, others   for a folder: the file read, and the folder's other files
    """

    given: str
    format: str
    path: Path | None = None
    ref: HfReference | None = None
    commit: str | None = None
    fileobj: BinaryIO | None = None
    size: int | None = None
    head: bytes = b""
    index: dict | None = None
    notes: list[str] = field(default_factory=list)
    picked: str | None = None  # the file read from a folder the user named
    others: list[str] = field(default_factory=list)  # that folder's other files
    remote_options: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The file's own name (a folder's picked file, a reference's path)."""
        if self.path is not None:
            return self.path.name
        if self.ref is not None:
            return posixpath.basename(self.ref.path)
        return self.given

    def shards(self) -> list[str]:
        return shard_names(self.index) if self.index is not None else []

    def shard(self, name: str) -> Source:
        """One shard of an index, resolved the same way (at the same commit when remote)."""
        check_shard_name(name, self.given)
        if self.ref is not None:
            return resolve(str(self.ref.sibling(name)), **self.remote_options)
        path = self.path.parent / name
        if not path.is_file():
            raise CheckpointNotFoundError(f"index names shard '{name}', which is missing", path=self.given,
                                          fix=f"download or copy {name} next to the index")
        return resolve(path)

    def local_files(self) -> list[Path]:
        """Every local file this source reads (an index's shards with the index)."""
        if self.path is None:
            return []
        if self.format == "dcp":
            return [self.path, *sorted(self.path.parent.glob(DCP_DATA_GLOB))]
        if self.format != "index":
            return [self.path]
        return [self.path] + [self.path.parent / name for name in self.shards()]

    def bytes_fetched(self) -> int | None:
        return self.fileobj.bytes_fetched if isinstance(self.fileobj, RangeFile) else None

    def close(self) -> None:
        if self.fileobj is not None and self.ref is not None:
            self.fileobj.close()


def resolve(source: str | Path | HfReference | BinaryIO, *, revision: str | None = None, filename: str | None = None,
            endpoint: str | None = None, token: str | bool | None = None, retry: RetryPolicy | None = None,
            block_size: int | None = None) -> Source:
    """Resolve a SOURCE (path, folder, index, ``hf://`` reference, ``ORG/NAME`` with ``filename``,
    or a seekable binary file object). Raises CheckpointNotFoundError when nothing is there."""
    if hasattr(source, "read"):
        return _from_fileobj(str(getattr(source, "name", "<file object>")), source)
    text = str(source)
    ref = source if isinstance(source, HfReference) else hub_reference(text, revision=revision, filename=filename)
    if ref is not None:
        remote = {"endpoint": endpoint, "token": token, "retry": retry, "block_size": block_size}
        return _resolve_remote(text, ref, remote)
    path = Path(text)
    if not path.exists() and not path.is_symlink():
        raise CheckpointNotFoundError("no such file or folder", path=text, fix=_HUB_FIX)
    folder = path if path.is_dir() else None
    if folder is not None and (folder / DCP_METADATA).is_file():
        return _dcp_source(text, folder / DCP_METADATA, folder)
    if folder is None and path.name == DCP_METADATA:
        return _dcp_source(text, path, None)
    if folder is None and path.suffix == DCP_DATA_SUFFIX:
        raise UsageError("one rank's file of a torch.distributed.checkpoint folder: its tensors are blocks that "
                         "only the folder's .metadata places", path=text,
                         fix=f"pass the folder: {path.parent.as_posix()}/")
    if folder is not None and not (folder / DCP_METADATA).exists() and any(folder.glob(DCP_DATA_GLOB)):
        raise InvalidCheckpointError(f"a torch.distributed.checkpoint folder without its {DCP_METADATA}: the save "
                                     "did not finish (torch writes it last) or the file was not copied", path=text,
                                     fix=f"copy {DCP_METADATA} from where the checkpoint was saved, or save it again")
    if folder is not None:
        path = pick_from_folder(folder)
    if is_index_name(path.name):
        try:
            index = parse_index(path.read_bytes(), text)
        except OSError as exc:
            raise CheckpointNotFoundError(f"cannot read ({exc.strerror})", path=text,
                                          fix="check the path and its permissions") from None
        resolved = Source(text, "index", path=path, index=index,
                          **_folder_choice(folder, path, shard_names(index)))
        for name in resolved.shards():  # every shard present before any is opened
            if not (path.parent / name).is_file():
                raise CheckpointNotFoundError(f"index names shard '{name}', which is missing", path=text,
                                              fix=f"download or copy {name} next to the index")
        return resolved
    try:
        with path.open("rb") as handle:
            head = handle.read(HEAD_BYTES)
            size = handle.seek(0, io.SEEK_END)
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read ({exc.strerror})", path=text,
                                      fix="check the path, its symlinks and permissions") from None
    return Source(text, detect(head) or "unknown", path=path, size=size, head=head,
                  **_folder_choice(folder, path, []))


def _dcp_source(given: str, metadata: Path, folder: Path | None) -> Source:
    """A DCP folder: its ``.metadata`` is what the reader opens; the folder's other files are said."""
    try:
        size = metadata.stat().st_size
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot read ({exc.strerror})", path=given,
                                      fix="check the path and its permissions") from None
    parent = metadata.parent
    data = sorted(p.name for p in parent.glob(DCP_DATA_GLOB))
    others = sorted(p.name for p in parent.iterdir()
                    if p.name != DCP_METADATA and p.name not in data and not p.name.startswith("."))
    notes = [f"a torch.distributed.checkpoint folder{'' if folder else ' (named by its ' + DCP_METADATA + ')'}: "
             f"{DCP_METADATA} and {plural(len(data), '.distcp file')}"]
    if others:
        more = f" (+{len(others) - 20} more)" if len(others) > 20 else ""
        notes.append(f"the folder also holds: {', '.join(others[:20])}{more}")
    return Source(given, "dcp", path=metadata, size=size, notes=notes, picked=DCP_METADATA, others=others)


def _resolve_remote(given: str, ref: HfReference, remote: dict) -> Source:
    fileobj, commit = open_remote_file(ref, **remote)
    pinned = HfReference(ref.repo_id, commit, ref.path)
    options = {k: v for k, v in remote.items() if v is not None}
    if is_index_name(ref.path):
        try:
            index = parse_index(fileobj.readall(), given)
        finally:
            fileobj.close()
        return Source(given, "index", ref=pinned, commit=commit, index=index, remote_options=options)
    head = fileobj.read_at(0, HEAD_BYTES)
    return Source(given, detect(head) or "unknown", ref=pinned, commit=commit, fileobj=fileobj,
                  size=fileobj.size, head=head, remote_options=options)


def _from_fileobj(name: str, fileobj: BinaryIO) -> Source:
    size = fileobj.seek(0, io.SEEK_END)
    fileobj.seek(0)
    head = fileobj.read(HEAD_BYTES)
    fileobj.seek(0)
    return Source(name, detect(head) or "unknown", fileobj=fileobj, size=size, head=head)


def pick_from_folder(folder: Path) -> Path:
    """The checkpoint a folder stands for: its index, else its one checkpoint file."""
    for pattern in FOLDER_CANDIDATES:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:5])
            raise UnsupportedFormatError(f"the folder holds several checkpoints ({names}) and no index",
                                         path=str(folder), fix="pass one file, or add a *.index.json")
        if found:
            return found[0]
    raise CheckpointNotFoundError("the folder holds no checkpoint (no *.index.json, .safetensors, .bin or .pt)",
                                  path=str(folder), fix="pass a checkpoint file, or the folder that holds one")


def _folder_choice(folder: Path | None, chosen: Path, shards: list[str]) -> dict:
    """For a folder: which file was read and why (notes), and what else the folder holds."""
    if folder is None:
        return {}
    pattern = next(p for p in FOLDER_CANDIDATES if chosen.match(p))
    why = "its sharded index" if is_index_name(chosen.name) else f"its only {pattern} file"
    notes = [f"read {chosen.name} from the folder ({why}, looked for in the order "
             f"{', '.join(FOLDER_CANDIDATES[:2])}, ...)"]
    taken = {chosen.name, *shards}
    others = sorted(p.name for p in folder.iterdir() if p.name not in taken and not p.name.startswith("."))
    if others:
        more = f" (+{len(others) - 20} more)" if len(others) > 20 else ""
        notes.append(f"the folder also holds: {', '.join(others[:20])}{more}")
    return {"notes": notes, "picked": chosen.name, "others": others}

"""``convert_to_safetensors`` and ``remap_checkpoint``: rewrite a checkpoint, streaming and verified.

Conversion never builds a state dict. It plans from TensorMeta (remap, alias resolution, dtype
cast, shards), writes each safetensors file with ``safetensors_writer`` (header first, then one
tensor at a time from the reader's memory map), verifies every written tensor bit for bit against
its source while the output is still an unnamed temporary file, and only then moves it into place.

A sharded output is written into a hidden sibling folder and swapped into place whole
(``AtomicFolder``), so a killed run leaves either the previous folder or the new one, never
shards without their index. A full disk ends in a ``DiskFullError`` with nothing kept.

Aliases (names that view one tensor, e.g. tied weights or the cross-attention tensors that
OpenFlamingo v1 files hold twice) are stored once. The name kept is the one the rules point to
(the one an explicit ``rename`` produced, or the one left when a ``drop`` removed the others),
else the first name in the checkpoint; each removed name is recorded in the ``ckpt_tools.aliases``
metadata entry (JSON ``{removed: kept}``) so a loader can restore it (``restore_aliases``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IntegrityError, OutputExistsError, RemapError, UsageError
from .meta import FLOAT_DTYPES, TensorMeta
from .remap import RemapResult, Rule, apply_remap, rules_to_json

INDEX_NAME = "model.safetensors.index.json"
ALIASES_KEY = "ckpt_tools.aliases"  # metadata: JSON {removed alias: stored name}
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_SIZE = "5GB"  # what a folder DST gets without --max-shard-size (transformers' long-time default)
DTYPE_CHOICES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
VERIFY_CHUNK = 16 * 1024 * 1024
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")


# -- results --

@dataclass
class ConversionResult:
    source: str
    destination: str
    files: list[str]
    tensors: int
    aliases_removed: dict[str, str]
    renamed: dict[str, str]
    dropped: list[str]
    bytes_written: int
    verified: bool
    verified_tensors: int = 0
    dtype: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    extras_written: list[str] = field(default_factory=list)
    extras_path: str | None = None
    unmatched_rules: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination, "files": list(self.files),
            "tensors": self.tensors, "aliases_removed": dict(self.aliases_removed),
            "renamed": dict(self.renamed), "dropped": list(self.dropped),
            "bytes_written": self.bytes_written, "verified": self.verified,
            "verified_tensors": self.verified_tensors, "dtype": self.dtype,
            "extras": dict(self.extras), "extras_written": list(self.extras_written),
            "extras_path": self.extras_path, "unmatched_rules": list(self.unmatched_rules),
            "notes": list(self.notes),
        }

    def _summary_rows(self) -> list[list[object]]:
        from .render import human_bytes

        verified = (f"yes, {self.verified_tensors} tensors bit for bit" if self.verified
                    else "no (--no-verify)")
        rows = [["source", self.source], ["destination", self.destination],
                ["files", ", ".join(Path(f).name for f in self.files)], ["tensors", self.tensors],
                ["bytes written", f"{self.bytes_written} ({human_bytes(self.bytes_written)})"],
                ["renamed", len(self.renamed)], ["dropped", len(self.dropped)],
                ["aliases removed", len(self.aliases_removed)], ["verified", verified]]
        if self.dtype:
            rows.append(["dtype", self.dtype])
        if self.extras:
            where = f"written to {self.extras_path}: {', '.join(self.extras_written) or 'none JSON-able'}" \
                if self.extras_path else "not written (pass --extras FILE)"
            rows.append(["extras", f"{', '.join(self.extras)}; {where}"])
        rows += [["unmatched rule", json.dumps(r)] for r in self.unmatched_rules]
        rows += [["note", n] for n in self.notes]
        return rows

    def rich_table(self):
        from .render import rich_table

        return rich_table("ckpt convert", ["field", "value"], self._summary_rows())

    def to_markdown(self) -> str:
        from .render import markdown_table

        text = "### ckpt convert\n\n" + markdown_table(["field", "value"], self._summary_rows())
        if self.aliases_removed:
            text += "\n\n" + markdown_table(["alias removed", "stored as"], [list(i) for i in self.aliases_removed.items()])
        return text


@dataclass
class RemapCheckpointResult:
    source: str
    destination: str
    format: str
    files: list[str]
    tensors: int
    renamed: dict[str, str]
    dropped: list[str]
    unmatched_rules: list[dict]
    rules: list[dict]
    bytes_written: int
    verified: bool

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "format": self.format,
                "files": list(self.files), "tensors": self.tensors, "renamed": dict(self.renamed),
                "dropped": list(self.dropped), "unmatched_rules": list(self.unmatched_rules),
                "rules": list(self.rules), "bytes_written": self.bytes_written, "verified": self.verified}

    def _rows(self) -> list[list[object]]:
        rows = [[old, new] for old, new in self.renamed.items()]
        rows += [[old, "(dropped)"] for old in self.dropped]
        return rows

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        from .render import rich_table

        head = Text(f"{self.source} -> {self.destination} ({self.format}): {self.tensors} tensors, "
                    f"{len(self.renamed)} renamed, {len(self.dropped)} dropped"
                    + (", verified" if self.verified else ""))
        parts = [head, rich_table("changes", ["old", "new"], self._rows())]
        parts += [Text(f"rule matched nothing: {json.dumps(r)}", style="yellow") for r in self.unmatched_rules]
        return Group(*parts)

    def to_markdown(self) -> str:
        from .render import markdown_table

        text = (f"### ckpt remap\n\n`{self.source}` -> `{self.destination}` ({self.format}): {self.tensors} tensors, "
                f"{len(self.renamed)} renamed, {len(self.dropped)} dropped\n\n")
        text += markdown_table(["old", "new"], self._rows())
        for rule in self.unmatched_rules:
            text += f"\n\n- rule matched nothing: `{json.dumps(rule)}`"
        return text


# -- planning (pure) --

@dataclass(frozen=True)
class Planned:
    """One tensor to write: its source key and its output meta (renamed, maybe cast)."""

    source_key: str
    meta: TensorMeta


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ``1000`` -> 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"invalid size {text!r}", fix="write e.g. 2GB, 500MB, 1GiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def cast_dtype(dtype: str, target: str | None) -> str:
    """The output dtype: floating tensors take ``target``, everything else keeps its own."""
    return target if target and dtype in FLOAT_DTYPES else dtype


def resolve_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = DTYPE_CHOICES.get(dtype.lower(), dtype.upper())
    if name not in DTYPE_CHOICES.values():
        raise UsageError(f"unsupported --dtype {dtype!r}", fix=f"use one of: {', '.join(DTYPE_CHOICES)}")
    return name


def resolve_aliases(aliases: Iterable[Sequence[str]], remap: RemapResult) -> dict[str, str]:
    """{removed name: kept output name} for every alias group that keeps a tensor.

    The kept name is the one an explicit rename rule produced, else the first surviving name in
    the group. Every other member is an alias removed, including members a drop rule removed
    (a preset that drops OpenFlamingo v1's ``gated_cross_attn_layers.*`` copies points to the
    other name): those are recorded under the name they had when dropped, unless an output
    tensor already has that name.
    """
    removed: dict[str, str] = {}
    outputs = set(remap.mapping.values())
    for group in aliases:
        alive = [name for name in group if name in remap.mapping]
        if not alive:
            continue
        keeper = next((n for n in alive if n in remap.renamed_by_rule), alive[0])
        kept = remap.mapping[keeper]
        removed.update({remap.mapping[n]: kept for n in alive if n != keeper})
        for name in group:
            gone = remap.dropped_as.get(name)
            if gone is not None and gone not in outputs:
                removed[gone] = kept
    return removed


def dropped_keys(remap: RemapResult, aliases: Iterable[Sequence[str]]) -> list[str]:
    """Keys whose data is not in the output: dropped by a rule and not an alias of a kept tensor."""
    absorbed = {name for group in aliases if any(n in remap.mapping for n in group) for name in group}
    return [key for key in remap.dropped if key not in absorbed]


def plan_tensors(metas: dict[str, TensorMeta], remap: RemapResult, removed_aliases: dict[str, str],
                 dtype: str | None) -> list[Planned]:
    plan = []
    for old, new in remap.mapping.items():
        if new in removed_aliases:
            continue
        meta = metas[old]
        plan.append(Planned(old, TensorMeta.of(new, meta.shape, cast_dtype(meta.dtype, dtype))))
    return plan


def plan_shards(plan: Sequence[Planned], max_bytes: int | None) -> list[list[Planned]]:
    """Greedy, in order: a shard closes when the next tensor would push it past ``max_bytes``;
    a tensor larger than ``max_bytes`` gets a shard of its own."""
    if max_bytes is None:
        return [list(plan)]
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.meta.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.meta.nbytes
    return shards


# -- destinations --

@dataclass
class Destination:
    """Where the files go: one file, or a folder of shards plus an index."""

    path: Path
    sharded: bool
    max_bytes: int | None

    def file_names(self, count: int) -> list[Path]:
        if not self.sharded:
            return [self.path]
        return [self.path / SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]

    @property
    def index(self) -> Path | None:
        return self.path / INDEX_NAME if self.sharded else None


def _destination(dst: str | Path, max_shard_size: str | int | None) -> Destination:
    text = str(dst)
    path = Path(text)
    folder = path.is_dir() or text.endswith(("/", os.sep))
    if max_shard_size is not None and path.suffix == ".safetensors" and not path.is_dir():
        raise UsageError("--max-shard-size writes a folder of shards, not one .safetensors file", path=text,
                         fix="pass a folder as DST (e.g. out/) or drop --max-shard-size")
    if max_shard_size is not None or folder:
        return Destination(path, True, parse_size(max_shard_size or DEFAULT_SHARD_SIZE))
    return Destination(path, False, None)


def _check_destination(destination: Destination, outputs: list[Path], src: str | Path, force: bool) -> None:
    parent = destination.path.parent
    if not parent.is_dir():
        raise UsageError("the destination's folder does not exist", path=str(parent),
                         fix=f"create it first (mkdir -p {parent})")
    if destination.sharded and destination.path.exists() and not destination.path.is_dir():
        raise OutputExistsError("a folder of shards cannot replace a file", path=str(destination.path),
                                fix="choose a folder name")
    check_outputs(outputs, src, force)
    stale = _existing_shards(destination.path) if destination.sharded else []
    if stale and not force:
        raise OutputExistsError(f"the folder already holds shards ({stale[0].name})", path=str(destination.path),
                                fix="pass --force to replace them, or choose an empty folder")
    check_outputs(stale, src, force)  # replacing the folder removes its old shards: never the source's


def source_files(src: str | Path) -> list[Path]:
    """Every local file the source reads (the file, or the files of its folder)."""
    path = Path(src)
    if str(src).startswith("hf://") or not path.exists():
        return []
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    if path.name.endswith(".index.json"):
        return [p for p in path.parent.iterdir() if p.is_file()]
    return [path]


def check_outputs(outputs: Iterable[Path], src: str | Path, force: bool) -> None:
    """Refuse to overwrite without ``force``, and to overwrite the source ever."""
    sources = source_files(src)
    for out in outputs:
        if not out.exists():
            continue
        if any(_same_file(out, s) for s in sources):
            raise OutputExistsError("the output would overwrite its own source", path=str(out),
                                    fix="choose another destination")
        if out.is_dir():
            raise OutputExistsError("the output is a folder", path=str(out), fix="choose a file name")
        if not force:
            raise OutputExistsError("the output exists", path=str(out), fix="pass --force to overwrite it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if SHARD_PATTERN.fullmatch(p.name)]


def _replaced_by_output(name: str) -> bool:
    """Entries of an existing destination folder that a sharded output replaces; others are kept."""
    return name == INDEX_NAME or SHARD_PATTERN.fullmatch(name) is not None


# -- conversion --

def convert_to_safetensors(src: str | Path, dst: str | Path, *, rules: Sequence[Rule] | None = None,
                           dtype: str | None = None, max_shard_size: str | int | None = None,
                           verify: bool = True, force: bool = False,
                           extras_path: str | Path | None = None) -> ConversionResult:
    """Convert any checkpoint the reader opens to one ``.safetensors`` file or a sharded folder."""
    from .reader import open_checkpoint
    from .safetensors_writer import disk_full_as_error

    target_dtype = resolve_dtype(dtype)
    destination = _destination(dst, max_shard_size)
    with open_checkpoint(src) as checkpoint:
        remap = apply_remap(checkpoint.keys(), rules)
        if not remap.mapping:
            raise RemapError("the rules drop every tensor", path=str(src), fix="check --drop/--keep globs")
        aliases = resolve_aliases(checkpoint.aliases, remap)
        plan = plan_tensors(checkpoint.metas(), remap, aliases, target_dtype)
        shards = plan_shards(plan, destination.max_bytes)
        outputs = destination.file_names(len(shards))
        extras_file = Path(extras_path) if extras_path else None
        _check_destination(destination, outputs + [p for p in (destination.index, extras_file) if p], src, force)
        metadata = _provenance(src, checkpoint, rules, aliases)
        writer = _ShardWriter(checkpoint, destination, verify)
        with disk_full_as_error(dst, sum(item.meta.nbytes for item in plan)):
            bytes_written, verified = writer.write(shards, outputs, metadata, aliases)
            written_extras = _write_extras(checkpoint, extras_file) if extras_file else []
        result = ConversionResult(
            source=str(src), destination=str(dst), files=[str(p) for p in writer.committed],
            tensors=len(plan), aliases_removed=aliases, renamed=remap.renamed,
            dropped=dropped_keys(remap, checkpoint.aliases),
            bytes_written=bytes_written, verified=verify, verified_tensors=verified, dtype=target_dtype,
            extras=dict(checkpoint.extras), extras_written=written_extras,
            extras_path=str(extras_file) if extras_file else None,
            unmatched_rules=[r.to_dict() for r in remap.unmatched_rules], notes=list(checkpoint.notes))
    return result


def _provenance(src: str | Path, checkpoint, rules: Sequence[Rule] | None, aliases: dict[str, str]) -> dict[str, str]:
    """Source metadata (single safetensors files) overlaid with where the output came from.
    ``source_size`` counts the source file, or a folder's checkpoint files and index."""
    from . import __version__

    files = source_files(src)
    if len(files) > 1:
        files = [p for p in files if p.name.endswith(CHECKPOINT_SUFFIXES)]
    size = sum(p.stat().st_size for p in files)
    inherited = dict(checkpoint.metadata) if checkpoint.format == "safetensors" else {}
    metadata = {**inherited, "format": "pt", "ckpt_tools.version": __version__,
                "ckpt_tools.source": Path(str(src).rstrip("/")).name or str(src),
                "ckpt_tools.source_size": str(size),
                "ckpt_tools.remap": rules_to_json(rules)}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    return metadata


class _ShardWriter:
    """Writes every shard to a temporary file and verifies it, then commits all of them (index
    last): into place for one file, into a staging folder swapped into place for shards."""

    def __init__(self, checkpoint, destination: Destination, verify: bool) -> None:
        self.checkpoint = checkpoint
        self.destination = destination
        self.verify = verify
        self.committed: list[Path] = []

    def write(self, shards: list[list[Planned]], outputs: list[Path], metadata: dict[str, str],
              aliases: dict[str, str]) -> tuple[int, int]:
        from .safetensors_writer import AtomicFolder

        if not self.destination.sharded:
            written = self._write_files(shards, outputs, metadata, aliases)
        else:
            with AtomicFolder(self.destination.path, _replaced_by_output) as folder:
                written = self._write_files(shards, [folder.path / out.name for out in outputs], metadata, aliases)
                folder.commit()
        self.committed = list(outputs) + ([self.destination.index] if self.destination.sharded else [])
        return written

    def _write_files(self, shards: list[list[Planned]], outputs: list[Path], metadata: dict[str, str],
                     aliases: dict[str, str]) -> tuple[int, int]:
        from .safetensors_writer import AtomicFile, write_safetensors

        pending: list[AtomicFile] = []
        total, verified = 0, 0
        try:
            for shard, out in zip(shards, outputs, strict=True):
                handle = AtomicFile(out)
                handle.open()
                pending.append(handle)
                entries = [(item.meta, self._loader(item)) for item in shard]
                total += write_safetensors(handle, entries, self._shard_metadata(metadata, shard, aliases))
                if self.verify:
                    verified += verify_file(handle.path, shard, self.checkpoint, str(self._shown(out)))
            total += self._write_index(shards, outputs, metadata, pending)
            for handle in pending:
                handle.commit()
        finally:
            for handle in pending:
                handle.discard()  # nothing left to discard once committed
        return total, verified

    def _shown(self, out: Path) -> Path:
        """The name a staged file will have, for messages."""
        return self.destination.path / out.name if self.destination.sharded else out

    def _loader(self, item: Planned):
        """The tensor, or where its unchanged bytes lie in the source file when the reader knows
        (then no tensor is ever built)."""
        from .safetensors_writer import FileRange

        key = item.source_key
        span = getattr(self.checkpoint, "byte_span", None)
        if span is not None and item.meta.dtype == self.checkpoint.meta(key).dtype:
            found = span(key)
            if found is not None:
                return lambda: FileRange(*found)
        return lambda: self.checkpoint.tensor(key)

    @staticmethod
    def _shard_metadata(metadata: dict[str, str], shard: list[Planned], aliases: dict[str, str]) -> dict[str, str]:
        if not aliases:
            return metadata
        names = {item.meta.name for item in shard}
        mine = {removed: kept for removed, kept in aliases.items() if kept in names}
        out = {k: v for k, v in metadata.items() if k != ALIASES_KEY}
        if mine:
            out[ALIASES_KEY] = json.dumps(mine, separators=(",", ":"))
        return out

    def _write_index(self, shards, outputs, metadata, pending) -> int:
        from .safetensors_writer import AtomicFile

        if not self.destination.sharded:
            return 0
        weight_map = {item.meta.name: out.name for shard, out in zip(shards, outputs, strict=True) for item in shard}
        index = {"metadata": {"total_size": sum(i.meta.nbytes for s in shards for i in s),
                              **{k: v for k, v in metadata.items() if k != "format"}},
                 "weight_map": weight_map}
        handle = AtomicFile(outputs[0].parent / INDEX_NAME)
        handle.open()
        pending.append(handle)  # last, so the index appears only after every shard it names
        return handle.write(json.dumps(index, indent=2).encode("utf-8") + b"\n")


def restore_aliases(state: dict, metadata: dict[str, str] | None) -> dict:
    """Put back the names a conversion stored once: ``state[removed] = state[kept]`` (same tensor)
    for each entry of the ``ckpt_tools.aliases`` metadata whose kept name is in ``state``."""
    aliases = json.loads((metadata or {}).get(ALIASES_KEY, "{}"))
    for removed, kept in aliases.items():
        if kept in state and removed not in state:
            state[removed] = state[kept]
    return state


def verify_file(path: str, shard: Sequence[Planned], checkpoint, shown: str) -> int:
    """Reopen a written file and compare every tensor, bit for bit, with its (cast) source."""
    import mmap

    import numpy as np

    from .formats.safetensors import parse_header
    from .safetensors_writer import chunk_bytes_view, tensor_chunks

    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        metas, _, offsets, start = parse_header(handle.read(8), handle.read, size, shown)
        expected = {item.meta.name: item.meta for item in shard}
        if {n: (m.shape, m.dtype) for n, m in metas.items()} != {n: (m.shape, m.dtype) for n, m in expected.items()}:
            raise IntegrityError("the written header does not list the planned tensors", path=shown,
                                 fix="report this as a bug; nothing was written")
        if size == start:
            return len(shard)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            data = np.frombuffer(mapped, dtype=np.uint8)
            try:
                for item in shard:
                    begin = start + offsets[item.meta.name][0]
                    tensor = checkpoint.tensor(item.source_key)
                    for chunk in tensor_chunks(tensor, item.meta.dtype, VERIFY_CHUNK):
                        want = chunk_bytes_view(chunk)
                        if not np.array_equal(data[begin:begin + want.size], want):
                            raise IntegrityError("written bytes differ from the source", path=shown,
                                                 key=item.meta.name, fix="check the disk; nothing was kept")
                        begin += want.size
                    del tensor
            finally:
                del data
        finally:
            # an interrupt can leave views of the map alive in its traceback: the map then closes
            # when they go, and the interrupt (not a BufferError) is what propagates
            with contextlib.suppress(BufferError):
                mapped.close()
    return len(shard)


def _write_extras(checkpoint, path: Path) -> list[str]:
    """Write the JSON-able extras to ``path`` (atomically); return their names."""
    from .safetensors_writer import AtomicFile

    values = checkpoint.extra_values()
    written = {name: value for name, value in values.items() if _json_able(value)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as handle:
        handle.write(json.dumps(written, indent=2, sort_keys=True).encode("utf-8") + b"\n")
        handle.commit()
    return list(written)


def _json_able(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


# -- remap in place of format --

def remap_checkpoint(src: str | Path, dst: str | Path, *, rules: Sequence[Rule] | None,
                     force: bool = False) -> RemapCheckpointResult:
    """Rewrite keys, keeping the format: safetensors (single or sharded) stays safetensors, a torch
    pickle is written with ``torch.save`` (wrapper and extras kept, shared tensors still shared)."""
    from .reader import open_checkpoint

    with open_checkpoint(src) as checkpoint:
        fmt = checkpoint.format
    writer = _REMAP_WRITERS.get(fmt)
    if writer is None:
        raise UsageError(f"remap cannot write the {fmt} format", path=str(src),
                         fix="use `ckpt convert` to write safetensors")
    return writer(src, dst, rules, force, fmt)


def _remap_safetensors(src, dst, rules, force, fmt) -> RemapCheckpointResult:
    shard_size = None
    if fmt != "safetensors":  # keep the source's shard size
        shard_size = max(p.stat().st_size for p in source_files(src) if p.suffix == ".safetensors")
    result = convert_to_safetensors(src, dst, rules=rules, max_shard_size=shard_size, force=force)
    return RemapCheckpointResult(
        source=str(src), destination=str(dst), format=fmt, files=result.files, tensors=result.tensors,
        renamed=result.renamed, dropped=result.dropped, unmatched_rules=result.unmatched_rules,
        rules=[r.to_dict() for r in rules or []], bytes_written=result.bytes_written, verified=result.verified)


def _remap_pickle(src, dst, rules, force, fmt) -> RemapCheckpointResult:
    import torch

    from .reader import open_checkpoint
    from .safetensors_writer import AtomicFile, disk_full_as_error

    dst = Path(dst)
    check_outputs([dst], src, force)
    with open_checkpoint(src) as checkpoint:
        remap = apply_remap(checkpoint.keys(), rules)
        want = {new: (checkpoint.meta(old).shape, checkpoint.meta(old).dtype) for old, new in remap.mapping.items()}
        root = checkpoint.pickled_root()  # wrapper and extras are written back as they were
        state = {new: checkpoint.tensor(old) for old, new in remap.mapping.items()}
        root = _replace_state(root, checkpoint.wrapper, state)
        need = sum(checkpoint.meta(old).nbytes for old in remap.mapping)
        with disk_full_as_error(dst, need), AtomicFile(dst) as handle, open(handle.path, "wb") as stream:
            torch.save(root, stream, _use_new_zipfile_serialization=(fmt == "torch-zip"))
            stream.flush()
            handle.commit()
        del root, state
    _verify_remapped(src, dst, remap.mapping, want)
    return RemapCheckpointResult(
        source=str(src), destination=str(dst), format=fmt, files=[str(dst)], tensors=len(remap.mapping),
        renamed=remap.renamed, dropped=remap.dropped, unmatched_rules=[r.to_dict() for r in remap.unmatched_rules],
        rules=[r.to_dict() for r in rules or []], bytes_written=dst.stat().st_size, verified=True)


def _verify_remapped(src, dst: Path, mapping: dict[str, str], want: dict) -> None:
    """Reopen the written pickle: the planned names, shapes and dtypes, and every tensor equal, bit
    for bit, to its source (one pair in memory at a time). A mismatch removes the output."""
    import torch

    from .reader import open_checkpoint

    with open_checkpoint(src) as source, open_checkpoint(dst) as written:
        problem = None
        if {n: (m.shape, m.dtype) for n, m in written.metas().items()} != want:
            problem = ("the written file does not list the remapped tensors", None)
        else:
            for old, new in mapping.items():
                a, b = source.tensor(old), written.tensor(new)
                if not torch.equal(_raw_bytes(a), _raw_bytes(b)):
                    problem = ("written bytes differ from the source", new)
                    break
    if problem is not None:
        dst.unlink(missing_ok=True)
        raise IntegrityError(problem[0], path=str(dst), key=problem[1], fix="check the disk; the output was removed")


def _raw_bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _replace_state(root, wrapper: str | None, state: dict):
    """A shallow copy of ``root`` with the state dict at ``wrapper`` replaced (extras kept in place)."""
    if not wrapper:
        extras = {k: v for k, v in root.items() if not _is_tensor(v)}
        return {**state, **extras}
    head, _, rest = wrapper.partition(".")
    copy = dict(root)
    copy[head] = _replace_state(root[head], rest or None, state)
    return copy


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


_REMAP_WRITERS = {
    "safetensors": _remap_safetensors,
    "sharded-safetensors": _remap_safetensors,
    "torch-zip": _remap_pickle,
    "torch-legacy": _remap_pickle,
}

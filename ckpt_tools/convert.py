"""``convert_to_safetensors``: any checkpoint to safetensors, streaming and verified.

Conversion never builds a state dict. It plans from TensorMeta (``convert_plan.py``: remap, alias
resolution, dtype cast, shards), writes each safetensors file with ``safetensors_writer`` (header
first, then one tensor at a time from the reader's memory map, or file to file when a tensor's
bytes do not change), verifies every written tensor bit for bit against its source while the
output is still an unnamed temporary file, and only then moves it into place.

A sharded output is written into a hidden sibling folder and swapped into place whole
(``fs.AtomicFolder``), so a killed run leaves either the previous folder or the new one, never
shards without their index. A full disk ends in a ``DiskFullError`` with nothing kept. Each alias
removed is recorded in the ``ckpt_tools.aliases`` metadata entry (JSON ``{removed: kept}``) so a
loader can restore it (``restore_aliases``).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import ALIASES_KEY, Checkpoint, recorded_aliases
from .convert_plan import (
    INDEX_NAME,
    SHARD_PATTERN,
    Destination,
    Planned,
    plan_conversion,
)
from .dcp_writer import METADATA_FILE, dcp_file, write_dcp
from .errors import CkptError, IntegrityError, InvalidCheckpointError, OutputExistsError, UsageError
from .formats import open_checkpoint
from .formats.dcp import open_path as open_dcp
from .formats.safetensors import parse_header
from .fs import AtomicFile, AtomicFolder, check_output_name, check_outputs, disk_full_as_error, ranges_equal
from .meta import torch_dtype
from .remap import Rule, coerce_rules, rules_to_json
from .render import human_bytes, markdown_table, plural, rich_table
from .safetensors_writer import FileRange, cast_checked, chunk_bytes_view, tensor_chunks, write_safetensors
from .version import VERSION

MIN_SELECTED_FRACTION = 0.5  # of the file's non-optimizer tensor bytes, for a choice made by content
VERIFY_CHUNK = 16 * 1024 * 1024


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
    inferred_rules: list[dict] = field(default_factory=list)  # applied with --auto-remap

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination, "files": list(self.files),
            "tensors": self.tensors, "aliases_removed": dict(self.aliases_removed),
            "renamed": dict(self.renamed), "dropped": list(self.dropped),
            "bytes_written": self.bytes_written, "verified": self.verified,
            "verified_tensors": self.verified_tensors, "dtype": self.dtype,
            "extras": dict(self.extras), "extras_written": list(self.extras_written),
            "extras_path": self.extras_path, "unmatched_rules": list(self.unmatched_rules),
            "notes": list(self.notes), "inferred_rules": list(self.inferred_rules),
        }

    def _summary_rows(self) -> list[list[object]]:
        verified = (f"yes, {plural(self.verified_tensors, 'tensor')} bit for bit" if self.verified
                    else "no (--no-verify)")
        stored_once = (f" ({plural(len(self.aliases_removed), 'more name')} of the same tensors stored once, "
                       f"listed in the metadata)" if self.aliases_removed else "")
        rows = [["source", self.source], ["destination", self.destination],
                ["files", ", ".join(Path(f).name for f in self.files)],
                ["tensors", f"{self.tensors} written{stored_once}"],
                ["bytes written", f"{self.bytes_written:,} ({human_bytes(self.bytes_written)})"],
                ["renamed", plural(len(self.renamed), "source name")], ["dropped", len(self.dropped)],
                ["verified", verified]]
        if self.dtype:
            rows.append(["dtype", self.dtype])
        if self.extras:
            where = f"written to {self.extras_path}: {', '.join(self.extras_written) or 'none JSON-able'}" \
                if self.extras_path else "not written (pass --extras FILE)"
            rows.append(["extras", f"{', '.join(self.extras)}; {where}"])
        rows += [["inferred rule", json.dumps(r)] for r in self.inferred_rules]
        rows += [["note", n] for n in self.notes]
        return rows

    @property
    def warnings(self) -> list[str]:
        """What the user should look at, printed on stderr beside the result (``unmatched_rules``)."""
        return [f"rule matched nothing: {json.dumps(r)}" for r in self.unmatched_rules]

    def rich_table(self):
        return rich_table("ckpt convert", ["field", "value"], self._summary_rows())

    def to_markdown(self) -> str:
        text = "### ckpt convert\n\n" + markdown_table(["field", "value"], self._summary_rows())
        if self.aliases_removed:
            text += "\n\n" + markdown_table(["alias removed", "stored as"], [list(i) for i in self.aliases_removed.items()])
        return text


def _check_destination(destination: Destination, outputs: list[Path], sources: list[Path], force: bool) -> None:
    parent = destination.path.parent
    if not parent.is_dir():
        raise UsageError("the destination's folder does not exist", path=str(parent),
                         fix=f"create it first (mkdir -p {parent})")
    if destination.sharded and destination.path.exists() and not destination.path.is_dir():
        raise OutputExistsError("a folder of shards cannot replace a file", path=str(destination.path),
                                fix="choose a folder name")
    check_outputs(outputs, sources, force)
    stale = _existing_shards(destination.path) if destination.sharded else []
    if stale and not force:
        raise OutputExistsError(f"the folder already holds shards ({stale[0].name})", path=str(destination.path),
                                fix="pass --force to replace them, or choose an empty folder")
    check_outputs(stale, sources, force)  # replacing the folder removes its old shards: never the source's


def _existing_shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if SHARD_PATTERN.fullmatch(p.name)]


def _replaced_by_output(name: str) -> bool:
    """Entries of an existing destination folder that a sharded output replaces; others are kept."""
    return name == INDEX_NAME or SHARD_PATTERN.fullmatch(name) is not None


def convert_to_safetensors(src: str | Path, dst: str | Path, *, rules=None,
                           dtype: str | None = None, max_shard_size: str | int | None = None,
                           verify: bool = True, force: bool = False,
                           extras_path: str | Path | None = None, select: str | None = None,
                           inert: bool = False) -> ConversionResult:
    """Convert any checkpoint the readers open to one ``.safetensors`` file or a sharded folder.
    ``rules``: remap rules in any form ``remap.coerce_rules`` takes; ``select``/``inert``: as
    ``open_checkpoint``. A state dict chosen by content that holds less than half of the file's
    tensor bytes is refused unless ``select`` names it (weights must not disappear silently)."""
    rules = coerce_rules(rules)
    with open_checkpoint(src, select=select, inert=inert) as checkpoint:
        _check_selection(checkpoint)
        if verify:  # a damaged source is refused before anything is written
            checkpoint.check_stored_sums()
        plan = plan_conversion(checkpoint.metas(), checkpoint.aliases, rules, dst, dtype=dtype,
                               max_shard_size=max_shard_size, source=str(src))
        extras_file = Path(extras_path) if extras_path else None
        if extras_file:
            check_output_name(extras_file, "JSON")
        destination = plan.destination
        _check_not_into_dcp(checkpoint, plan.outputs)
        _check_destination(destination, plan.outputs + [p for p in (destination.index, extras_file) if p],
                           checkpoint.files, force)
        metadata = _provenance(src, checkpoint, rules, plan.aliases, plan.dtype)
        extras = _extras_json(checkpoint) if extras_file else {}
        writer = _ShardWriter(checkpoint, destination, verify)
        with disk_full_as_error(dst, plan.bytes):
            bytes_written, verified = writer.write(plan.shards, plan.outputs, metadata, plan.aliases)
            written_extras = _write_extras(extras, extras_file) if extras_file else []
        result = ConversionResult(
            source=str(src), destination=str(dst), files=[str(p) for p in writer.committed],
            tensors=len(plan.tensors), aliases_removed=plan.aliases, renamed=plan.remap.renamed,
            dropped=plan.dropped, bytes_written=bytes_written, verified=verify, verified_tensors=verified,
            dtype=plan.dtype, extras=dict(checkpoint.extras), extras_written=written_extras,
            extras_path=str(extras_file) if extras_file else None,
            unmatched_rules=[r.to_dict() for r in plan.remap.unmatched_rules], notes=list(checkpoint.notes))
    return result


def convert_to_dcp(src: str | Path, dst: str | Path, *, rules=None, dtype: str | None = None,
                   verify: bool = True, force: bool = False, extras_path: str | Path | None = None,
                   select: str | None = None, inert: bool = False) -> ConversionResult:
    """Convert any checkpoint the readers open to a torch.distributed.checkpoint folder at ``dst``
    (``.metadata`` and ``__0_0.distcp``), written by torch's own ``dcp.save`` one tensor at a time,
    so that ``torch.distributed.checkpoint.load`` reads it into a model sharded any way. Every name
    is written (aliases too: a loader asks for each), flat, as the state dict's keys; the rules,
    ``dtype``, ``select`` and ``inert`` are as for ``convert_to_safetensors``. The folder appears
    only once it is complete and verified bit for bit."""
    rules = coerce_rules(rules)
    folder = Path(dst)
    check_output_name(folder, "a DCP folder")
    with open_checkpoint(src, select=select, inert=inert) as checkpoint:
        _check_selection(checkpoint)
        if verify:  # a damaged source is refused before anything is written
            checkpoint.check_stored_sums()
        plan = plan_conversion(checkpoint.metas(), [], rules, folder, dtype=dtype, source=str(src))
        extras_file = Path(extras_path) if extras_path else None
        if extras_file:
            check_output_name(extras_file, "JSON")
        _check_dcp_destination(folder, checkpoint.files, [extras_file] if extras_file else [], force)
        entries = [(item.meta, _cast_tensor_of(checkpoint, item)) for item in plan.tensors]
        extras = _extras_json(checkpoint) if extras_file else {}
        with disk_full_as_error(dst, plan.bytes), AtomicFolder(folder, dcp_file) as staging:
            try:
                written = write_dcp(staging.path, entries)
            except CkptError as exc:  # the writer knows the key; the file it came from is ours to name
                raise exc.located(checkpoint.source) from None
            verified = verify_dcp(staging.path, plan.tensors, checkpoint, str(folder)) if verify else 0
            staging.commit()
            written_extras = _write_extras(extras, extras_file) if extras_file else []
        notes = [*checkpoint.notes, "a DCP folder has no place for free-form metadata: where it came from (source, "
                                    "remap rules) is not recorded in it"]
        return ConversionResult(
            source=str(src), destination=str(dst), files=[str(folder / METADATA_FILE)] + sorted(
                str(p) for p in folder.iterdir() if p.name.endswith(".distcp")),
            tensors=len(plan.tensors), aliases_removed={}, renamed=plan.remap.renamed, dropped=plan.dropped,
            bytes_written=written, verified=verify, verified_tensors=verified, dtype=plan.dtype,
            extras=dict(checkpoint.extras), extras_written=written_extras,
            extras_path=str(extras_file) if extras_file else None,
            unmatched_rules=[r.to_dict() for r in plan.remap.unmatched_rules], notes=notes)


def _cast_tensor_of(checkpoint, item: Planned):
    """The source tensor, cast as planned (an overflow refused), when the writer asks for it."""
    return lambda: cast_checked(item.meta, checkpoint.tensor(item.source_key))


def _check_dcp_destination(folder: Path, sources: list[Path], others: list[Path], force: bool) -> None:
    if not folder.parent.is_dir():
        raise UsageError("the destination's folder does not exist", path=str(folder.parent),
                         fix=f"create it first (mkdir -p {folder.parent})")
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError("a DCP folder cannot replace a file", path=str(folder), fix="choose a folder name")
    existing = [p for p in folder.iterdir() if dcp_file(p.name)] if folder.is_dir() else []
    if existing and not force:
        raise OutputExistsError(f"the folder already holds a DCP checkpoint ({existing[0].name})", path=str(folder),
                                fix="pass --force to replace it, or choose an empty folder")
    check_outputs(existing + others, sources, force)  # replacing the folder's files: never the source's


def verify_dcp(folder: Path, planned: Sequence[Planned], checkpoint, shown: str) -> int:
    """Reopen a written DCP folder with this package's reader: the planned names, shapes and
    dtypes, and every tensor's bytes equal, bit for bit, to its (cast) source."""
    import torch

    with open_dcp(folder / METADATA_FILE, shown, select=".") as written:
        listed = {n: (m.shape, m.dtype) for n, m in written.metas().items()}
        if listed != {item.meta.name: (item.meta.shape, item.meta.dtype) for item in planned}:
            raise IntegrityError("the written folder does not list the planned tensors", path=shown,
                                 fix="report this as a bug; nothing was written")
        for item in planned:
            got = written.tensor(item.meta.name).reshape(-1).view(torch.uint8)
            want = checkpoint.tensor(item.source_key).to(torch_dtype(item.meta.dtype)).contiguous()
            if not torch.equal(got, want.reshape(-1).view(torch.uint8)):
                raise IntegrityError("written bytes differ from the source", path=shown, key=item.meta.name,
                                     fix="check the disk; nothing was kept")
            del got, want
    return len(planned)


def _check_not_into_dcp(checkpoint: Checkpoint, outputs: Sequence[Path]) -> None:
    """A DCP folder belongs to its writer (torch replaces or cleans it whole): safetensors written
    into it would leave one folder holding two checkpoints."""
    folder = getattr(checkpoint, "folder", None)
    if checkpoint.format != "dcp" or folder is None:
        return
    inside = [p for p in outputs if Path(p).resolve().parent == folder.resolve()]
    if inside:
        raise OutputExistsError("the output would be written into the DCP folder it is converted from",
                                path=str(inside[0]), fix="write it beside the folder, e.g. model.safetensors "
                                                          "or out/")


def _check_selection(checkpoint: Checkpoint) -> None:
    """Refuse to convert a state dict chosen by content that holds a minority of the file's
    model-like tensor bytes: the rest would be left behind without a word. Optimizer state is not
    counted (it is never a model, and Adam's is twice the weights)."""
    accounting = checkpoint.accounting
    if accounting is None or accounting.explicit:
        return
    together = checkpoint.selection.together if checkpoint.selection is not None else None
    if together is not None:  # parts of one model side by side: converting one drops the others
        raise InvalidCheckpointError(
            f"the state dict chosen ({checkpoint.wrapper}) is one of several side by side under {together}; "
            "the others would be left behind", path=checkpoint.source,
            fix=f"--select {together} to convert them together, or --select {checkpoint.wrapper} for this one")
    counted = [b for b in accounting.buckets if b.kind != "optimizer"]
    total = sum(b.nbytes for b in counted)
    selected = sum(b.nbytes for b in counted if b.kind == "selected")
    if not total or selected / total >= MIN_SELECTED_FRACTION:
        return
    others = [b for b in counted if b.kind != "selected"]
    biggest = max(others, key=lambda b: b.nbytes)
    shown = ", ".join(f"{b.path} ({b.kind}, {b.tensors} tensors, {b.nbytes:,} bytes)" for b in others[:4])
    raise InvalidCheckpointError(
        f"the state dict chosen ({checkpoint.wrapper or 'the top level'}) holds {selected / total:.0%} of the "
        f"file's {total:,} bytes of tensors outside optimizer state; the rest: {shown}",
        path=checkpoint.source, fix=f"name what to convert with --select (e.g. --select {biggest.path}), "
                                    f"or --select {checkpoint.wrapper or '.'} to keep this choice")


def _provenance(src: str | Path, checkpoint, rules: Sequence[Rule] | None, aliases: dict[str, str],
                dtype: str | None = None) -> dict[str, str]:
    """Source metadata (single safetensors files) overlaid with where the output came from.
    ``source_size`` counts the files read: the source file, or an index and its shards; ``dtype``
    the cast applied to floating tensors, so a reader knows the values are not the source's."""
    size = sum(p.stat().st_size for p in checkpoint.files)
    inherited = dict(checkpoint.metadata) if checkpoint.format == "safetensors" else {}
    metadata = {**inherited, "format": "pt", "ckpt_tools.version": VERSION,
                "ckpt_tools.source": Path(str(src).rstrip("/")).name or str(src),
                "ckpt_tools.source_size": str(size),
                "ckpt_tools.remap": rules_to_json(rules)}
    if dtype:
        metadata["ckpt_tools.dtype"] = dtype
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
        pending: list[AtomicFile] = []
        total, verified = 0, 0
        try:
            for shard, out in zip(shards, outputs, strict=True):
                handle = AtomicFile(out)
                handle.open()
                pending.append(handle)
                copied = {item.meta.name: self._unchanged(item) for item in shard}
                copied = {name: found for name, found in copied.items() if found is not None}
                entries = [(item.meta, self._loader(item, copied.get(item.meta.name))) for item in shard]
                try:
                    total += write_safetensors(handle, entries, self._shard_metadata(metadata, shard, aliases))
                except CkptError as exc:  # the writer knows the key; the file it came from is ours to name
                    raise exc.located(self.checkpoint.source) from None
                if self.verify:
                    verified += verify_file(handle.path, shard, self.checkpoint, str(self._shown(out)), copied)
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

    def _unchanged(self, item: Planned) -> list[FileRange] | None:
        """Where a tensor's bytes lie in the source's files, in order, when they are written
        unchanged and the reader knows: one range, or several (a DCP tensor's chunks). Then no
        tensor is ever built, to write or to verify."""
        key = item.source_key
        if item.meta.dtype != self.checkpoint.meta(key).dtype:
            return None
        spans = getattr(self.checkpoint, "byte_spans", None)
        found = spans(key) if spans is not None else None
        if found is None:
            span = getattr(self.checkpoint, "byte_span", None)
            one = span(key) if span is not None else None
            found = [one] if one is not None else None
        return [FileRange(*part) for part in found] if found is not None else None

    def _loader(self, item: Planned, copied: list[FileRange] | None):
        """The tensor, or the file ranges its unchanged bytes are copied from."""
        if copied is not None:
            return lambda: copied
        return lambda: self.checkpoint.tensor(item.source_key)

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
    recorded = recorded_aliases(metadata)
    if recorded is None:
        raise InvalidCheckpointError(f"the {ALIASES_KEY} metadata is not a JSON object of names",
                                     fix="convert the source again, or drop that metadata entry")
    for removed, kept in recorded.items():
        if kept in state and removed not in state:
            state[removed] = state[kept]
    return state


def verify_file(path: str, shard: Sequence[Planned], checkpoint, shown: str,
                copied: Mapping[str, list[FileRange]] | None = None) -> int:
    """Reopen a written file and compare every tensor, bit for bit, with its source: a tensor copied
    unchanged (``copied``: output name -> the source's file ranges, in order) range against range,
    with no torch; any other against its (cast) source tensor."""
    copied = copied or {}
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        metas, _, offsets, start = parse_header(handle.read(8), handle.read, size, shown)
    expected = {item.meta.name: item.meta for item in shard}
    if {n: (m.shape, m.dtype) for n, m in metas.items()} != {n: (m.shape, m.dtype) for n, m in expected.items()}:
        raise IntegrityError("the written header does not list the planned tensors", path=shown,
                             fix="report this as a bug; nothing was written")
    for item in shard:
        at = start + offsets[item.meta.name][0]
        for part in copied.get(item.meta.name, ()):
            if not ranges_equal((part.path, part.offset), (path, at), part.nbytes):
                raise _differs(shown, item.meta.name)
            at += part.nbytes
    built = [item for item in shard if item.meta.name not in copied and item.meta.nbytes]
    if built:
        _verify_tensors(path, built, checkpoint, shown, {n: start + offsets[n][0] for n in offsets})
    return len(shard)


def _differs(shown: str, key: str) -> IntegrityError:
    return IntegrityError("written bytes differ from the source", path=shown, key=key,
                          fix="check the disk; nothing was kept")


def _verify_tensors(path: str, items: Sequence[Planned], checkpoint, shown: str, begins: dict[str, int]) -> None:
    """Compare written bytes with source tensors, built one at a time (cast as planned)."""
    import numpy as np

    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        data = np.frombuffer(mapped, dtype=np.uint8)
        try:
            for item in items:
                begin = begins[item.meta.name]
                tensor = checkpoint.tensor(item.source_key)
                for chunk in tensor_chunks(tensor, item.meta.dtype, VERIFY_CHUNK):
                    want = chunk_bytes_view(chunk)
                    if not np.array_equal(data[begin:begin + want.size], want):
                        raise _differs(shown, item.meta.name)
                    begin += want.size
                del tensor
        finally:
            del data
    finally:
        # an interrupt can leave views of the map alive in its traceback: the map then closes
        # when they go, and the interrupt (not a BufferError) is what propagates
        with contextlib.suppress(BufferError):
            mapped.close()


def _extras_json(checkpoint) -> dict:
    """The JSON-able extras, read before anything is written: an extra that cannot be read (a
    hostile pickle) stops the conversion while nothing exists yet."""
    return {name: value for name, value in checkpoint.extra_values().items() if _json_able(value)}


def _write_extras(written: dict, path: Path) -> list[str]:
    """Write the extras to ``path`` (atomically); return their names."""
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



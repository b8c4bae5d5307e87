"""``remap_checkpoint``: rewrite a checkpoint's keys, keeping its format.

safetensors (one file or sharded) stays safetensors, through the conversion path. A torch pickle is
written back with its wrapper and extras in place and shared tensors still shared, then reopened
and compared with its source bit for bit before it is kept: a torch zip holding only containers,
plain values and tensors without torch (``torch_zip``: the pickle torch.save would write, storages
copied file to file, compared byte range against byte range), anything else with ``torch.save``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .convert import convert_to_safetensors
from .errors import IntegrityError, UsageError
from .formats import open_checkpoint
from .fs import AtomicFile, check_output_name, check_outputs, disk_full_as_error, ranges_equal
from .inert import TensorRef
from .remap import RemapResult, apply_remap, coerce_rules, remap_module_names
from .render import markdown_table, plural, rich_table
from .safetensors_writer import FileRange
from .selection import NESTED
from .torch_zip import TorchZipPlan, plan_torch_zip, write_torch_zip


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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "format": self.format,
                "files": list(self.files), "tensors": self.tensors, "renamed": dict(self.renamed),
                "dropped": list(self.dropped), "unmatched_rules": list(self.unmatched_rules),
                "rules": list(self.rules), "bytes_written": self.bytes_written, "verified": self.verified,
                "notes": list(self.notes)}

    def _rows(self) -> list[list[object]]:
        rows = [[old, new] for old, new in self.renamed.items()]
        rows += [[old, "(dropped)"] for old in self.dropped]
        return rows

    def _head(self) -> str:
        return (f"{self.source} -> {self.destination} ({self.format}): {plural(self.tensors, 'tensor')}, "
                f"{len(self.renamed)} renamed, {len(self.dropped)} dropped" + (", verified" if self.verified else ""))

    @property
    def warnings(self) -> list[str]:
        """What the user should look at, printed on stderr beside the result (``unmatched_rules``)."""
        return [f"rule matched nothing: {json.dumps(r)}" for r in self.unmatched_rules]

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        parts = [Text(self._head())]
        if self._rows():
            parts.append(rich_table("changes", ["old", "new"], self._rows()))
        parts += [Text(f"note: {n}") for n in self.notes]
        return Group(*parts)

    def to_markdown(self) -> str:
        text = f"### ckpt remap\n\n`{self._head()}`\n"
        if self._rows():
            text += "\n" + markdown_table(["old", "new"], self._rows()) + "\n"
        return text + "".join(f"\n- note: {n}" for n in self.notes)


# formats remap does not write, and the command that does
_OTHER_WRITER = {"dcp": "`ckpt convert SRC DST_DIR --to dcp` with the same rules writes a DCP folder again "
                        "(or drop --to dcp for safetensors)"}


def remap_checkpoint(src: str | Path, dst: str | Path, *, rules=None, force: bool = False,
                     select: str | None = None, inert: bool = False) -> RemapCheckpointResult:
    """Rewrite keys, keeping the format: safetensors (single or sharded) stays safetensors, a torch
    pickle stays a torch pickle (wrapper and extras kept, shared tensors still shared; a plain torch
    zip is written without torch, anything else with ``torch.save``).
    ``rules``: remap rules in any form ``remap.coerce_rules`` takes; ``select``/``inert``: as
    ``open_checkpoint``."""
    rules = coerce_rules(rules)
    options = {"select": select, "inert": inert}
    with open_checkpoint(src, **options) as checkpoint:
        kind, files = checkpoint.format, list(checkpoint.files)
    writer = _REMAP_WRITERS.get(kind)
    if writer is None:
        raise UsageError(f"remap cannot write the {kind} format", path=str(src),
                         fix=_OTHER_WRITER.get(kind, "use `ckpt convert` to write safetensors (it remaps too)"))
    return writer(src, dst, rules, force, kind, files, options)


def _remap_safetensors(src, dst, rules, force, kind, files, options) -> RemapCheckpointResult:
    shard_size, notes = None, []
    shards = [p for p in files if p.suffix == ".safetensors"]
    if kind != "safetensors":  # keep the source's shard size
        shard_size = max(p.stat().st_size for p in shards)
    result = convert_to_safetensors(src, dst, rules=rules, max_shard_size=shard_size, force=force, **options)
    written = [f for f in result.files if f.endswith(".safetensors")]
    if shard_size is not None and len(written) != len(shards):
        notes.append(f"{len(shards)} shards in, {len(written)} out: the tensors are packed again in order into "
                     f"shards of at most the source's largest ({shard_size:,} bytes)")
    return RemapCheckpointResult(
        source=str(src), destination=str(dst), format=kind, files=result.files, tensors=result.tensors,
        renamed=result.renamed, dropped=result.dropped, unmatched_rules=result.unmatched_rules,
        rules=[r.to_dict() for r in rules or []], bytes_written=result.bytes_written, verified=result.verified,
        notes=notes)


def _remap_pickle(src, dst, rules, force, kind, files, options) -> RemapCheckpointResult:
    dst = Path(dst)
    check_output_name(dst, "torch pickle", otherwise="; to get safetensors, use `ckpt convert` (it remaps too)")
    check_outputs([dst], files, force)
    with open_checkpoint(src, **options) as checkpoint:
        if checkpoint.selection is not None and checkpoint.selection.kind == NESTED:
            raise UsageError(f"--select {checkpoint.wrapper} takes nested state dicts as one, which remap cannot "
                             "write back in their place", path=str(src),
                             fix="use `ckpt convert` (it remaps too), or --select one of them")
        checkpoint.check_stored_sums()  # a damaged source is refused before anything is written
        remap = apply_remap(checkpoint.keys(), rules).require_kept(str(src))
        want = {new: (checkpoint.meta(old).shape, checkpoint.meta(old).dtype) for old, new in remap.mapping.items()}
        wrapper = checkpoint.wrapper
        plan = _plan_without_torch(checkpoint, kind, remap, wrapper)
        need = plan.nbytes if plan is not None else sum(checkpoint.meta(old).nbytes for old in remap.mapping)
        with disk_full_as_error(dst, need), AtomicFile(dst) as handle:
            if plan is not None:
                starts = write_torch_zip(handle, plan)
                _verify_copied(checkpoint, handle.path, remap.mapping, want, options, wrapper, plan, starts,
                               shown=str(dst))
            else:
                _save_with_torch(checkpoint, handle.path, remap, wrapper, kind)
                _verify_remapped(checkpoint, handle.path, remap.mapping, want, options, wrapper, shown=str(dst))
            # checked while still a temporary file: a mismatch leaves nothing under dst
            handle.commit()
    return RemapCheckpointResult(
        source=str(src), destination=str(dst), format=kind, files=[str(dst)], tensors=len(remap.mapping),
        renamed=remap.renamed, dropped=remap.dropped, unmatched_rules=[r.to_dict() for r in remap.unmatched_rules],
        rules=[r.to_dict() for r in rules or []], bytes_written=dst.stat().st_size, verified=True)


def _plan_without_torch(checkpoint, kind: str, remap: RemapResult, wrapper: str | None) -> TorchZipPlan | None:
    """A torch zip whose pickle holds nothing but containers, plain values and tensors is rewritten
    without torch: the same pickle torch.save would write, storages copied file to file. None when
    torch must write it (a legacy file, a device or tensor subclass in the pickle, ...)."""
    root = checkpoint.inert_root()  # objects that were not executed are refused here, as with torch
    if kind != "torch-zip":
        return None
    state = {new: checkpoint.tensor_ref(old) for old, new in remap.mapping.items()}
    root = _replace_state(root, wrapper, state, lambda value: isinstance(value, TensorRef), remap)
    return plan_torch_zip(root, checkpoint.files[0], checkpoint.storage_range)


def _save_with_torch(checkpoint, path: str, remap: RemapResult, wrapper: str | None, kind: str) -> None:
    import torch

    root = checkpoint.pickled_root()  # wrapper and extras are written back as they were
    state = {new: _as_saved(checkpoint, old) for old, new in remap.mapping.items()}
    root = _replace_state(root, wrapper, state, _is_tensor, remap)
    with open(path, "wb") as stream:
        torch.save(root, stream, _use_new_zipfile_serialization=(kind == "torch-zip"))


def _verify_copied(source, written_path: str, mapping: dict[str, str], want: dict, options: dict,
                   wrapper: str | None, plan: TorchZipPlan, starts: dict[str, int], *, shown: str) -> None:
    """``_verify_remapped`` without torch, for a file written from a plan: every storage's bytes
    equal, byte for byte, to the source's (and to the CRC written for them); the written pickle
    lists the planned names, shapes and dtypes; each tensor views the storage copied from its
    source's, at the same offset with the same strides. Together: every tensor bit for bit."""
    problem = None
    for record in plan.records:
        copied = record.data
        if isinstance(copied, FileRange) and not ranges_equal(
                (copied.path, copied.offset), (written_path, starts[record.name]), copied.nbytes, crc32=record.crc):
            problem = ("written bytes differ from the source", None)
            break
    if problem is None:
        with open_checkpoint(written_path, select=wrapper or ".", inert=options["inert"]) as written:
            if {n: (m.shape, m.dtype) for n, m in written.metas().items()} != want:
                problem = ("the written file does not list the remapped tensors", None)
            else:
                for old, new in mapping.items():
                    if not _same_view(source.tensor_ref(old), written, new, plan, starts):
                        problem = ("written tensor differs from the source", new)
                        break
    if problem is not None:
        raise IntegrityError(problem[0], path=shown, key=problem[1], fix="check the disk; nothing was written")


def _same_view(ref: TensorRef, written, key: str, plan: TorchZipPlan, starts: dict[str, int]) -> bool:
    """The written tensor reads the copy of its source's storage, found where it was written, the
    way the source did (an empty tensor has nothing to view)."""
    out = written.tensor_ref(key)
    if not ref.numel:
        return not out.numel
    record = f"data/{out.storage.key}"
    where = written.storage_range(out.storage)
    return (plan.storages.get(out.storage.key) == ref.storage.key and where is not None
            and where[1] == starts.get(record) and where[2] == ref.storage.nbytes
            and (out.offset, out.shape, out.stride, out.dtype) == (ref.offset, ref.shape, ref.stride, ref.dtype))


def _verify_remapped(source, written_path: str, mapping: dict[str, str], want: dict, options: dict,
                     wrapper: str | None, *, shown: str) -> None:
    """Reopen the written pickle: the planned names, shapes and dtypes, and every tensor equal, bit
    for bit, to its source (one pair in memory at a time). The written file is read at the same
    place inside the pickle as its source was; ``shown`` names it in errors."""
    import torch

    with open_checkpoint(written_path, select=wrapper or ".", inert=options["inert"]) as written:
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
        raise IntegrityError(problem[0], path=shown, key=problem[1], fix="check the disk; nothing was written")


def _raw_bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _replace_state(root, wrapper: str | None, state: dict, is_tensor: Callable[[object], bool], remap: RemapResult):
    """A shallow copy of ``root`` with the state dict at ``wrapper`` replaced (extras kept in place),
    each container keeping its type; a state dict's ``_metadata`` (module versions, which
    ``load_state_dict`` reads) follows the renamed modules."""
    copy = OrderedDict() if isinstance(root, OrderedDict) else {}
    if not wrapper:
        copy.update(state)
        copy.update((k, v) for k, v in root.items() if not is_tensor(v))
        metadata = getattr(root, "_metadata", None)
        if isinstance(metadata, dict):
            names = remap_module_names(metadata, remap.mapping, remap.dropped)
            copy._metadata = type(metadata)((names[m], v) for m, v in metadata.items() if m in names)
        return copy
    head, _, rest = wrapper.partition(".")
    copy.update(root)
    copy[head] = _replace_state(root[head], rest or None, state, is_tensor, remap)
    return copy


def _as_saved(checkpoint, key: str):
    """The tensor as the source pickled it: a parameter stays a parameter."""
    import torch

    tensor = checkpoint.tensor(key)
    return torch.nn.Parameter(tensor, requires_grad=False) if checkpoint.tensor_ref(key).parameter else tensor


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


_REMAP_WRITERS = {
    "safetensors": _remap_safetensors,
    "sharded-safetensors": _remap_safetensors,
    "torch-zip": _remap_pickle,
    "torch-legacy": _remap_pickle,
}

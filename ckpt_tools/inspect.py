"""inspect_checkpoint(source) -> InspectReport: what a checkpoint holds, read without its tensor bytes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import UsageError
from .formats import open_checkpoint
from .meta import TensorMeta
from .naming import collapse, module_prefix
from .render import chunk_text, human_bytes, human_count, markdown_table, rich_table
from .stats import StatsReport, checkpoint_stats

LEAF_ROWS = 40  # a listing this short shows every tensor, not module groups


@dataclass
class Group:
    """Tensors under one module prefix (numbered layers collapsed)."""

    name: str
    keys: int
    params: int
    nbytes: int
    dtypes: list[str]

    def row(self) -> list[object]:
        return [self.name, self.keys, human_count(self.params), human_bytes(self.nbytes), ",".join(self.dtypes)]


@dataclass
class InspectReport:
    html_kind = "inspect"  # the page ckpt_tools.html renders for it (--format html)

    source: str
    format: str
    wrapper: str | None
    tensors: dict[str, TensorMeta]
    aliases: list[list[str]] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bytes_read: int | None = None
    depth: int = 3
    selection: dict | None = None  # a pickle's: {"path", "file", "alternatives", "accounting"}
    not_executed: list[str] = field(default_factory=list)  # globals a pickle named, read inertly
    other_files: list[str] = field(default_factory=list)  # a folder's files beside the one read
    file_tensors: int | None = None  # every tensor the file holds, when it holds more than the listing
    show_keys: bool | None = None  # one row per tensor; None: when there are few (LEAF_ROWS)
    stats: StatsReport | None = None  # the values, with --stats
    chunks: dict[str, list[dict]] | None = None  # a DCP folder's: {key: [{file, rank, offsets, sizes, nbytes}]}

    @property
    def unique(self) -> dict[str, TensorMeta]:
        """Tensors with aliases counted once (the first name of each group stands for it)."""
        secondary = {name for group in self.aliases for name in group[1:]}
        return {k: v for k, v in self.tensors.items() if k not in secondary}

    @property
    def total_params(self) -> int:
        return sum(m.numel for m in self.unique.values())

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.unique.values())

    def groups(self) -> list[Group]:
        """Tensors by module prefix, numbered layers collapsed; a tied tensor counts once, in the
        group of its first name (as in the totals)."""
        by_prefix: dict[str, list[TensorMeta]] = {}
        for meta in self.unique.values():
            by_prefix.setdefault(module_prefix(meta.name, self.depth) or meta.name, []).append(meta)
        merged = collapse(by_prefix)
        return [_group(name, [m for p in members for m in by_prefix[p]]) for name, members in merged.items()]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "wrapper": self.wrapper,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
            "aliases": self.aliases,
            "extras": self.extras,
            "metadata": self.metadata,
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "groups": [{"name": g.name, "keys": g.keys, "params": g.params, "nbytes": g.nbytes,
                        "dtypes": g.dtypes} for g in self.groups()],
            "notes": self.notes,
            "bytes_read": self.bytes_read,
            "selection": self.selection,
            "not_executed": list(self.not_executed),
            "other_files": list(self.other_files),
            **({"stats": self.stats.to_dict()} if self.stats is not None else {}),
            **({"chunks": self.chunks} if self.chunks is not None else {}),
        }

    def _summary_lines(self) -> list[str]:
        where = f" (state dict under '{self.wrapper}')" if self.wrapper else ""
        lines = [f"source: {self.source}", f"format: {self.format}{where}",
                 f"tensors: {len(self.tensors)}, params: {_both(self.total_params, human_count)}, "
                 f"bytes: {_both(self.total_bytes, human_bytes)}"]
        if self.bytes_read is not None:
            lines.append(f"bytes read to list it: {self.bytes_read:,}")
        lines += [f"aliases: {' = '.join(group)}" for group in self.aliases]
        state_dicts = {a["select"] for a in (self.selection or {}).get("alternatives", ())}
        # another state dict is an entry beside the selection too, but its own note says more
        lines += [f"extra: {name} ({kind})" for name, kind in self.extras.items() if name not in state_dicts]
        lines += [f"metadata: {k} = {v[:120]}" for k, v in self.metadata.items()]
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def _leaves(self) -> bool:
        return self.show_keys if self.show_keys is not None else len(self.tensors) <= LEAF_ROWS

    def _table(self) -> tuple[list[str], list[list[object]]]:
        if self._leaves() and self.chunks is not None:
            return (["key", "shape", "dtype", "bytes", "chunks (rank: range)"],
                    [[m.name, "x".join(map(str, m.shape)) or "scalar", m.dtype, human_bytes(m.nbytes),
                      chunk_text(self.chunks.get(m.name, []))] for m in self.tensors.values()])
        if self._leaves():
            return (["key", "shape", "dtype", "bytes"],
                    [[m.name, "x".join(map(str, m.shape)) or "scalar", m.dtype, human_bytes(m.nbytes)]
                     for m in self.tensors.values()])
        return ["module", "keys", "params", "bytes", "dtypes"], [g.row() for g in self.groups()]

    def rich_table(self):
        from rich.console import Group as RichGroup
        from rich.text import Text

        headers, rows = self._table()
        table = rich_table(None, headers, rows, justify_right=("keys", "params", "bytes"))
        stats = [self.stats.rich_table()] if self.stats is not None else []
        return RichGroup(*(Text(line) for line in self._summary_lines()), table, *stats)

    def to_markdown(self) -> str:
        summary = "\n".join(f"- {line}" for line in self._summary_lines())
        headers, rows = self._table()
        stats = f"\n{self.stats.to_markdown()}" if self.stats is not None else ""
        return f"### {Path(self.source).name}\n\n{summary}\n\n{markdown_table(headers, rows)}\n{stats}"


def _both(n: int, short) -> str:
    """``1,234,567 (1.23M)``; a number short enough to need no abbreviation is written once."""
    text = short(n)
    return f"{n:,}" if text in (str(n), f"{n} B") else f"{n:,} ({text})"


def _group(name: str, metas: list[TensorMeta]) -> Group:
    return Group(name, len(metas), sum(m.numel for m in metas), sum(m.nbytes for m in metas),
                 sorted({m.dtype for m in metas}))


def listing(checkpoint: Checkpoint, source: str, *, pattern: str | None = None, depth: int = 3,
            show_keys: bool | None = None) -> InspectReport:
    """The InspectReport of an open checkpoint (``inspect_checkpoint`` and ``validate`` both list
    with it); ``pattern`` keeps the keys matching a glob and must match one."""
    tensors = checkpoint.metas()
    if pattern:
        tensors = {k: v for k, v in tensors.items() if fnmatch.fnmatchcase(k, pattern)}
        if not tensors:
            raise UsageError(f"--filter {pattern!r} matches none of the {len(checkpoint)} keys", path=source,
                             fix="globs match the whole key and are case-sensitive, e.g. 'perceiver.*'")
    aliases = [[n for n in group if n in tensors] for group in checkpoint.aliases]
    selection = checkpoint.selection
    chosen = {"path": checkpoint.wrapper, "file": checkpoint.picked,
              "alternatives": [a.to_dict() for a in checkpoint.alternatives],
              "accounting": checkpoint.accounting.to_dict() if checkpoint.accounting else None}
    if selection is None and checkpoint.picked is None:
        chosen = None
    layout = getattr(checkpoint, "chunk_layout", None)
    chunks = {k: v for k, v in layout().items() if k in tensors} if layout is not None else None
    return InspectReport(
        source=str(source), format=checkpoint.format, wrapper=checkpoint.wrapper, tensors=tensors,
        aliases=[g for g in aliases if len(g) > 1], extras=dict(checkpoint.extras),
        metadata=dict(checkpoint.metadata), notes=list(checkpoint.notes), bytes_read=checkpoint.bytes_read,
        depth=depth, selection=chosen, not_executed=sorted(checkpoint.not_executed),
        other_files=list(checkpoint.other_files), show_keys=show_keys, chunks=chunks)


def inspect_checkpoint(source: str | Path, *, filter: str | None = None, depth: int = 3,
                       keys: bool | None = None, select: str | None = None, inert: bool = False,
                       stats: bool = False, **remote) -> InspectReport:
    """List keys, shapes, dtypes, aliases, extras and metadata of any checkpoint without its bytes.

    ``filter``: a glob the keys must match (one must); ``keys``: one table row per tensor (by
    default when there are at most ``LEAF_ROWS``); ``select``/``inert``: as ``open_checkpoint``;
    ``remote``: hub options (``revision``, ``endpoint``, ``token``...); ``stats``: also read every
    listed tensor's values, one at a time (min, max, mean, std, NaN/Inf, zeros; ``stats.py``)."""
    with open_checkpoint(source, select=select, inert=inert, **remote) as ckpt:
        report = listing(ckpt, str(source), pattern=filter, depth=depth, show_keys=keys)
        if stats:
            report.stats = checkpoint_stats(ckpt, keys=list(report.tensors), depth=depth)
        return report

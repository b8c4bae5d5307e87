"""inspect_checkpoint(source) -> InspectReport: what a checkpoint holds, read without its tensor bytes."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from .formats import open_checkpoint
from .meta import TensorMeta
from .naming import collapse, module_prefix
from .render import human_bytes, human_count, markdown_table, rich_table


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
        by_prefix: dict[str, list[TensorMeta]] = {}
        for meta in self.tensors.values():
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
        }

    def _summary_lines(self) -> list[str]:
        lines = [f"source: {self.source}", f"format: {self.format}" + (f" (state dict under '{self.wrapper}')"
                                                                       if self.wrapper else ""),
                 f"tensors: {len(self.tensors)}, params: {self.total_params:,} ({human_count(self.total_params)}), "
                 f"bytes: {self.total_bytes:,} ({human_bytes(self.total_bytes)})"]
        if self.bytes_read is not None:
            lines.append(f"bytes read to list it: {self.bytes_read:,}")
        lines += [f"aliases: {' = '.join(group)}" for group in self.aliases]
        lines += [f"extra: {name} ({kind})" for name, kind in self.extras.items()]
        lines += [f"metadata: {k} = {v[:120]}" for k, v in self.metadata.items()]
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def rich_table(self):
        from rich.console import Group as RichGroup
        from rich.text import Text

        table = rich_table(None, ["module", "keys", "params", "bytes", "dtypes"],
                           [g.row() for g in self.groups()], justify_right=("keys", "params", "bytes"))
        return RichGroup(*(Text(line) for line in self._summary_lines()), table)

    def to_markdown(self) -> str:
        summary = "\n".join(f"- {line}" for line in self._summary_lines())
        table = markdown_table(["module", "keys", "params", "bytes", "dtypes"], [g.row() for g in self.groups()])
        return f"### {Path(self.source).name}\n\n{summary}\n\n{table}\n"


def _group(name: str, metas: list[TensorMeta]) -> Group:
    return Group(name, len(metas), sum(m.numel for m in metas), sum(m.nbytes for m in metas),
                 sorted({m.dtype for m in metas}))


def inspect_checkpoint(source: str | Path, *, filter: str | None = None, depth: int = 3,
                       **options) -> InspectReport:
    """List keys, shapes, dtypes, aliases, extras and metadata of any checkpoint without its bytes."""
    with open_checkpoint(source, **options) as ckpt:
        tensors = ckpt.metas()
        if filter:
            tensors = {k: v for k, v in tensors.items() if fnmatch.fnmatchcase(k, filter)}
        aliases = [[n for n in group if n in tensors] for group in ckpt.aliases]
        return InspectReport(
            source=str(source), format=ckpt.format, wrapper=ckpt.wrapper, tensors=tensors,
            aliases=[g for g in aliases if len(g) > 1], extras=dict(ckpt.extras), metadata=dict(ckpt.metadata),
            notes=list(ckpt.notes), bytes_read=getattr(ckpt, "bytes_read", None), depth=depth)

"""One renderer for every report: table (rich), json, markdown.

A report is any object with ``to_dict() -> dict`` (the stable JSON schema), ``to_markdown() -> str``
and ``rich_table() -> renderable`` (what a terminal shows). ``render(report, fmt)`` picks one and
writes it to stdout; progress and logs go to stderr elsewhere, so JSON output pipes cleanly.
"""

from __future__ import annotations

import json
import sys
from typing import Protocol, TextIO

FORMATS = ("table", "json", "markdown")


class Report(Protocol):
    def to_dict(self) -> dict: ...
    def to_markdown(self) -> str: ...
    def rich_table(self): ...


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str)


def render(report: Report, fmt: str = "table", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if fmt == "json":
        stream.write(to_json(report) + "\n")
    elif fmt == "markdown":
        stream.write(report.to_markdown().rstrip("\n") + "\n")
    elif fmt == "table":
        from rich.console import Console

        width = None if stream.isatty() else 160
        Console(file=stream, width=width, soft_wrap=False).print(report.rich_table())
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str | None, headers: list[str], rows: list[list[object]], *,
               justify_right: tuple[str, ...] = ()):
    """A rich table whose cells are plain text: a key such as ``blocks.[0]`` or a path holding
    ``[bold]`` is shown as written, never read as markup."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title) if title else None, title_justify="left", show_lines=False)
    for header in headers:
        table.add_column(Text(header), justify="right" if header in justify_right else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(*(Text(str(v)) for v in row))
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def plural(n: int, word: str) -> str:
    """``1 tensor``, ``2 tensors``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def chunk_text(chunks: list[dict]) -> str:
    """``0: 0-129, 1: 129-257`` (what each rank wrote along the one dimension the chunks split;
    ``dim 1:`` first when it is not the first), or how many chunks there are."""
    split = [d for d in range(len(chunks[0]["offsets"]) if chunks else 0)
             if len({c["offsets"][d] for c in chunks}) > 1]
    if len(split) != 1:
        return f"{len(chunks)} chunk{'' if len(chunks) == 1 else 's'}"
    d = split[0]
    parts = [f"{'?' if c['rank'] is None else c['rank']}: {c['offsets'][d]}-{c['offsets'][d] + c['sizes'][d]}"
             for c in chunks[:4]]
    return ("" if d == 0 else f"dim {d}: ") + ", ".join(parts) + (f" (+{len(chunks) - 4})" if len(chunks) > 4 else "")

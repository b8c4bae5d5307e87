"""Key names: module prefixes, and numbered layers collapsed into ranges.

``lang_encoder.transformer.blocks.3.attn`` and ``...blocks.7.attn`` become one group
``lang_encoder.transformer.blocks.{3,7}.attn``; runs of consecutive numbers become ``{0..23}``.
Used by every report that groups keys by module (inspect, diff coverage, provenance).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def module_prefix(key: str, depth: int | None = None) -> str:
    """The module part of a parameter name (drop the last segment), cut to ``depth`` segments
    where the count ignores numeric segments (``blocks.3`` counts as one)."""
    parts = key.split(".")
    module = parts[:-1] or parts
    if depth is None:
        return ".".join(module)
    out: list[str] = []
    named = 0
    for part in module:
        if not part.isdigit():
            if named == depth:
                break
            named += 1
        out.append(part)
    return ".".join(out)


def layer_pattern(name: str) -> tuple[str, tuple[int, ...]]:
    """``a.3.b.12.c`` -> (``a.{}.b.{}.c``, (3, 12))."""
    numbers = tuple(int(m) for m in _NUMBER.findall(name))
    return _NUMBER.sub("{}", name), numbers


def format_numbers(numbers: Iterable[int]) -> str:
    """{0,1,2,3,7} -> ``0..3,7``; runs of three or more become ranges."""
    values = sorted(set(numbers))
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f"{values[i]}..{values[j]}")
        else:
            out.extend(str(v) for v in values[i:j + 1])
        i = j + 1
    return ",".join(out)


def collapse(names: Iterable[str]) -> dict[str, list[str]]:
    """Group names that differ only in their numeric segments.

    Returns ``{collapsed_name: [member names...]}`` in first-seen order. Only the last numeric
    segment that varies is collapsed per group, which keeps nested layers (``layers.0.1``) readable.
    """
    groups: dict[tuple[str, tuple], list[tuple[tuple[int, ...], str]]] = {}
    for name in names:
        pattern, numbers = layer_pattern(name)
        groups.setdefault((pattern, len(numbers)), []).append((numbers, name))
    out: dict[str, list[str]] = {}
    for (pattern, count), members in groups.items():
        if count == 0 or len(members) == 1:
            for _, name in members:
                out[name] = [name]
            continue
        columns = list(zip(*(nums for nums, _ in members), strict=True))
        parts = []
        for column in columns:
            distinct = set(column)
            parts.append(str(column[0]) if len(distinct) == 1 else "{" + format_numbers(distinct) + "}")
        out[pattern.format(*parts)] = [name for _, name in members]
    return out

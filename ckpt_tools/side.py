"""Side: one side of a key diff, as data: tensors by name, which names are one tensor, which are
trained, and what the target itself re-creates.

A checkpoint, a model (real or on the meta device), a key listing (a preset's shipped one, or a
target's cached one) or a mapping of TensorMeta all become a Side, so the diff, the listing cache
and the planners work on the same plain value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .meta import TensorMeta


@dataclass
class Side:
    """One side of a diff: tensors by name, alias groups, and which names are trained."""

    label: str
    metas: dict[str, TensorMeta]
    groups: list[list[str]]  # every name in exactly one group, first name = canonical
    trainable: dict[str, bool] | None = None  # None: unknown (a checkpoint), treat as required
    model: Any = None  # the nn.Module, when the side is one
    preset: Any = None  # the ModelPreset it came from, if any
    source: str | None = None  # the SOURCE of a checkpoint side (to read its values again)
    # names the target may lack in a checkpoint because the model re-creates them (a tie it makes
    # itself, transformers' _keys_to_ignore_on_load_missing), with why
    expected: dict[str, str] = field(default_factory=dict)
    # regexes (searched) of checkpoint keys the model re-creates or ignores when loading (its
    # non-persistent buffers, transformers' _keys_to_ignore_on_load_unexpected): neither loaded nor wrong
    ignored: list[str] = field(default_factory=list)


def groups_from_aliases(names: Iterable[str], aliases: Iterable[Sequence[str]]) -> list[list[str]]:
    first_of: dict[str, list[str]] = {}
    for group in aliases:
        members = list(group)
        for name in members:
            first_of[name] = members
    seen: set[str] = set()
    out: list[list[str]] = []
    for name in names:
        if name in seen:
            continue
        group = [n for n in first_of.get(name, [name]) if n not in seen] or [name]
        seen.update(group)
        out.append(group)
    return out

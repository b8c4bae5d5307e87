"""The conversion plan, computed from TensorMeta before a byte is written.

Which tensors are written under which names and dtypes (the remap rules applied, aliases stored
once), how they are split into shards, and where the files go. ``plan_conversion`` returns it as a
value, so a dry run, a test or a benchmark can look at it without writing anything; ``convert.py``
carries it out.

Aliases (names that view one tensor, e.g. tied weights or the cross-attention tensors that
OpenFlamingo v1 files hold twice) are stored once. The name kept is the one the rules point to
(the one an explicit ``rename`` produced, or the one left when a ``drop`` removed the others),
else the first name in the checkpoint; each removed name is recorded so a loader can restore it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .fs import check_output_name
from .meta import FLOAT_DTYPES, TensorMeta
from .remap import RemapResult, Rule, apply_remap

INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_SIZE = "5GB"  # what a folder DST gets without --max-shard-size (transformers' long-time default)
DTYPE_CHOICES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32",
                 "bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32"}  # torch's names
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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


def destination_of(dst: str | Path, max_shard_size: str | int | None) -> Destination:
    text = str(dst)
    path = Path(text)
    folder = path.is_dir() or text.endswith(("/", os.sep))
    if max_shard_size is not None and path.suffix == ".safetensors" and not path.is_dir():
        raise UsageError("--max-shard-size writes a folder of shards, not one .safetensors file", path=text,
                         fix="pass a folder as DST (e.g. out/) or drop --max-shard-size")
    if max_shard_size is not None or folder:
        return Destination(path, True, parse_size(max_shard_size or DEFAULT_SHARD_SIZE))
    check_output_name(path, "safetensors")
    return Destination(path, False, None)


@dataclass
class ConversionPlan:
    """Everything a conversion will write: the remap's outcome, the aliases stored once, the
    tensors per output file, and the files (shards, then the index) in order."""

    remap: RemapResult
    aliases: dict[str, str]  # removed alias -> the stored name it points to
    tensors: list[Planned]
    shards: list[list[Planned]]
    destination: Destination
    dtype: str | None
    dropped: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[Path]:
        return self.destination.file_names(len(self.shards))

    @property
    def bytes(self) -> int:
        return sum(item.meta.nbytes for item in self.tensors)


def plan_conversion(metas: Mapping[str, TensorMeta], aliases: Iterable[Sequence[str]], rules: Sequence[Rule] | None,
                    dst: str | Path, *, dtype: str | None = None,
                    max_shard_size: str | int | None = None, source: str | None = None) -> ConversionPlan:
    """The plan for converting a checkpoint listed by ``metas`` (with its alias groups) to ``dst``."""
    target_dtype = resolve_dtype(dtype)
    destination = destination_of(dst, max_shard_size)
    remap = apply_remap(list(metas), rules).require_kept(source)
    aliases = list(aliases)
    removed = resolve_aliases(aliases, remap)
    tensors = plan_tensors(dict(metas), remap, removed, target_dtype)
    return ConversionPlan(remap, removed, tensors, plan_shards(tensors, destination.max_bytes), destination,
                          target_dtype, dropped_keys(remap, aliases))

"""What the values hold: tensor statistics, value diffs between checkpoints, and health checks.

Everything here streams: one tensor at a time from any object with the Checkpoint API (``keys()``,
``meta(key)``, ``tensor(key)``), and each tensor in fixed-size chunks of its flattened values
(``chunk_elems`` elements), upcast to float64 per chunk. Per-chunk results are merged exactly
(counts and sums add, extremes compare, variances merge by Chan et al.'s parallel formula), so a
module's figures are those of all its values together, never an average of averages, and memory
stays near one chunk however big the tensor.

Conventions, shared by every report:
- min, max, mean, std (population, ddof 0) and abs_mean are over the finite values; NaN and Inf are
  counted apart. A tensor with no finite value has None (JSON null) for them, never NaN.
- Integer and U8 tensors keep exact min/max (Python ints); their moments are in float64. BOOL is
  read as 0/1, so its mean is the fraction true. Complex tensors are described by magnitude
  (``basis: magnitude``) and compared as pairs of real numbers.
- zero_fraction counts exact zeros (both signs) among all values.
- Value diffs (a against b): relative change ||a-b|| / ||b|| is 0 when both are zero and infinite
  (JSON null) when only b is; cosine similarity is 1 when both are zero and 0 when one is.
  Positions where either side is NaN or Inf are left out of the numbers and counted in
  ``nonfinite``; where the sides differ there (1.0 against NaN, NaN against Inf) they are counted
  in ``nonfinite_changed`` and the relative change is infinite. Bitwise identity compares raw bytes, so equal NaN payloads count as identical;
  tensors of different dtypes are compared after the upcast and are never bitwise identical.

torch is imported inside the functions that touch values, so importing this module stays cheap.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .errors import UsageError
from .meta import dtype_name
from .naming import collapse, module_prefix
from .render import human_count, markdown_table, plural, rich_table

# 4M elements: two 32 MB float64 buffers. Each torch call on a chunk is one parallel region whose
# threads must all get a core; on a machine with other work those waits dominate small chunks.
# Measured on a 1 GB .pt, 2 cores: idle 256K 0.33 s, 1M 0.47 s, 4M 0.51 s; with other processes
# busy, median of six 256K 4 s, 1M 1 s, 4M 0.6 s.
DEFAULT_CHUNK_ELEMS = 1 << 22
DEFAULT_DEPTH = 3

# Unsigned dtypes read as int64 first: torch has no min/max for them (U64 gets its own path, BOOL is
# viewed as uint8).
_READ_AS = {"U16": "int64", "U32": "int64"}
_COMPLEX = frozenset({"C64", "C128"})
_INTEGER = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"})


# --- small helpers ---------------------------------------------------------------------------------


def _check_chunk_elems(chunk_elems: int) -> int:
    if not isinstance(chunk_elems, int) or isinstance(chunk_elems, bool) or chunk_elems < 1:
        raise UsageError(f"chunk_elems must be a positive whole number of elements, not {chunk_elems!r}",
                         fix=f"pass a chunk size such as {DEFAULT_CHUNK_ELEMS}")
    return chunk_elems


def _json_number(value):
    """Floats that JSON cannot hold (NaN, Inf) become None; everything else passes through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.3g}%"


def _chunks(tensor, size: int, flat: bool | None = None) -> Iterator:
    """1-D pieces of ``tensor`` in row-major order, at most ``size`` elements each.

    A contiguous tensor is sliced as a flat view (no copy). A strided one (a transposed weight in a
    pickle) is cut along its leading dimension and each piece copied, so no full copy is made.
    ``flat=False`` forces the row cut: two tensors of one shape then get the same boundaries.
    """
    if tensor.numel() == 0:
        return
    if tensor.dim() == 0:
        yield tensor.reshape(1)
        return
    if tensor.is_contiguous() if flat is None else flat:
        values = tensor.view(-1)
        for start in range(0, values.numel(), size):
            yield values[start:start + size]
        return
    row = tensor[0].numel()
    if row > size:
        for part in tensor:
            yield from _chunks(part, size, flat=False)
        return
    step = max(1, size // row)
    for start in range(0, tensor.shape[0], step):
        yield tensor[start:start + step].reshape(-1)


def _group_names(names: Iterable[str], depth: int) -> dict[str, list[str]]:
    """{module (numbered layers collapsed): [tensor names]} as ``inspect`` groups them."""
    by_prefix: dict[str, list[str]] = {}
    for name in names:
        by_prefix.setdefault(module_prefix(name, depth) or name, []).append(name)
    return {group: [n for p in prefixes for n in by_prefix[p]] for group, prefixes in collapse(by_prefix).items()}


def _dtype(tensor) -> str:
    return dtype_name(tensor.dtype)


# --- per-chunk numbers ---------------------------------------------------------------------------------


@dataclass
class Accumulator:
    """Streaming statistics of some values; ``merge`` combines two exactly."""

    numel: int = 0
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    finite: int = 0
    mean: float = 0.0   # of the finite values
    m2: float = 0.0     # sum of squared deviations from ``mean``
    abs_sum: float = 0.0
    minimum: float | int | None = None
    maximum: float | int | None = None
    chunks: int = 0

    def merge(self, other: Accumulator) -> Accumulator:
        n = self.finite + other.finite
        delta = other.mean - self.mean
        if n:
            mean = self.mean + delta * (other.finite / n)
            m2 = self.m2 + other.m2 + delta * delta * (self.finite * other.finite / n)
        else:
            mean, m2 = 0.0, 0.0
        return Accumulator(
            numel=self.numel + other.numel, nan=self.nan + other.nan, inf=self.inf + other.inf,
            zeros=self.zeros + other.zeros, finite=n, mean=mean, m2=m2, abs_sum=self.abs_sum + other.abs_sum,
            minimum=_pick(min, self.minimum, other.minimum), maximum=_pick(max, self.maximum, other.maximum),
            chunks=self.chunks + other.chunks)

    @property
    def std(self) -> float | None:
        return math.sqrt(max(self.m2, 0.0) / self.finite) if self.finite else None

    @property
    def abs_mean(self) -> float | None:
        return self.abs_sum / self.finite if self.finite else None

    @property
    def zero_fraction(self) -> float | None:
        return self.zeros / self.numel if self.numel else None

    @property
    def all_zero(self) -> bool:
        return self.numel > 0 and self.zeros == self.numel

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def figures(self) -> dict:
        """The numbers every report shows, JSON-safe."""
        return {
            "min": _json_number(self.minimum), "max": _json_number(self.maximum),
            "mean": _json_number(self.mean) if self.finite else None,
            "std": _json_number(self.std), "abs_mean": _json_number(self.abs_mean),
            "nan": self.nan, "inf": self.inf, "zero_fraction": self.zero_fraction,
        }


def _pick(choose, a, b):
    if a is None:
        return b
    return a if b is None else choose(a, b)


class Scratch:
    """Float64 buffers the chunk kernels reuse from chunk to chunk.

    A fresh allocation per chunk is handed back to the OS when freed and faulted in again for the
    next chunk; that page-fault traffic costs more than the arithmetic, so each call of a public
    function keeps two buffers of ``chunk_elems`` for all its chunks.
    """

    def __init__(self, chunk_elems: int) -> None:
        self.chunk_elems = chunk_elems
        self._buffers: list = [None, None]

    def buffer(self, index: int, n: int):
        """The first ``n`` elements of buffer ``index`` (0 or 1)."""
        import torch

        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < n:  # complex values as pairs need twice the chunk
            buffer = self._buffers[index] = torch.empty(max(n, self.chunk_elems), dtype=torch.float64)
        return buffer[:n]

    def take(self, index: int, source):
        """Buffer ``index`` holding ``source`` (a 1-D tensor) converted to float64."""
        return self.buffer(index, source.numel()).copy_(source)


def _moments(values, scratch: Scratch) -> tuple[float, float, float, int]:
    """(mean, m2, abs_sum, nonzero) of a finite 1-D float64 tensor, which is overwritten.

    Two passes over a chunk that is in cache: the sum first, then squared deviations from the exact
    chunk mean (stable even when the mean dwarfs the spread). sign(x)·x is |x| and sign(x)² is 1 for
    each non-zero value, so two dot products give the absolute sum and the non-zero count exactly.
    """
    import torch

    n = values.numel()
    mean = float(values.sum()) / n
    sign = torch.sign(values, out=scratch.buffer(1, n))
    abs_sum = float(torch.dot(sign, values))
    nonzero = int(torch.dot(sign, sign))
    values.sub_(mean)
    return mean, float(torch.dot(values, values)), abs_sum, nonzero


def _split_nonfinite(values) -> tuple[object, int, int]:
    """(finite values, NaN count, Inf count) of a float64 tensor."""
    import torch

    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return values[torch.isfinite(values)], nan, inf


def _int_bounds(chunk, dtype: str) -> tuple[int, int]:
    """Exact min and max of an integer chunk as Python ints."""
    import torch

    if dtype != "U64":
        low, high = torch.aminmax(chunk)
        return int(low), int(high)
    # torch has no min/max for uint64: as int64, values of 2**63 and above are the negative ones.
    signed = chunk.view(torch.int64)
    big = signed[signed < 0]
    small = signed[signed >= 0]
    low = int(small.min()) if small.numel() else int(big.min()) + 2**64
    high = int(big.max()) + 2**64 if big.numel() else int(small.max())
    return low, high


def _readable(chunk, dtype: str):
    """The chunk as something the kernel can do arithmetic on (see ``_READ_AS``; complex: magnitude)."""
    import torch

    if dtype in _COMPLEX:
        return chunk.abs()
    if dtype == "BOOL":
        return chunk.view(torch.uint8)
    if dtype in _READ_AS:
        return chunk.to(getattr(torch, _READ_AS[dtype]))
    return chunk


def chunk_accumulator(chunk, dtype: str, scratch: Scratch) -> Accumulator:
    """Statistics of one 1-D chunk whose safetensors dtype name is ``dtype``."""
    import torch

    readable = _readable(chunk, dtype)
    values = scratch.take(0, readable)
    acc = Accumulator(numel=values.numel(), chunks=1)
    if dtype in _INTEGER:
        acc.minimum, acc.maximum = _int_bounds(readable, dtype)
    else:
        low, high = (float(v) for v in torch.aminmax(values))
        if not (math.isfinite(low) and math.isfinite(high)):  # NaN propagates, so this catches both
            values, acc.nan, acc.inf = _split_nonfinite(values)
            low, high = (float(v) for v in torch.aminmax(values)) if values.numel() else (None, None)
        acc.minimum, acc.maximum = low, high
    acc.finite = values.numel()
    if acc.finite:
        acc.mean, acc.m2, acc.abs_sum, nonzero = _moments(values, scratch)
        acc.zeros = acc.finite - nonzero
    return acc


def _chunk_nonfinite(chunk, dtype: str, scratch: Scratch) -> tuple[int, int]:
    """(NaN, Inf) counts of one chunk. One summing pass answers "none" for almost every chunk (a NaN or
    Inf makes the sum non-finite); only a chunk whose sum is not finite is counted value by value."""
    import torch

    if dtype in _INTEGER:
        return 0, 0
    values = chunk.abs() if dtype in _COMPLEX else chunk
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    if math.isfinite(float(values.sum(dtype=accumulate))):
        return 0, 0
    values = scratch.take(0, values)  # float64: isinf has no F8_E4M3 kernel
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def count_nonfinite(tensor, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                    scratch: Scratch | None = None) -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor, at about the cost of reading it once."""
    import torch

    _check_chunk_elems(chunk_elems)
    scratch = scratch or Scratch(chunk_elems)
    dtype = _dtype(tensor)
    nan = inf = 0
    with torch.no_grad():
        for chunk in _chunks(tensor.detach(), chunk_elems):
            more_nan, more_inf = _chunk_nonfinite(chunk, dtype, scratch)
            nan, inf = nan + more_nan, inf + more_inf
    return nan, inf


# --- statistics reports ----------------------------------------------------------------------------------


@dataclass
class TensorStats:
    name: str
    dtype: str
    shape: tuple[int, ...]
    acc: Accumulator

    @property
    def basis(self) -> str:
        return "magnitude" if self.dtype in _COMPLEX else "value"

    @property
    def chunks(self) -> int:
        return self.acc.chunks

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "numel": self.acc.numel, **self.acc.figures(),
                "basis": self.basis, "chunks": self.acc.chunks}

    def row(self) -> list[object]:
        f = self.acc.figures()
        return [self.name, self.dtype, _fmt(f["min"]), _fmt(f["max"]), _fmt(f["mean"]), _fmt(f["std"]),
                _fmt(f["abs_mean"]), _fmt(f["nan"]), _fmt(f["inf"]), _percent(f["zero_fraction"])]


@dataclass
class ModuleStats:
    """Tensors under one module prefix (numbered layers collapsed), their values taken together."""

    name: str
    tensors: int
    dtypes: list[str]
    acc: Accumulator

    def to_dict(self) -> dict:
        return {"name": self.name, "tensors": self.tensors, "numel": self.acc.numel, "dtypes": self.dtypes,
                **self.acc.figures()}

    def row(self) -> list[object]:
        f = self.acc.figures()
        return [self.name, self.tensors, human_count(self.acc.numel), _fmt(f["min"]), _fmt(f["max"]),
                _fmt(f["mean"]), _fmt(f["std"]), _fmt(f["abs_mean"]), _fmt(f["nan"]), _fmt(f["inf"]),
                _percent(f["zero_fraction"])]


TENSOR_HEADERS = ["tensor", "dtype", "min", "max", "mean", "std", "abs mean", "NaN", "Inf", "zeros"]
MODULE_HEADERS = ["module", "tensors", "values", "min", "max", "mean", "std", "abs mean", "NaN", "Inf", "zeros"]


class _ByModule:
    """How both value reports render: summary lines, a table by module, then one by tensor (the
    subclass names them and gives ``summary_lines``, ``modules()`` and ``tensors``)."""

    _title: str
    _heading: str
    _module_headers: list[str]
    _tensor_headers: list[str]

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        table = rich_table(self._title, self._module_headers, [m.row() for m in self.modules()],
                           justify_right=tuple(self._module_headers[1:]))
        return Group(*(Text(line) for line in self.summary_lines()), table)

    def to_markdown(self) -> str:
        summary = "\n".join(f"- {line.strip()}" for line in self.summary_lines())
        modules = markdown_table(self._module_headers, [m.row() for m in self.modules()])
        tensors = markdown_table(self._tensor_headers, [t.row() for t in self.tensors.values()])
        return f"### {self._heading}\n\n{summary}\n\n{modules}\n\n#### Tensors\n\n{tensors}\n"


@dataclass
class StatsReport(_ByModule):
    source: str
    tensors: dict[str, TensorStats]
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    depth: int = DEFAULT_DEPTH

    def modules(self) -> list[ModuleStats]:
        out = []
        for name, members in _group_names(self.tensors, self.depth).items():
            acc = Accumulator()
            for member in members:
                acc = acc.merge(self.tensors[member].acc)
            out.append(ModuleStats(name, len(members), sorted({self.tensors[m].dtype for m in members}), acc))
        return out

    @property
    def nonfinite(self) -> list[str]:
        return [name for name, t in self.tensors.items() if t.acc.nonfinite]

    @property
    def all_zero(self) -> list[str]:
        return [name for name, t in self.tensors.items() if t.acc.all_zero]

    def to_dict(self) -> dict:
        return {"tensors": {name: t.to_dict() for name, t in self.tensors.items()},
                "modules": [m.to_dict() for m in self.modules()],
                "nonfinite": self.nonfinite, "all_zero": self.all_zero, "chunk_elems": self.chunk_elems}

    def summary_lines(self) -> list[str]:
        numel = sum(t.acc.numel for t in self.tensors.values())
        lines = [f"values: {plural(len(self.tensors), 'tensor')}, {plural(numel, 'value')}, read in chunks of "
                 f"{self.chunk_elems:,} values"]
        for group, members in collapse(self.nonfinite).items():  # numbered layers on one line
            nan = sum(self.tensors[m].acc.nan for m in members)
            inf = sum(self.tensors[m].acc.inf for m in members)
            lines.append(f"NaN/Inf: {group} ({nan:,} NaN, {inf:,} Inf)")
        lines += [f"all zero: {name}" for name in collapse(self.all_zero)]
        lines += [f"magnitude: {name} is complex; its figures describe |x|"
                  for name, t in self.tensors.items() if t.basis == "magnitude"]
        return lines

    _title, _heading, _module_headers, _tensor_headers = "values by module", "Values", MODULE_HEADERS, TENSOR_HEADERS


def tensor_stats(name: str, tensor, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 scratch: Scratch | None = None) -> TensorStats:
    """Statistics of one tensor, read chunk by chunk (``scratch``: buffers to reuse across calls)."""
    import torch

    _check_chunk_elems(chunk_elems)
    scratch = scratch or Scratch(chunk_elems)
    dtype = _dtype(tensor)
    acc = Accumulator()
    with torch.no_grad():
        for chunk in _chunks(tensor.detach(), chunk_elems):
            acc = acc.merge(chunk_accumulator(chunk, dtype, scratch))
    return TensorStats(name, dtype, tuple(tensor.shape), acc)


def _alias_of(checkpoint, names: list[str]) -> dict[str, str]:
    """{secondary name: the first name of its alias group} for names that share one tensor."""
    wanted = set(names)
    out = {}
    for group in getattr(checkpoint, "aliases", None) or []:
        present = [n for n in group if n in wanted]
        out.update({n: present[0] for n in present[1:]})
    return out


def _select(checkpoint, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        return list(checkpoint.keys())
    known = set(checkpoint.keys())
    missing = [k for k in keys if k not in known]
    if missing:
        raise UsageError(f"no tensor named {missing[0]!r} in the checkpoint" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                         path=getattr(checkpoint, "source", None), key=missing[0],
                         fix="run `ckpt inspect` to list its keys")
    return list(keys)


def checkpoint_stats(checkpoint, *, keys: Sequence[str] | None = None,
                     chunk_elems: int = DEFAULT_CHUNK_ELEMS, depth: int = DEFAULT_DEPTH) -> StatsReport:
    """Statistics of every tensor of ``checkpoint`` (or of ``keys``), one tensor in memory at a time.

    Names that share one tensor (``checkpoint.aliases``) are read once.
    """
    _check_chunk_elems(chunk_elems)
    names = _select(checkpoint, keys)
    aliases = _alias_of(checkpoint, names)
    scratch = Scratch(chunk_elems)
    out: dict[str, TensorStats] = {}
    for name in names:
        if name in aliases:
            continue
        tensor = checkpoint.tensor(name)
        out[name] = tensor_stats(name, tensor, chunk_elems=chunk_elems, scratch=scratch)
        del tensor  # before the next read: never two tensors at once
    for name, first in aliases.items():
        out[name] = replace(out[first], name=name)
    return StatsReport(str(getattr(checkpoint, "source", "")), {n: out[n] for n in names}, chunk_elems, depth)


# --- value diffs ----------------------------------------------------------------------------------------


@dataclass
class DiffAccumulator:
    """Streaming comparison of a against b; ``merge`` combines two exactly."""

    numel: int = 0
    compared: int = 0      # positions where both sides are finite
    nonfinite: int = 0     # positions where either side is NaN or Inf (left out of the numbers)
    nonfinite_changed: int = 0  # of those, where the sides differ (1.0 against NaN): an infinite change
    identical: bool = True
    max_abs: float = 0.0
    abs_sum: float = 0.0   # sum |a-b|
    dd: float = 0.0        # ||a-b||²
    aa: float = 0.0        # ||a||²
    bb: float = 0.0        # ||b||²
    ab: float = 0.0        # a·b
    chunks: int = 0

    def merge(self, other: DiffAccumulator) -> DiffAccumulator:
        return DiffAccumulator(
            numel=self.numel + other.numel, compared=self.compared + other.compared,
            nonfinite=self.nonfinite + other.nonfinite,
            nonfinite_changed=self.nonfinite_changed + other.nonfinite_changed,
            identical=self.identical and other.identical,
            max_abs=max(self.max_abs, other.max_abs), abs_sum=self.abs_sum + other.abs_sum,
            dd=self.dd + other.dd, aa=self.aa + other.aa, bb=self.bb + other.bb, ab=self.ab + other.ab,
            chunks=self.chunks + other.chunks)

    @property
    def relative_change(self) -> float:
        """||a-b|| / ||b|| over the finite pairs; 0 when both are zero, infinite when only b is, or
        when a value turned NaN or Inf (or back)."""
        if self.nonfinite_changed:
            return math.inf
        if self.bb == 0:
            return 0.0 if self.dd == 0 else math.inf
        return math.sqrt(self.dd) / math.sqrt(self.bb)

    @property
    def cosine(self) -> float:
        """a·b / (||a|| ||b||); 1 when both are zero, 0 when one is, NaN (no number) when a value
        turned NaN or Inf."""
        if self.nonfinite_changed:
            return math.nan
        if self.aa == 0 or self.bb == 0:
            return 1.0 if self.aa == self.bb else 0.0
        return max(-1.0, min(1.0, self.ab / (math.sqrt(self.aa) * math.sqrt(self.bb))))

    def figures(self) -> dict:
        return {
            "max_abs_diff": self.max_abs if self.compared else None,
            "mean_abs_diff": self.abs_sum / self.compared if self.compared else None,
            "relative_change": _json_number(self.relative_change), "cosine": _json_number(self.cosine),
            "nonfinite": self.nonfinite, "nonfinite_changed": self.nonfinite_changed,
        }


def _comparable(chunk, dtype: str):
    """A chunk as numbers to compare: complex values as (real, imaginary) pairs, BOOL as 0/1."""
    import torch

    if dtype in _COMPLEX:
        return torch.view_as_real(chunk).reshape(-1)
    return _readable(chunk, dtype)


def _bitwise_equal(a, b) -> bool:
    import torch

    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _finite_pairs(a, b):
    """Drop the positions where either side is not finite: (a, b, how many were dropped, how many
    of those differ: a finite value against NaN or Inf, NaN against Inf, +Inf against -Inf)."""
    import torch

    keep = torch.isfinite(a) & torch.isfinite(b)
    x, y = a[~keep], b[~keep]
    alike = (x == y) | (torch.isnan(x) & torch.isnan(y))
    return a[keep], b[keep], int(x.numel()), int(x.numel() - alike.sum())


def _square(values) -> float:
    import torch

    return float(torch.dot(values, values))


def chunk_diff(a, b, dtype_a: str, dtype_b: str, scratch: Scratch) -> DiffAccumulator:
    """Comparison of two aligned 1-D chunks."""
    import torch

    same = dtype_a == dtype_b and _bitwise_equal(a, b)
    x = scratch.take(0, _comparable(a, dtype_a))
    y = x if same else scratch.take(1, _comparable(b, dtype_b))
    aa = _square(x)
    bb = aa if same else _square(y)
    dropped = mismatched = 0
    if not math.isfinite(aa + bb):  # a NaN or Inf on either side (the norms double as the test)
        x, y, dropped, mismatched = _finite_pairs(x, y)
        aa, bb = _square(x), _square(y)
    acc = DiffAccumulator(numel=a.numel(), compared=x.numel(), nonfinite=dropped,
                          nonfinite_changed=0 if same else mismatched, identical=same,
                          aa=aa, bb=bb, ab=aa, chunks=1)
    if same or not x.numel():  # a == b: the norms give every number
        return acc
    acc.ab = float(torch.dot(x, y))
    diff = x.sub_(y)
    acc.dd = _square(diff)
    diff.abs_()
    acc.max_abs, acc.abs_sum = float(diff.max()), float(diff.sum())
    return acc


@dataclass
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    acc: DiffAccumulator

    @property
    def upcast(self) -> bool:
        return self.dtype_a != self.dtype_b

    @property
    def identical(self) -> bool:
        return self.acc.identical and not self.upcast

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype_a": self.dtype_a, "dtype_b": self.dtype_b,
                "numel": self.acc.numel, "identical": self.identical, **self.acc.figures(),
                "upcast": self.upcast, "chunks": self.acc.chunks}

    def row(self) -> list[object]:
        f = self.acc.figures()
        dtype = self.dtype_a if not self.upcast else f"{self.dtype_a} vs {self.dtype_b}"
        return [self.name, dtype, _fmt(self.identical), _fmt(f["max_abs_diff"]), _fmt(f["mean_abs_diff"]),
                _fmt(self.acc.relative_change), _fmt(f["cosine"]), _fmt(f["nonfinite"])]


@dataclass
class ModuleDiff:
    name: str
    tensors: list[TensorDiff]

    @property
    def acc(self) -> DiffAccumulator:
        acc = DiffAccumulator()
        for t in self.tensors:
            acc = acc.merge(t.acc)
        return acc

    @property
    def identical(self) -> int:
        return sum(t.identical for t in self.tensors)

    @property
    def identical_fraction(self) -> float:
        return self.identical / len(self.tensors)

    @property
    def mean_relative_change(self) -> float:
        return sum(t.acc.relative_change for t in self.tensors) / len(self.tensors)

    def line(self) -> str:
        text = f"{self.name}: {self.identical_fraction:.0%} identical"
        if self.identical < len(self.tensors):
            text += f", mean relative change {self.mean_relative_change:.1e}"
        return text

    def to_dict(self) -> dict:
        acc = self.acc
        return {"name": self.name, "tensors": len(self.tensors), "identical": self.identical,
                "identical_fraction": self.identical_fraction,
                "mean_relative_change": _json_number(self.mean_relative_change),
                "relative_change": _json_number(acc.relative_change), "cosine": _json_number(acc.cosine),
                "max_abs_diff": acc.figures()["max_abs_diff"], "numel": acc.numel}

    def row(self) -> list[object]:
        acc = self.acc
        return [self.name, f"{self.identical}/{len(self.tensors)}", _fmt(self.mean_relative_change),
                _fmt(acc.relative_change), _fmt(acc.cosine), _fmt(acc.figures()["max_abs_diff"])]


DIFF_TENSOR_HEADERS = ["tensor", "dtype", "identical", "max abs diff", "mean abs diff", "rel. change", "cosine",
                       "NaN/Inf"]
DIFF_MODULE_HEADERS = ["module", "identical", "mean rel. change", "rel. change", "cosine", "max abs diff"]
CHANGE_FIX = ("if the change is expected (a fine-tune, another release), raise --max-change; otherwise "
              "check that the two checkpoints are the ones you meant to compare")


def _change_detail(acc: DiffAccumulator, max_change: float) -> str:
    if acc.nonfinite_changed:
        return (f"{plural(acc.nonfinite_changed, 'value')} turned NaN or Inf, or back (an infinite change "
                f"> {max_change:g})")
    return f"relative change {_fmt(acc.relative_change)} > {max_change:g} (max |a-b| {_fmt(acc.figures()['max_abs_diff'])})"


@dataclass
class ValueDiffReport(_ByModule):
    source_a: str
    source_b: str
    tensors: dict[str, TensorDiff]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    not_compared: list[dict] = field(default_factory=list)  # {"name", "reason", "a", "b"}
    max_change: float | None = None
    chunk_elems: int = DEFAULT_CHUNK_ELEMS
    depth: int = DEFAULT_DEPTH

    def modules(self) -> list[ModuleDiff]:
        groups = _group_names(self.tensors, self.depth)
        return [ModuleDiff(name, [self.tensors[m] for m in members]) for name, members in groups.items()]

    @property
    def problems(self) -> list[dict]:
        """A relative change above ``max_change`` (kind ``value_change``), in the diff Problem's fields."""
        if self.max_change is None:
            return []
        return [{"kind": "value_change", "key": name,
                 "detail": _change_detail(t.acc, self.max_change),
                 "fix": CHANGE_FIX}
                for name, t in self.tensors.items() if t.acc.relative_change > self.max_change]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"source_a": self.source_a, "source_b": self.source_b,
                "tensors": {name: t.to_dict() for name, t in self.tensors.items()},
                "modules": [m.to_dict() for m in self.modules()],
                "identical": sum(t.identical for t in self.tensors.values()),
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "not_compared": self.not_compared,
                "max_change": self.max_change, "problems": self.problems, "chunk_elems": self.chunk_elems}

    def summary_lines(self) -> list[str]:
        same = sum(t.identical for t in self.tensors.values())
        lines = [f"values: {self.source_a} against {self.source_b}: {plural(len(self.tensors), 'tensor')} compared, "
                 f"{same} bitwise identical"]
        lines += [f"  {m.line()}" for m in self.modules()]
        lines += [f"upcast: {name} ({t.dtype_a} vs {t.dtype_b}) compared in float64"
                  for name, t in self.tensors.items() if t.upcast]
        lines += [f"only in {self.source_a}: {name}" for name in collapse(self.only_in_a)]
        lines += [f"only in {self.source_b}: {name}" for name in collapse(self.only_in_b)]
        lines += [f"not compared: {item['name']} ({item['reason']}: {item['a']} vs {item['b']})"
                  for item in self.not_compared]
        lines += [f"problem: {p['key']}: {p['detail']}" for p in self.problems]
        return lines

    _title, _heading = "value changes by module", "Value changes"
    _module_headers, _tensor_headers = DIFF_MODULE_HEADERS, DIFF_TENSOR_HEADERS


def tensor_diff(name: str, a, b, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                scratch: Scratch | None = None) -> TensorDiff:
    """Compare two tensors of one shape chunk by chunk (a against b)."""
    import torch

    _check_chunk_elems(chunk_elems)
    scratch = scratch or Scratch(chunk_elems)
    dtype_a, dtype_b = _dtype(a), _dtype(b)
    flat = a.is_contiguous() and b.is_contiguous()  # otherwise both are cut by rows, at equal boundaries
    acc = DiffAccumulator()
    with torch.no_grad():
        pairs = zip(_chunks(a.detach(), chunk_elems, flat), _chunks(b.detach(), chunk_elems, flat), strict=True)
        for x, y in pairs:
            acc = acc.merge(chunk_diff(x, y, dtype_a, dtype_b, scratch))
    return TensorDiff(name, tuple(a.shape), dtype_a, dtype_b, acc)


def _spec(meta) -> str:
    return f"{meta.dtype}{list(meta.shape)}"


def _why_not(meta_a, meta_b) -> str | None:
    if tuple(meta_a.shape) != tuple(meta_b.shape):
        return "shape"
    if (meta_a.dtype in _COMPLEX) != (meta_b.dtype in _COMPLEX):
        return "complex against real"
    return None


def _matched_names(a_checkpoint, b_checkpoint, keys: Sequence[str] | None):
    """(pairs of names to compare, names only in a, names only in b) when names match as stored."""
    names_a, names_b = list(a_checkpoint.keys()), list(b_checkpoint.keys())
    if keys is not None:
        unknown = [k for k in keys if k not in set(names_a) | set(names_b)]
        if unknown:
            raise UsageError(f"no tensor named {unknown[0]!r} in either checkpoint", key=unknown[0],
                             fix="run `ckpt inspect` on both to list their keys")
        wanted = set(keys)
        names_a, names_b = [n for n in names_a if n in wanted], [n for n in names_b if n in wanted]
    in_a, in_b = set(names_a), set(names_b)
    return ([(n, n) for n in names_a if n in in_b], [n for n in names_a if n not in in_b],
            [n for n in names_b if n not in in_a])


def value_diff(a_checkpoint, b_checkpoint, *, keys: Sequence[str] | None = None,
               pairs: Sequence[tuple[str, str]] | None = None, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
               max_change: float | None = None, depth: int = DEFAULT_DEPTH) -> ValueDiffReport:
    """Compare the values of tensors that match by name and shape, one pair in memory at a time.

    ``keys``: compare only these names (each must be in at least one side). ``pairs``: instead of
    matching names, compare exactly these (name in a, name in b), reported under the name in b (what
    a key report's renames give). ``max_change``: a relative change above it is a problem
    (``ValueDiffReport.problems``).
    """
    _check_chunk_elems(chunk_elems)
    if max_change is not None and not (isinstance(max_change, int | float) and max_change >= 0):
        raise UsageError(f"max_change must be a number >= 0, not {max_change!r}", fix="pass e.g. 0.01")
    if pairs is not None and keys is not None:
        raise UsageError("give keys or pairs, not both", fix="filter the pairs instead")
    only_a: list[str] = []
    only_b: list[str] = []
    if pairs is None:
        pairs, only_a, only_b = _matched_names(a_checkpoint, b_checkpoint, keys)
    report = ValueDiffReport(str(getattr(a_checkpoint, "source", "a")), str(getattr(b_checkpoint, "source", "b")),
                             {}, only_in_a=only_a, only_in_b=only_b, max_change=max_change,
                             chunk_elems=chunk_elems, depth=depth)
    scratch = Scratch(chunk_elems)
    for name_a, name in pairs:
        meta_a, meta_b = a_checkpoint.meta(name_a), b_checkpoint.meta(name)
        reason = _why_not(meta_a, meta_b)
        if reason:
            report.not_compared.append({"name": name, "reason": reason, "a": _spec(meta_a), "b": _spec(meta_b)})
            continue
        x, y = a_checkpoint.tensor(name_a), b_checkpoint.tensor(name)
        report.tensors[name] = tensor_diff(name, x, y, chunk_elems=chunk_elems, scratch=scratch)
        del x, y  # before the next pair
    return report


# --- health checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueCheck:
    """A rule on values: tensors whose names match ``globs`` must pass check kind ``kind``.

    ``detail``/``fix`` override the kind's wording (a preset knows why its check matters).
    """

    name: str
    globs: tuple[str, ...]
    kind: str
    detail: str | None = None
    fix: str | None = None

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.globs)


@dataclass(frozen=True)
class CheckKind:
    """How one kind of check judges the stats of the tensors its globs matched.

    ``judge(stats) -> [(key, detail)]``: one entry per failure, empty when the check passes.
    """

    judge: Callable[[list[TensorStats]], list[tuple[str, str]]]
    fix: str
    counts_only: bool = False  # the judge reads only NaN/Inf counts, which one cheap pass gives


def _judge_finite(stats: list[TensorStats]) -> list[tuple[str, str]]:
    return [(t.name, f"{t.acc.nan:,} NaN and {t.acc.inf:,} Inf among {t.acc.numel:,} values")
            for t in stats if t.acc.nonfinite]


def _judge_not_all_zero(stats: list[TensorStats]) -> list[tuple[str, str]]:
    if not stats or not all(t.acc.all_zero for t in stats):
        return []
    names = ", ".join(collapse(t.name for t in stats))
    return [(names, f"all {len(stats)} matched tensors are exactly 0")]


def _judge_not_constant(stats: list[TensorStats]) -> list[tuple[str, str]]:
    return [(t.name, f"all {t.acc.numel:,} values equal {_fmt(t.acc.minimum)}")
            for t in stats if t.acc.numel > 1 and not t.acc.nonfinite and t.acc.minimum == t.acc.maximum]


CHECK_KINDS: dict[str, CheckKind] = {
    "finite": CheckKind(_judge_finite, "find the step that produced NaN/Inf (learning rate, loss scale, a bad "
                                       "conversion); pass --allow-nonfinite to accept it", counts_only=True),
    "not_all_zero": CheckKind(_judge_not_all_zero, "these tensors were never trained or never loaded: check the "
                                                   "checkpoint and its remap"),
    "not_constant": CheckKind(_judge_not_constant, "the tensor looks left at its initial value: check that it "
                                                   "was trained and saved"),
}

FINITE = ValueCheck("finite", ("*",), "finite")


def default_checks(*, allow_nonfinite: bool = False) -> tuple[ValueCheck, ...]:
    """The checks every load runs: no NaN or Inf, unless ``allow_nonfinite``."""
    return () if allow_nonfinite else (FINITE,)


def _named_tensors(source, names: list[str]) -> Iterator[tuple[str, object]]:
    """(name, tensor) of a {name: tensor} mapping or a Checkpoint, one at a time; meta tensors (no
    values to judge) are skipped."""
    for name in names:
        tensor = source[name] if isinstance(source, Mapping) else source.tensor(name)
        if tensor.device.type != "meta":
            yield name, tensor
        del tensor


def _judged_stats(source, checks: list[ValueCheck], chunk_elems: int) -> list[TensorStats]:
    """Stats of the tensors some check matches: in full where a check needs the values, else only
    the NaN/Inf counts (one cheap pass)."""
    listed = source.tensors if isinstance(source, StatsReport) else source.keys()
    names = [n for n in listed if any(c.matches(n) for c in checks)]
    if isinstance(source, StatsReport):
        return [source.tensors[n] for n in names]
    scratch = Scratch(chunk_elems)
    out = []
    for name, tensor in _named_tensors(source, names):
        if all(CHECK_KINDS[c.kind].counts_only for c in checks if c.matches(name)):
            nan, inf = count_nonfinite(tensor, chunk_elems=chunk_elems, scratch=scratch)
            out.append(TensorStats(name, _dtype(tensor), tuple(tensor.shape),
                                   Accumulator(numel=tensor.numel(), nan=nan, inf=inf)))
        else:
            out.append(tensor_stats(name, tensor, chunk_elems=chunk_elems, scratch=scratch))
    return out


def run_checks(tensors_or_checkpoint, checks: Iterable[ValueCheck], *,
               chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[dict]:
    """Problems (``{"kind": "value_check", "key", "detail", "fix"}``) of ``checks`` on a StatsReport,
    a ``{name: tensor}`` mapping (a model's ``named_parameters()``) or a Checkpoint.

    Only tensors some check matches are read, once each, one at a time; a tensor only ``finite``
    matches is just scanned for NaN/Inf (a single summing pass).
    """
    checks = list(checks)
    unknown = [c.kind for c in checks if c.kind not in CHECK_KINDS]
    if unknown:
        raise UsageError(f"unknown value check kind {unknown[0]!r}", fix=f"use one of: {', '.join(CHECK_KINDS)}")
    if not checks:
        return []
    stats = _judged_stats(tensors_or_checkpoint, checks, chunk_elems)
    problems = []
    for check in checks:
        kind = CHECK_KINDS[check.kind]
        for key, detail in kind.judge([t for t in stats if check.matches(t.name)]):
            problems.append({"kind": "value_check", "key": key,
                             "detail": f"{check.name}: {check.detail or detail}", "fix": check.fix or kind.fix})
    return problems


__all__ = ["DEFAULT_CHUNK_ELEMS", "Accumulator", "TensorStats", "ModuleStats", "StatsReport", "tensor_stats",
           "checkpoint_stats", "count_nonfinite", "Scratch", "chunk_accumulator", "DiffAccumulator", "TensorDiff", "ModuleDiff",
           "ValueDiffReport", "tensor_diff", "chunk_diff", "value_diff", "ValueCheck", "CheckKind", "CHECK_KINDS",
           "FINITE", "default_checks", "run_checks"]

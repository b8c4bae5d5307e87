"""Where every weight came from.

A composite model gets its weights from several places: a vision tower from a pretrained tag or
file, a language model from a hub id at a revision, the trained parts from a checkpoint. A
parameter nobody loaded keeps its random initialisation without a word. Builders and loaders
record each parameter's ``WeightSource`` on the model; ``provenance_report(model)`` summarises it
per module and counts what is still random.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .render import human_count, markdown_table, rich_table

_ATTR = "_ckpt_provenance"


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "checkpoint", "pretrained", "hub", "file", "random"
    name: str
    revision: str | None = None
    sha256: str | None = None

    def label(self) -> str:
        if self.kind == "random":
            return "initialised randomly"
        revision = f"@{self.revision[:7]}" if self.revision else ""
        return f"{self.name}{revision}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "revision": self.revision, "sha256": self.sha256}


RANDOM = WeightSource("random", "initialised randomly")


def _names(model) -> list[str]:
    """One name per parameter. Buffers are left out: they are computed from the config (rotary
    frequencies, masks), so "random" does not apply to them."""
    return [name for name, _ in model.named_parameters()]


def record(model, source: WeightSource, names: Iterable[str] | None = None, *, prefix: str | None = None) -> int:
    """Mark ``names`` (or every tensor under ``prefix``, or all) of ``model`` as coming from ``source``."""
    table = model.__dict__.setdefault(_ATTR, {})
    if names is None:
        names = [n for n in _names(model) if prefix is None or n.startswith(prefix)]
    count = 0
    for name in names:
        table[name] = source
        count += 1
    return count


def sources(model) -> dict[str, WeightSource]:
    """Every tensor name -> where it came from (``RANDOM`` where nothing was recorded)."""
    table = model.__dict__.get(_ATTR, {})
    return {name: table.get(name, RANDOM) for name in _names(model)}


@dataclass
class ProvenanceRow:
    module: str
    source: str
    params: int
    share: float  # of the module's parameters


@dataclass
class ProvenanceReport:
    rows: list[ProvenanceRow] = field(default_factory=list)
    random_params: int = 0
    total_params: int = 0
    expect_complete: bool = True

    @property
    def verdict(self) -> str:
        return "fail" if self.expect_complete and self.random_params else "ok"

    def summary(self) -> str:
        parts = [f"{r.module}: {r.share:.0%} from {r.source}" for r in self.rows if r.source != RANDOM.label()]
        parts.append(f"randomly initialised: {self.random_params:,} parameters")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "random_params": self.random_params, "total_params": self.total_params,
                "modules": [{"module": r.module, "source": r.source, "params": r.params, "share": round(r.share, 6)}
                            for r in self.rows]}

    def _table_rows(self) -> list[list[object]]:
        return [[r.module, r.source, human_count(r.params), f"{r.share:.1%}"] for r in self.rows]

    def rich_table(self):
        return rich_table("where every weight came from", ["module", "source", "params", "share"],
                          self._table_rows(), justify_right=("params", "share"))

    def to_markdown(self) -> str:
        return markdown_table(["module", "source", "params", "share"], self._table_rows())


def module_of(name: str, split: tuple[str, ...]) -> str:
    """Top-level module of a tensor name; names containing a ``split`` marker get their own group
    (``lang_encoder (gated_cross_attn_layer)``), so trained inserts show apart from their host."""
    top = name.split(".", 1)[0]
    for marker in split:
        if marker in name:
            return f"{top} ({marker})"
    return top


def provenance_report(model, *, split: tuple[str, ...] = (), expect_complete: bool = True) -> ProvenanceReport:
    """Per-module share of parameters from each source, and the count still random."""
    state = dict(model.named_parameters())
    counts: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    random_params = 0
    for name, source in sources(model).items():
        numel = state[name].numel()
        module = module_of(name, split)
        counts[(module, source.label())] = counts.get((module, source.label()), 0) + numel
        totals[module] = totals.get(module, 0) + numel
        if source.kind == "random":
            random_params += numel
    rows = [ProvenanceRow(m, s, n, n / totals[m] if totals[m] else 1.0) for (m, s), n in counts.items()]
    return ProvenanceReport(rows, random_params, sum(totals.values()), expect_complete)

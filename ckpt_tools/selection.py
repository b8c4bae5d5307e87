"""Which state dict in a checkpoint holds the model, chosen by content; every tensor accounted for.

A training checkpoint is rarely a bare state dict: ``{"model": sd, "optimizer": ..., "step":
tensor(5)}``, a Lightning file with ``state_dict`` and callbacks, a timm file with ``state_dict`` and
``state_dict_ema``, a pickled ``nn.Module``. ``select_state_dict`` walks the whole unpickled
structure (iteratively, to ``MAX_DEPTH`` levels) and finds every candidate:

* a mapping with tensor values under string keys: the tensors are its state dict;
* a pickled ``nn.Module`` (a placeholder whose state holds ``_parameters``, ``_buffers`` and
  ``_modules``): its state-dict names are rebuilt (``backbone.0.conv.weight``), skipping None
  parameters and the buffers listed in ``_non_persistent_buffers_set``.

Never a candidate: anything under optimizer state (a key named like ``optimizer``,
``optimizer_states``, ``last_optimizer_state``, or a mapping holding ``state`` and
``param_groups``), mappings whose tensor keys are not strings (an optimizer's per-parameter state
is keyed by ints), anything inside a pickled module other than the module itself, and a mapping
whose only tensors are scalars sitting beside other entries (``step``, ``best_val_loss``).

The choice: candidates whose keys look like parameter names (strings without whitespace) rank
first, then the most tensor bytes. The wrapper priority (``priority``, e.g. ``state_dict`` before
``state_dict_ema``, ``model`` before ``model_ema``) only breaks ties between comparable candidates:
the same number of tensors with the same shapes. ``select="dotted.path"`` overrides the choice;
it may name a mapping of state dicts (``{"encoder": sd, "decoder": sd}``, string keys all the way
down to tensors), taken as one state dict with dotted names (``encoder.layer.weight``). A choice by
content never merges them: it names the parent in a note instead.

Leaves are recognised by a marker, so this module needs neither torch nor the unpickler:
``ckpt_leaf == "tensor"`` (``shape``, ``dtype``, ``nbytes``, ``identity()``), ``"inert"`` (an
object the pickle described but nothing built: ``dotted``, ``fields()``, ``inert_entries()``) or
``"global"`` (a global named but not imported: ``dotted``). ``ckpt_type_name``, where present,
is how a value's type is reported.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from .errors import InvalidCheckpointError, UsageError
from .render import plural, rich_table

MAX_DEPTH = 200  # levels of nesting searched; a pickle can nest far deeper than any checkpoint does
TOP = "."  # how the top level is named where a path must be shown or passed to --select
_PARAM_NAME = re.compile(r"\S+")
_OPTIMIZER_KEY = re.compile(r"(^|_)optim(izer)?s?($|_)", re.IGNORECASE)
_MODULE_FIELDS = ("_parameters", "_buffers", "_modules")
_PLAIN_TYPES = (str, bytes, int, float, bool, type(None), dict, list, tuple, set, frozenset)
NESTED = "nested state dicts"  # the kind of a selection that flattens a mapping of state dicts


# ---------------------------------------------------------------------------------------------
# the result

@dataclass(frozen=True)
class Alternative:
    """A state dict that was found but not selected."""

    path: str
    kind: str  # "state dict" or "module"
    tensors: int
    nbytes: int

    @property
    def select(self) -> str:
        """What ``--select`` takes to choose it."""
        return self.path or TOP

    def to_dict(self) -> dict:
        return {"path": self.path or TOP, "kind": self.kind, "tensors": self.tensors, "nbytes": self.nbytes,
                "select": self.select}


@dataclass(frozen=True)
class Bucket:
    """Tensors of the file that went one way: ``selected``, ``alternative`` (another state dict),
    ``optimizer`` (optimizer state) or ``extra`` (scalars and anything else)."""

    kind: str
    path: str
    tensors: int
    nbytes: int

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path or TOP, "tensors": self.tensors, "nbytes": self.nbytes}

    def describe(self) -> str:
        """'3 optimizer tensors under state.1 (20 bytes)'."""
        kind = {"alternative": "other"}.get(self.kind, self.kind)
        return f"{plural(self.tensors, kind + ' tensor')} under {self.path or TOP} ({self.nbytes:,} bytes)"


@dataclass
class Accounting:
    """Every tensor of the file, counted once (aliases share bytes), and where it went."""

    tensors: int = 0
    nbytes: int = 0
    buckets: list[Bucket] = field(default_factory=list)
    explicit: bool = False  # the selection was named by the caller, not chosen by content

    def of(self, kind: str) -> tuple[int, int]:
        """(tensors, bytes) of every bucket of one kind."""
        rows = [b for b in self.buckets if b.kind == kind]
        return sum(b.tensors for b in rows), sum(b.nbytes for b in rows)

    @property
    def selected_fraction(self) -> float:
        """The selected state dict's share of the file's tensor bytes (1.0 for a file without any)."""
        return self.of("selected")[1] / self.nbytes if self.nbytes else 1.0

    def to_dict(self) -> dict:
        return {"tensors": self.tensors, "nbytes": self.nbytes, "explicit": self.explicit,
                "selected_fraction": round(self.selected_fraction, 6),
                "buckets": [b.to_dict() for b in self.buckets]}

    def lines(self) -> list[str]:
        out = [f"the file holds {self.tensors} tensors, {self.nbytes:,} bytes"]
        out += [f"  {b.kind}: {b.path or TOP} ({b.tensors} tensors, {b.nbytes:,} bytes)" for b in self.buckets]
        return out


@dataclass
class Selection:
    """The chosen state dict and everything else the file holds.

    ``path``: dotted path of the selection ("" = the top level); ``state``: {name: tensor leaf};
    ``alternatives``: other state dicts, best first; ``extras``: {dotted name: type name} of the
    entries beside the selection on its way down and of its non-tensor entries; ``extra_values``:
    the values behind them; ``not_executed``: {global: [key paths]} of every placeholder met;
    ``accounting``: every tensor of the file and where it went.
    """

    path: str
    kind: str
    state: dict[str, object]
    alternatives: list[Alternative] = field(default_factory=list)
    extras: dict[str, str] = field(default_factory=dict)
    extra_values: dict[str, object] = field(default_factory=dict)
    not_executed: dict[str, list[str]] = field(default_factory=dict)
    accounting: Accounting = field(default_factory=Accounting)
    notes: list[str] = field(default_factory=list)
    together: str | None = None  # a chosen state dict's parent holding other parts of one model beside it

    @property
    def wrapper(self) -> str | None:
        return self.path or None

    def to_dict(self) -> dict:
        return {"path": self.path or TOP, "kind": self.kind, "tensors": len(self.state),
                "alternatives": [a.to_dict() for a in self.alternatives], "extras": dict(self.extras),
                "not_executed": {k: list(v) for k, v in self.not_executed.items()},
                "accounting": self.accounting.to_dict(), "notes": list(self.notes)}

    def lines(self) -> list[str]:
        how = "named by --select" if self.accounting.explicit else "chosen by content"
        out = [f"selected: {self.path or TOP} ({self.kind}, {plural(len(self.state), 'tensor')}; {how})"]
        out += [f"also found: {a.path or TOP} ({a.tensors} tensors, {a.nbytes:,} bytes): --select {a.select}"
                for a in self.alternatives]
        out += self.accounting.lines()
        out += [f"not executed: {name} at {', '.join(p or TOP for p in paths[:5]) or '(unreachable)'}"
                + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
                for name, paths in self.not_executed.items()]
        return out + [f"note: {n}" for n in self.notes]

    def to_markdown(self) -> str:
        return "\n".join(f"- {line}" for line in self.lines()) + "\n"

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        table = rich_table("where the file's tensors went", ["kind", "path", "tensors", "bytes"],
                           [[b.kind, b.path or TOP, b.tensors, f"{b.nbytes:,}"] for b in self.accounting.buckets],
                           justify_right=("tensors", "bytes"))
        lines = [line for line in self.lines() if not line.startswith(("  ", "the file holds"))]
        return Group(*(Text(line) for line in lines), table)


# ---------------------------------------------------------------------------------------------
# recognising things

def _leaf(value) -> str | None:
    if isinstance(value, str | bytes | int | float | type(None)):
        return None
    kind = getattr(value, "ckpt_leaf", None)
    return kind if isinstance(kind, str) else None


def is_tensor(value) -> bool:
    return _leaf(value) == "tensor"


def type_name(value) -> str:
    """``dict``, ``int``, ``Tensor``, ``argparse.Namespace (not executed)``..."""
    if type(value) in _PLAIN_TYPES:
        return type(value).__name__
    name = getattr(value, "ckpt_type_name", None)
    return name if isinstance(name, str) else type(value).__name__


def _entries(value) -> list[tuple[object, object]] | None:
    """(key, child) of a container; None for a leaf."""
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return list(enumerate(value))
    if _leaf(value) == "inert":
        return list(value.inert_entries())
    return None


def _named_entries(value) -> list[tuple[object, object]]:
    """(key, child) of what a state dict could be: a mapping's items, or a placeholder's fields
    and items (never its call arguments)."""
    if isinstance(value, Mapping):
        return list(value.items())
    if _leaf(value) == "inert":
        return list(value.fields().items()) + list(value.items)
    return []


def _module_fields(value) -> dict | None:
    """The BUILD state of a pickled nn.Module, or None."""
    if _leaf(value) != "inert":
        return None
    fields = value.fields()
    if all(isinstance(fields.get(name), Mapping) for name in _MODULE_FIELDS):
        return fields
    return None


def _is_optimizer(key, value) -> bool:
    if isinstance(key, str) and _OPTIMIZER_KEY.search(key):
        return True
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def module_state(module, notes: list[str] | None = None) -> dict[str, object]:
    """{state-dict name: tensor} of a pickled nn.Module, as ``module.state_dict()`` would name them."""
    out: dict[str, object] = {}
    stack = [("", module, 0)]
    while stack:
        prefix, current, depth = stack.pop()
        fields = _module_fields(current)
        if fields is None:
            if notes is not None and current is not None:
                notes.append(f"'{prefix.rstrip('.')}' is a {type_name(current)} without module state; skipped")
            continue
        skipped = fields.get("_non_persistent_buffers_set")
        skipped = skipped if isinstance(skipped, set | frozenset | list | tuple) else ()
        for kind, names in (("parameter", fields["_parameters"]), ("buffer", fields["_buffers"])):
            for name, value in names.items():
                if is_tensor(value) and not (kind == "buffer" and name in skipped):
                    out[prefix + str(name)] = value
                elif value is not None and not is_tensor(value) and notes is not None:
                    notes.append(f"{kind} '{prefix}{name}' is a {type_name(value)}, not a tensor; "
                                 "it is not in the state dict")
        if depth >= MAX_DEPTH:
            continue
        children = [(prefix + str(name) + ".", child) for name, child in fields["_modules"].items() if child is not None]
        stack.extend((p, c, depth + 1) for p, c in reversed(children))
    return out


# ---------------------------------------------------------------------------------------------
# the walk

@dataclass
class _Candidate:
    path: tuple[str, ...]
    kind: str
    state: dict[str, object]
    param_like: bool
    order: int

    @property
    def text(self) -> str:
        return ".".join(self.path)

    @cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in {t.identity(): t for t in self.state.values()}.values())

    @cached_property
    def shapes(self) -> Counter:
        return Counter(tuple(t.shape) for t in self.state.values())


def _mapping_candidate(path, value, order) -> tuple[_Candidate | None, str | None]:
    """A state dict from a mapping's direct tensor entries, or (None, why not)."""
    entries = _named_entries(value)
    tensors = [(k, v) for k, v in entries if is_tensor(v)]
    if not tensors:
        return None, None
    if not all(isinstance(k, str) for k, _ in tensors):
        return None, "keys that are not strings"
    if len(tensors) < len(entries) and all(not v.shape for _, v in tensors):
        return None, "scalars beside other entries"
    state = dict(tensors)
    return _Candidate(path, "state dict", state, all(_PARAM_NAME.fullmatch(k) for k in state), order), None


class _Walk:
    """One pass over the structure: containers by path, tensor occurrences, candidates, placeholders."""

    def __init__(self, root) -> None:
        self.containers: dict[tuple[str, ...], object] = {}
        self.by_text: dict[str, tuple[str, ...]] = {}
        self.tensors: list[tuple[tuple[str, ...], object, bool]] = []  # (path, leaf, under optimizer state)
        self.candidates: list[_Candidate] = []
        self.refused: Counter = Counter()  # why mappings holding tensors were not candidates
        self.not_executed: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._run(root)

    def _run(self, root) -> None:
        seen: set[int] = set()
        stack: list[tuple[tuple[str, ...], object, bool, bool]] = [((), root, _is_optimizer(None, root), False)]
        too_deep = 0
        while stack:
            path, value, optimizer, in_module = stack.pop()
            kind = _leaf(value)
            if kind == "tensor":
                self.tensors.append((path, value, optimizer))
                continue
            if kind in ("inert", "global") and id(value) not in seen:
                self.not_executed.setdefault(value.dotted, []).append(".".join(path))
            entries = _entries(value)
            if entries is None or id(value) in seen:
                continue
            seen.add(id(value))
            module = self._consider(path, value, kind, searching=not (in_module or optimizer))
            if len(path) >= MAX_DEPTH:
                too_deep += 1
                continue
            for key, child in reversed(entries):
                stack.append((path + (str(key),), child, optimizer or _is_optimizer(key, child), in_module or module))
        if too_deep:
            self.notes.append(f"{too_deep} entries nest deeper than {MAX_DEPTH} levels; what lies below them "
                              "was not searched")

    def _consider(self, path: tuple[str, ...], value, kind: str | None, *, searching: bool) -> bool:
        """Record a mapping or placeholder (and, outside optimizer state and modules, whether it
        is a candidate); True when it is a pickled module, whose insides are then not searched."""
        if not (isinstance(value, Mapping) or kind == "inert"):
            return False
        self.containers[path] = value
        self.by_text.setdefault(".".join(path), path)
        if not searching:
            return False
        if _module_fields(value) is not None:
            state = module_state(value, self.notes)
            if state:
                self.candidates.append(_Candidate(path, "module", state, True, len(self.candidates)))
            return True
        candidate, why = _mapping_candidate(path, value, len(self.candidates))
        if candidate is not None:
            self.candidates.append(candidate)
        elif why:
            self.refused[why] += 1
        return False


# ---------------------------------------------------------------------------------------------
# choosing

def _rank(candidate: _Candidate) -> tuple:
    return (not candidate.param_like, -candidate.nbytes, candidate.order)


def _priority(candidate: _Candidate, priority: Sequence[str]) -> tuple:
    last = candidate.path[-1] if candidate.path else ""
    index = priority.index(last) if last in priority else len(priority)
    return (index, len(candidate.path), candidate.order)


def _choose(candidates: list[_Candidate], priority: Sequence[str]) -> _Candidate:
    best = min(candidates, key=_rank)
    comparable = [c for c in candidates if c.param_like == best.param_like and len(c.state) == len(best.state)
                  and c.shapes == best.shapes]
    return min(comparable, key=lambda c: _priority(c, priority))


_ABSENT = object()


def flattened(value, prefix: str = "", depth: int = 0) -> dict[str, object] | None:
    """A mapping of state dicts as one state dict with dotted names; None unless every key down to
    the tensors is a string and every leaf is a tensor."""
    if not isinstance(value, Mapping) or depth > MAX_DEPTH:
        return None
    out: dict[str, object] = {}
    for key, child in value.items():
        if not isinstance(key, str):
            return None
        name = f"{prefix}{key}"
        if is_tensor(child):
            out[name] = child
            continue
        inner = flattened(child, name + ".", depth + 1)
        if not inner:
            return None
        out.update(inner)
    return out


def _merged_into(candidate: _Candidate, chosen: _Candidate) -> bool:
    """A state dict inside a flattened selection is part of it, not an alternative."""
    return chosen.kind == NESTED and candidate.path[:len(chosen.path)] == chosen.path


def _parts_parent(walk: _Walk, chosen: _Candidate) -> str | None:
    """The parent of a chosen state dict whose siblings are state dicts of other parts of one model
    (``model.encoder`` beside ``model.decoder``; not an EMA copy, which has the same shapes) and
    which ``--select`` could take as one; None otherwise (the top level never: it is the file)."""
    if chosen.kind == NESTED or len(chosen.path) < 2:
        return None
    parent = chosen.path[:-1]
    parts = [c for c in walk.candidates if c.path[:-1] == parent and c.path != chosen.path and c.shapes != chosen.shapes]
    return ".".join(parent) if parts and flattened(walk.containers.get(parent)) else None


def _leaf_entry(walk: _Walk, text: str):
    """The value a dotted path names when it is not a container (an int, a tensor), else _ABSENT."""
    for parent, path in walk.by_text.items():  # a key may hold dots itself ("layer.0.weight")
        if parent and not text.startswith(parent + "."):
            continue
        rest = text[len(parent) + 1:] if parent else text
        for key, value in _entries(walk.containers[path]) or ():
            if str(key) == rest:
                return value
    return _ABSENT


def _explicit(walk: _Walk, select: str, source: str) -> _Candidate:
    text = "" if select in ("", TOP) else select
    found = [c.text or f"{TOP} (the top level)" for c in walk.candidates]
    available = ", ".join(found) if found else "none in this file; `ckpt inspect` lists what it holds"
    path = walk.by_text.get(text)
    if path is None:
        leaf = _leaf_entry(walk, text)
        what = "no such entry in the checkpoint" if leaf is _ABSENT else \
            f"the entry is {'a single tensor' if is_tensor(leaf) else 'a value of type ' + type_name(leaf)}, not a state dict"
        raise UsageError(f"--select {select}: {what}", path=source,
                         fix=f"choose one of the state dicts found: {available}")
    for candidate in walk.candidates:
        if candidate.path == path:
            return candidate
    value = walk.containers[path]
    if _module_fields(value) is not None:
        state = module_state(value)
        if state:
            return _Candidate(path, "module", state, True, -1)
    tensors = [(k, v) for k, v in _named_entries(value) if is_tensor(v)]
    if not tensors:
        flat = flattened(value)
        if flat:
            return _Candidate(path, NESTED, flat, True, -1)
        deeper = list(dict.fromkeys(".".join(p[:len(path) + 1]) for p, _, _ in walk.tensors
                                    if p[:len(path)] == path and len(p) > len(path) + 1))
        if deeper:
            raise UsageError(f"--select {select}: the entry's tensors sit one level deeper", path=source,
                             fix=f"select one of its entries: {', '.join(deeper[:6])}")
        raise UsageError(f"--select {select}: the entry holds no tensors", path=source,
                         fix=f"choose one of the state dicts found: {available}")
    if not all(isinstance(k, str) for k, _ in tensors):
        raise UsageError(f"--select {select}: the entry's tensors are keyed by {type(tensors[0][0]).__name__}, "
                         "not by names", path=source, fix=f"choose one of the state dicts found: {available}")
    return _Candidate(path, "state dict", dict(tensors), True, -1)


def _nothing_found(root, walk: _Walk, source: str, priority: Sequence[str]) -> InvalidCheckpointError:
    unsearched = f" ({walk.notes[-1]})" if any("was not searched" in n for n in walk.notes) else ""
    not_a_dict = InvalidCheckpointError(f"the pickle holds a {type_name(root)}, not a dict of tensors{unsearched}",
                                        path=source, fix="save a state dict: torch.save(model.state_dict(), path)")
    if not isinstance(root, Mapping) and (not walk.tensors or _leaf(root) != "inert"):
        return not_a_dict
    if not walk.tensors:
        keys = ", ".join(str(k) for k, _ in (_entries(root) or [])[:8])
        return InvalidCheckpointError(f"no tensors found (top-level entries: {keys or 'none'}){unsearched}",
                                      path=source,
                                      fix=f"expected a state dict, or one under {', '.join(priority[:5])}, ...")
    places = list(dict.fromkeys(".".join(p[:1]) or TOP for p, _, _ in walk.tensors))
    if all(optimizer for _, _, optimizer in walk.tensors):
        first = ".".join(walk.tensors[0][0][:-1])
        return InvalidCheckpointError(
            f"the file holds optimizer state only ({plural(len(walk.tensors), 'tensor')} under "
            f"{', '.join(places[:6])}), no model weights", path=source,
            fix=f"read the model's own checkpoint; --select {first} reads one parameter's optimizer state")
    reasons = list(walk.refused) + (["optimizer state"] if any(o for _, _, o in walk.tensors) else [])
    return InvalidCheckpointError(
        f"no state dict found: the file's {plural(len(walk.tensors), 'tensor')} "
        f"{'sits' if len(walk.tensors) == 1 else 'sit'} under {', '.join(places[:6])}"
        + (f" ({'; '.join(reasons)})" if reasons else ""), path=source,
        fix="pass select=PATH (--select PATH) naming the entry that holds the weights")


def select_state_dict(root, *, select: str | None = None, priority: Sequence[str] = (),
                      source: str = "") -> Selection:
    """Find every state dict in ``root`` and choose the model's (see the module docstring).

    Raises InvalidCheckpointError when nothing in ``root`` is a state dict, and UsageError when
    ``select`` names nothing, or something without named tensors.
    """
    walk = _Walk(root)
    if select is not None:
        chosen = _explicit(walk, select, source)
    elif walk.candidates:
        chosen = _choose(walk.candidates, priority)
    else:
        raise _nothing_found(root, walk, source, priority)
    others = sorted((c for c in walk.candidates if c.path != chosen.path and not _merged_into(c, chosen)),
                    key=_rank)
    selection = Selection(chosen.text, chosen.kind, dict(chosen.state),
                          alternatives=[Alternative(c.text, c.kind, len(c.state), c.nbytes) for c in others],
                          not_executed=walk.not_executed, notes=list(walk.notes))
    selection.together = _parts_parent(walk, chosen)
    if selection.together is not None:
        parent = chosen.path[:-1]
        text, count = selection.together, sum(1 for c in walk.candidates if c.path[:-1] == parent)
        entries = ", ".join(f"{key}.*" for key in walk.containers[parent])
        flat = flattened(walk.containers[parent]) or {}
        selection.notes.append(f"{text} holds {plural(count, 'state dict')}; --select {text} takes them together "
                               f"as one ({plural(len(flat), 'tensor')}: {entries})")
    _fill_extras(selection, walk, chosen)
    selection.accounting = _account(walk, chosen, others, explicit=select is not None)
    return selection


def _fill_extras(selection: Selection, walk: _Walk, chosen: _Candidate) -> None:
    """The entries met on the way down to the selection, and its own entries that are not tensors."""
    for depth in range(len(chosen.path) + 1):
        node = walk.containers.get(chosen.path[:depth])
        if node is None:
            continue
        here = chosen.path[:depth]
        inside = depth == len(chosen.path)
        if inside and chosen.kind in ("module", NESTED):
            break
        for key, value in _entries(node) or []:
            name = ".".join(here + (str(key),))
            if inside and is_tensor(value) and key in chosen.state:
                continue
            if not inside and str(key) == chosen.path[depth]:
                continue
            selection.extras[name] = type_name(value)
            selection.extra_values[name] = value


def _account(walk: _Walk, chosen: _Candidate, others: list[_Candidate], *, explicit: bool) -> Accounting:
    """Each distinct tensor (by storage, offset, shape, stride, dtype) lands in exactly one bucket:
    the selection, else the first alternative holding it, else optimizer state or an extra,
    grouped under the first key that leaves the selection's path."""
    placed: dict[tuple, tuple[str, str]] = {}
    sizes: dict[tuple, int] = {}
    for leaf in chosen.state.values():
        placed.setdefault(leaf.identity(), ("selected", chosen.text))
    for other in others:
        for leaf in other.state.values():
            placed.setdefault(leaf.identity(), ("alternative", other.text))
    for path, leaf, optimizer in walk.tensors:
        identity = leaf.identity()
        sizes[identity] = leaf.nbytes
        if identity not in placed:
            placed[identity] = ("optimizer" if optimizer else "extra", _group(path, chosen.path))
    for leaf in (t for c in [chosen, *others] for t in c.state.values()):
        sizes.setdefault(leaf.identity(), leaf.nbytes)
    rows: dict[tuple[str, str], list[int]] = {}
    for identity, where in placed.items():
        row = rows.setdefault(where, [0, 0])
        row[0] += 1
        row[1] += sizes[identity]
    order = {"selected": 0, "alternative": 1, "optimizer": 2, "extra": 3}
    buckets = [Bucket(kind, path, n, b) for (kind, path), (n, b) in
               sorted(rows.items(), key=lambda item: order[item[0][0]])]
    return Accounting(len(placed), sum(sizes[i] for i in placed), buckets, explicit)


def _group(path: tuple[str, ...], selected: tuple[str, ...]) -> str:
    """The first key of ``path`` that leaves the selection's path (the whole path when inside it)."""
    for depth, (mine, theirs) in enumerate(zip(path, selected, strict=False)):
        if mine != theirs:
            return ".".join(path[: depth + 1])
    return ".".join(path)

"""infer_rules(checkpoint, target) -> Inference: remap rules that make a checkpoint's keys fit a target.

Pure planning on TensorMeta mappings; nothing here reads a tensor or imports torch.

The keys a diff leaves over are the input: *unexpected* (a checkpoint name, after the base rules,
that the target lacks) and *missing* (a target tensor no checkpoint name reaches). The inference
pairs them and generalises the pairs into rules of the existing kinds (``remap.RULE_KINDS``), in
rounds, until a round finds nothing more:

1. **Layer offsets.** A numbered container (``model.layers``, or one child of it such as
   ``layers.{}.downsample``) whose checkpoint entries fit the target's only with every index shifted
   by one constant becomes one ``rename`` per index, with exact anchors, ordered so the chain never
   renames a key twice (ascending for a shift down, descending for a shift up). Offsets go first:
   a shifted checkpoint matches most of its layers by name already, at the wrong index.
2. **Pairs.** Each unexpected key is set against the missing keys of the same shape (mandatory) and
   the same layer numbers (a rename never renumbers; a shift is step 1's job); only when that finds
   nothing, also against keys with numbered segments added or removed. Candidates are ranked
   by position in the module tree: leaf name differs, number of changed runs of segments, segments
   changed, depth difference; then by name similarity of the changed runs; then by dtype (a cast is
   allowed, so dtype only breaks ties). A key pairs with its single best candidate if it is also
   that candidate's single best claimant; equal bests on either side are *ambiguous*: reported,
   never guessed.
3. **Rules.** Each changed run of a pair becomes a rule of one of two generalities: context-free
   (``\\.decoder_layer\\.`` -> ``.``, ``strip_prefix base_model.model.``), or anchored at the start
   of the key with its layer numbers as groups. Pairs that share a run are tried together (a prefix
   rename may only land its keys together with the leaf renames beside it), the widest set first.
4. **Checks.** A rule set is kept only if, run with ``apply_remap`` over the whole key set after
   the rules so far, it collides nothing, lands every pair it came from on its partner, raises the
   matched count, and harms nothing: no landed key stops landing, no key becomes a shape mismatch,
   no target tensor gets two checkpoint tensors, the unexpected count does not grow. A rule set
   that lands a single key also needs evidence: the only tensor of its shape on both sides, the
   same leaf with segments only added or removed, or similar names.
5. **Aliases.** Checkpoint names that are second names of a tensor whose other name lands (the
   ``checkpoint_aliases`` groups) are dropped with one ``drop`` rule, each glob the shortest module
   prefix under which every name is such an alias.
6. **Only when it helps.** Nothing is suggested unless the matched count rises, nor between models
   that have too little in common: after the rules, two thirds of the checkpoint's tensors or of
   the target's must fit (two unrelated models always share a few shapes).

Counts: *matched* = target tensors (alias groups) a checkpoint name reaches with the same shape (a
dtype cast included); *unexpected* = checkpoint names that are not target names; *missing* = target
tensors none of whose names is present.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RemapError
from .meta import TensorMeta
from .remap import Rule, apply_remap
from .render import rich_table

ORIGIN = "inferred"
# A pair whose names differ in more runs than this is no rename, just two tensors of one shape.
MAX_RUNS = 3
# Unrelated models share shapes by chance (every LayerNorm of a width, square projections, transposed
# Conv1D weights): GPT-2 against a ViT of its width lands half its tensors on something. Rules are
# suggested only when, with them, this share of the checkpoint's tensors or of the target's fits.
RELATED_FRACTION = 2 / 3
# Name similarity (difflib ratio) that backs a rule landing a single key.
SIMILAR = 0.6
# A safety stop; real key sets settle in a handful of rounds.
MAX_ROUNDS = 64


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class Inference:
    """Rules inferred for a checkpoint against a target, and what they would change."""

    rules: list[Rule]
    maps: list[int]  # per rule: keys it renames (or drops), run in order after the base rules
    matched_before: int
    matched_after: int
    unexpected_before: int
    unexpected_after: int
    missing_before: int
    missing_after: int
    ambiguous: list[dict] = field(default_factory=list)  # {side, key, candidates}
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "inferred_rules": [{**rule.to_dict(), "maps": n} for rule, n in zip(self.rules, self.maps, strict=True)],
            "matched_before": self.matched_before, "matched_after": self.matched_after,
            "unexpected_before": self.unexpected_before, "unexpected_after": self.unexpected_after,
            "missing_before": self.missing_before, "missing_after": self.missing_after,
            "ambiguous": [dict(a) for a in self.ambiguous],
            "summary": self.summary(),
            "note": self.note,
        }

    def summary(self) -> str:
        """``with these 2 rules: 171 matched, 0 unexpected`` (or why there are none)."""
        if self.rules:
            head = "with this rule" if len(self.rules) == 1 else f"with these {len(self.rules)} rules"
            text = f"{head}: {self.matched_after} matched, {self.unexpected_after} unexpected"
            if self.missing_after:
                text += f", {self.missing_after} missing"
        else:
            text = (f"no rule inferred: {self.matched_before} matched, {self.unexpected_before} unexpected, "
                    f"{self.missing_before} missing")
        if self.ambiguous:
            text += f"; {len(self.ambiguous)} ambiguous"
        return text

    def to_toml(self) -> str:
        """A rules file (``[[rule]]`` tables) that ``remap.rules_from_file`` reads back to ``rules``."""
        lines = ["# Remap rules inferred by ckpt-tools; use with --rules FILE.", f"# {self.summary()}"]
        for rule, n in zip(self.rules, self.maps, strict=True):
            ((kind, value),) = rule.to_dict().items()
            lines += ["", "[[rule]]", f"# maps {n} key{'s' if n != 1 else ''}", f"{kind} = {_toml_value(value)}"]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        lines = [f"**Inferred rules**: {self.summary()}."]
        if self.rules:
            lines += ["", "| rule | maps |", "|---|---|"]
            lines += [f"| `{_cell(_rule_text(r))}` | {n} |" for r, n in zip(self.rules, self.maps, strict=True)]
        if self.ambiguous:
            lines += ["", "| ambiguous | candidates |", "|---|---|"]
            lines += [f"| `{_cell(a['key'])}` | {', '.join(f'`{_cell(c)}`' for c in a['candidates'])} |"
                      for a in self.ambiguous]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        from rich.console import Group
        from rich.text import Text

        return Group(self.rules_table(), Text(self.summary() + (f" ({self.note})" if self.note else "")))

    def rules_table(self):
        """The rules (as the flags that say them, with the keys each maps) and the ambiguous pairings."""
        from rich.console import Group

        parts: list[Any] = []
        if self.rules:
            parts.append(rich_table("inferred rules", ["rule", "maps"],
                                    [[_rule_text(rule), n] for rule, n in zip(self.rules, self.maps, strict=True)],
                                    justify_right=("maps",)))
        if self.ambiguous:
            parts.append(rich_table("ambiguous pairings", ["key", "candidates"],
                                    [[a["key"], ", ".join(a["candidates"])] for a in self.ambiguous]))
        return Group(*parts)


def rule_flags(rules: Sequence[Rule], maps: Sequence[int] | None = None) -> str:
    """Rules as the command-line flags that say the same, each with the keys it maps when given."""
    counts = maps if maps is not None else [None] * len(rules)
    return "; ".join(_rule_text(r) + ("" if n is None else f" ({n} key{'s' if n != 1 else ''})")
                     for r, n in zip(rules, counts, strict=True))


def flag_words(rules: Sequence[Rule]) -> list[str]:
    """Rules as command-line words (``["--strip-prefix", "model."]``), to compare with a fix's."""
    return [word for rule in rules for word in shlex.split(_rule_text(rule))]


def _rule_text(rule: Rule) -> str:
    """The rule as the command-line flag that says the same."""
    if rule.kind == "rename":
        return f"--rename '{rule.args[0]}={rule.args[1]}'"
    return " ".join(f"--{rule.kind.replace('_', '-')} '{a}'" for a in rule.args)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _toml_value(value: str | list) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # literal strings keep regex backslashes readable; they cannot hold a quote or a control character
    if "'" not in value and not any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"'{value}'"
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# names


@dataclass(frozen=True)
class _Name:
    parts: tuple[str, ...]
    numbers: tuple[str, ...]

    @classmethod
    def of(cls, name: str) -> _Name:
        parts = tuple(name.split("."))
        return cls(parts, tuple(p for p in parts if p.isdigit()))

    @property
    def leaf(self) -> str:
        return self.parts[-1]


@dataclass(frozen=True)
class _Run:
    """One stretch where a checkpoint name and a target name differ: ``old`` at ``pos`` -> ``new``."""

    pos: int
    old: tuple[str, ...]
    new: tuple[str, ...]
    start: bool
    end: bool


def _align(a: tuple[str, ...], b: tuple[str, ...]) -> list[_Run] | None:
    """The runs that turn ``a`` into ``b`` (segments kept in order), or None when the names differ too
    much to be a rename or one side renumbers a layer."""
    n = min(len(a), len(b))
    p = 0
    while p < n and a[p] == b[p]:
        p += 1
    s = 0
    while s < n - p and a[-1 - s] == b[-1 - s]:
        s += 1
    mid_a, mid_b = a[p:len(a) - s], b[p:len(b) - s]
    if not set(mid_a) & set(mid_b):
        runs = [_Run(p, mid_a, mid_b, p == 0, s == 0)]
    else:
        runs = _block_runs(mid_a, mid_b, p, s == 0)
    if not runs or len(runs) > MAX_RUNS:
        return None
    for run in runs:
        if any(x.isdigit() for x in run.old) and any(x.isdigit() for x in run.new):
            return None  # renumbering is an offset, never a rename
    return runs


def _block_runs(a: tuple[str, ...], b: tuple[str, ...], offset: int, at_end: bool) -> list[_Run]:
    """Runs between the longest contiguous blocks the two middles share (difflib prefers long blocks,
    so ``base_model.model.model.layers`` against ``model.layers`` is one run, not two)."""
    runs: list[_Run] = []
    ri = rj = 0
    # the last block is difflib's empty sentinel at (len(a), len(b)): the gap before it is the tail
    for i, j, size in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        if ri < i or rj < j:
            tail = (i, j) == (len(a), len(b))
            runs.append(_Run(offset + ri, a[ri:i], b[rj:j], offset + ri == 0, at_end and tail))
        ri, rj = i + size, j + size
    return runs


def _similarity(runs: list[_Run]) -> float:
    return sum(difflib.SequenceMatcher(None, ".".join(r.old), ".".join(r.new)).ratio() for r in runs)


def _segment_similarity(runs: list[_Run]) -> float:
    return max((difflib.SequenceMatcher(None, x, y).ratio() for r in runs for x in r.old for y in r.new), default=0.0)


# ---------------------------------------------------------------------------------------------
# rules from runs


def _esc(parts: Sequence[str]) -> str:
    return re.escape(".".join(parts))


def _repl(parts: Sequence[str]) -> str:
    return ".".join(parts).replace("\\", "\\\\")


def _anchored(left: Sequence[str]) -> tuple[str, str]:
    """``^model\\.layers\\.(\\d+)`` and ``model.layers.\\1``: a left context with its numbers as groups."""
    pattern, repl, group = [], [], 0
    for part in left:
        if part.isdigit():
            group += 1
            pattern.append(r"(\d+)")
            repl.append(f"\\{group}")
        else:
            pattern.append(re.escape(part))
            repl.append(part.replace("\\", "\\\\"))
    return "^" + r"\.".join(pattern), ".".join(repl)


def _general_rule(run: _Run, name: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The widest rule that performs ``run``: it names the changed segments only."""
    old, new = run.old, run.new
    if run.start and run.end:
        return "rename", ("^" + _esc(name) + "$", _repl(new))
    if run.start:
        if not new:
            return "strip_prefix", (".".join(old) + ".",)
        if not old:
            return "add_prefix", (".".join(new) + ".",)
        return "rename", ("^" + _esc(old) + r"\.", _repl(new) + ".")
    if not old:  # an insertion is placed by its left neighbour (two segments when that is a number)
        width = 2 if name[run.pos - 1].isdigit() and run.pos >= 2 else 1
        left = name[run.pos - width:run.pos]
        pattern, repl = _anchored(left)
        if run.pos != width:
            pattern, repl = pattern.replace("^", r"\.", 1), "." + repl
        tail = "$" if run.end else r"\."
        return "rename", (pattern + tail, repl + "." + _repl(new) + ("" if run.end else "."))
    if run.end:  # the leaf: '\.gamma$' -> '.weight'
        return "rename", (r"\." + _esc(old) + "$", "." + _repl(new) if new else "")
    return "rename", (r"\." + _esc(old) + r"\.", "." + _repl(new) + "." if new else ".")


def _anchored_rule(run: _Run, name: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The narrow form: anchored at the key's start (numbers as groups), or at the next segment for a
    run at the start."""
    old, new = run.old, run.new
    if run.start and run.end:
        return _general_rule(run, name)
    if run.start:
        after = name[len(old)]
        last = len(old) + 1 == len(name)
        tail, rtail = ("$", "") if last else (r"\.", ".")
        pattern = "^" + (_esc(old) + r"\." if old else "") + re.escape(after) + tail
        return "rename", (pattern, (_repl(new) + "." if new else "") + _repl([after]) + rtail)
    pattern, repl = _anchored(name[:run.pos])
    tail, rtail = ("$", "") if run.end else (r"\.", ".")
    body = r"\." + _esc(old) if old else ""
    return "rename", (pattern + body + tail, repl + ("." + _repl(new) if new else "") + rtail)


# ---------------------------------------------------------------------------------------------
# the state of the inference


@dataclass
class _Fit:
    """How a list of checkpoint names (after the tail rules: ``names``) sits on the target."""

    names: list[str | None]
    landed: set[int]
    mismatched: set[int]
    unexpected: list[int]
    matched: set[int]  # target groups reached with the right shape
    present: set[int]  # target groups reached at all
    double: bool  # two checkpoint tensors reach one target tensor


@dataclass
class _Pair:
    index: int
    target: str
    runs: list[_Run]
    evidence: bool


class _State:
    """The checkpoint's names after the base rules (``base``) and after the rules inferred so far
    (``names``), with what the inference needs to know about both sides. The tail rules run after
    the inferred ones; a fit is always judged on the names they produce."""

    def __init__(self, base: list[str], metas: list[TensorMeta], groups: list[int],
                 target: Mapping[str, TensorMeta], target_groups: dict[str, int], tail: list[Rule]) -> None:
        self.base = base
        self.names = list(base)
        self.metas = metas
        self.groups = groups
        self.target = target
        self.target_groups = target_groups
        self.tail = tail
        self.group_count = len(set(target_groups.values()))
        self._parsed: dict[str, _Name] = {}

    def parsed(self, name: str) -> _Name:
        found = self._parsed.get(name)
        if found is None:
            found = self._parsed[name] = _Name.of(name)
        return found

    def fit(self, names: Sequence[str | None]) -> _Fit:
        """Raises RemapError when the tail rules collide on these names."""
        if self.tail:
            mapping = apply_remap([n for n in names if n is not None], self.tail).mapping
            names = [None if n is None else mapping.get(n) for n in names]
        landed, mismatched, unexpected, present = set(), set(), [], set()
        owner: dict[int, int] = {}
        double = False
        for i, name in enumerate(names):
            if name is None:
                continue
            group = self.target_groups.get(name)
            if group is None:
                unexpected.append(i)
                continue
            present.add(group)
            if self.target[name].shape != self.metas[i].shape:
                mismatched.add(i)
                continue
            landed.add(i)
            if owner.setdefault(group, self.groups[i]) != self.groups[i]:
                double = True
        return _Fit(list(names), landed, mismatched, unexpected, set(owner), present, double)

    def open_keys(self, fit: _Fit) -> list[int]:
        """Unexpected keys worth pairing: not a second name of a tensor that already lands."""
        landed_groups = {self.groups[i] for i in fit.landed}
        return [i for i in fit.unexpected if self.groups[i] not in landed_groups]

    def missing_names(self, fit: _Fit) -> list[str]:
        return [n for n, g in self.target_groups.items() if g not in fit.present]


# ---------------------------------------------------------------------------------------------
# step 1: layer offsets


_Template = tuple[tuple[str, ...], str | None]  # (container segments, child segment or None)


def _offset_candidates(state: _State, fit: _Fit) -> tuple[list[list[Rule]], list[dict]]:
    troubled = set(state.open_keys(fit)) | fit.mismatched
    templates: set[_Template] = set()
    for i in troubled:
        parts = state.parsed(fit.names[i]).parts
        for j, part in enumerate(parts):
            if part.isdigit():
                templates.add((parts[:j], None))
                if j + 1 < len(parts):
                    templates.add((parts[:j], parts[j + 1]))
    if not templates:
        return [], []
    ck = _signatures(((n, m.shape) for n, m in zip(fit.names, state.metas, strict=True) if n is not None),
                     templates, state)
    tg = _signatures(((n, m.shape) for n, m in state.target.items()), templates, state)
    candidates, ambiguous = [], []
    # whole layers before one child of them, shorter containers first
    for template in sorted(templates, key=lambda t: (t[1] is not None, len(t[0]), t)):
        cs, ts = ck.get(template, {}), tg.get(template, {})
        if not cs or not ts or all(cs[i] <= ts.get(i, frozenset()) for i in cs):
            continue
        shifts = _shifts(cs, ts)
        if len(shifts) == 1:
            candidates.append(_offset_rules(template, cs, shifts[0]))
        elif shifts:
            ambiguous += _offset_ambiguity(state, fit, troubled, template, shifts)
    return candidates, ambiguous


def _signatures(items, templates: set[_Template], state: _State) -> dict:
    """template -> layer index -> frozenset of (rest of the name, shape) under it."""
    out: dict = {}
    for name, shape in items:
        parts = state.parsed(name).parts
        for j, part in enumerate(parts):
            if not part.isdigit():
                continue
            whole = (parts[:j], None)
            if whole in templates:
                out.setdefault(whole, {}).setdefault(int(part), set()).add((parts[j + 1:], shape))
            if j + 1 < len(parts):
                child = (parts[:j], parts[j + 1])
                if child in templates:
                    out.setdefault(child, {}).setdefault(int(part), set()).add((parts[j + 2:], shape))
    return {t: {i: frozenset(s) for i, s in by_index.items()} for t, by_index in out.items()}


def _shifts(cs: dict[int, frozenset], ts: dict[int, frozenset]) -> list[int]:
    """Offsets under which every checkpoint layer fits the target layer it lands on; where several
    do, the one whose image is exactly the target's layers, if that is unique."""
    empty: frozenset = frozenset()
    deltas = sorted({t - c for c in cs for t in ts} - {0})
    good = [d for d in deltas if all(cs[i] <= ts.get(i + d, empty) for i in cs)]
    if len(good) > 1:
        full = [d for d in good if {i + d for i in cs} == set(ts)]
        if len(full) == 1:
            return full
    return good


def _offset_rules(template: _Template, cs: dict[int, frozenset], shift: int) -> list[Rule]:
    container, child = template
    # the dotted form reads best; keys ending at the index (or at the child) need the lookahead
    dotted = all(rest for entries in cs.values() for rest, _ in entries)
    tail, rtail = (r"\.", ".") if dotted else (r"(?=\.|$)", "")
    head = _esc(container) + r"\." if container else ""
    rhead = _repl(container) + "." if container else ""
    after = r"\." + re.escape(child) if child else ""
    rafter = "." + _repl([child]) if child else ""
    rules = []
    for i in sorted(cs, reverse=shift > 0):  # never rename a key a previous rule produced
        rules.append(Rule("rename", ("^" + head + str(i) + after + tail, rhead + str(i + shift) + rafter + rtail),
                          ORIGIN))
    return rules


def _offset_ambiguity(state: _State, fit: _Fit, troubled: set[int], template: _Template,
                      shifts: list[int]) -> list[dict]:
    container, child = template
    j = len(container)
    out = []
    for i in sorted(troubled):
        parts = state.parsed(fit.names[i]).parts
        if parts[:j] != container or len(parts) <= j or not parts[j].isdigit():
            continue
        if child is not None and parts[j + 1:j + 2] != (child,):
            continue
        shifted = [".".join((*container, str(int(parts[j]) + d), *parts[j + 1:])) for d in shifts]
        out.append({"side": "checkpoint", "key": i, "candidates": [n for n in shifted if n in state.target]})
    return out


# ---------------------------------------------------------------------------------------------
# step 2: pairs


def _pairs(state: _State, fit: _Fit, widen: bool = False) -> tuple[list[_Pair], list[dict]]:
    """Pairs and ambiguities among the open keys. Candidates keep the key's layer numbers; with
    ``widen``, also those that add or remove numbered segments (``to_out`` -> ``to_out.0``), which
    would otherwise beat the right pair on run counts (``resblocks.0.ln_1`` -> ``ln_pre``)."""
    open_keys = state.open_keys(fit)
    by_numbers: dict[tuple, list[str]] = {}  # (shape, layer numbers) -> missing names
    by_count: dict[tuple, dict[int, list[str]]] = {}  # shape -> how many numbers -> missing names
    for name in state.missing_names(fit):
        shape, numbers = state.target[name].shape, state.parsed(name).numbers
        by_numbers.setdefault((shape, numbers), []).append(name)
        by_count.setdefault(shape, {}).setdefault(len(numbers), []).append(name)
    open_shapes: dict[tuple, int] = {}
    for i in open_keys:
        open_shapes[state.metas[i].shape] = open_shapes.get(state.metas[i].shape, 0) + 1

    claims: dict[int, list[tuple[tuple, int, str, list[_Run]]]] = {}
    ambiguous: list[dict] = []
    for i in open_keys:
        shape, name = state.metas[i].shape, state.parsed(fit.names[i])
        pool = list(by_numbers.get((shape, name.numbers), ()))  # numbers are never changed
        for count, names in by_count.get(shape, {}).items() if widen else ():
            if count != len(name.numbers):
                pool += names
        best = _best(state, i, name, pool)
        if not best:
            continue
        if len({state.target_groups[m] for _, m, _ in best}) > 1:
            ambiguous.append({"side": "checkpoint", "key": i, "candidates": sorted(m for _, m, _ in best)})
            continue
        score, m, runs = best[0]
        claims.setdefault(state.target_groups[m], []).append((score, i, m, runs))

    pairs: list[_Pair] = []
    for claimants in claims.values():
        claimants.sort(key=lambda c: (c[0], c[1]))
        top = [c for c in claimants if c[0] == claimants[0][0]]
        if len({state.groups[c[1]] for c in top}) > 1:  # two tensors, equally fit: not ours to choose
            ambiguous.append({"side": "target", "key": top[0][2], "candidates": sorted(c[1] for c in top)})
            continue
        _, i, m, runs = top[0]
        shape = state.metas[i].shape
        unique = open_shapes[shape] == 1 and sum(len(n) for n in by_count[shape].values()) == 1
        pairs.append(_Pair(i, m, runs, unique or _plain_move(runs, state.parsed(fit.names[i]), state.parsed(m))))
    pairs.sort(key=lambda p: p.index)
    return pairs, ambiguous


def _plain_move(runs: list[_Run], a: _Name, b: _Name) -> bool:
    """Evidence for a lone pair: the same leaf with segments only added or removed, or similar names."""
    if a.leaf == b.leaf and all(not r.old or not r.new for r in runs):
        return True
    return _segment_similarity(runs) >= SIMILAR


def _best(state: _State, i: int, name: _Name, pool: list[str]) -> list[tuple[tuple, str, list[_Run]]]:
    """The candidates of key ``i`` that tie for the best score (one per target tensor)."""
    scored = []
    for m in pool:
        other = state.parsed(m)
        runs = _align(name.parts, other.parts)
        if runs is None:
            continue
        changed = sum(len(r.old) + len(r.new) for r in runs)
        scored.append(((name.leaf != other.leaf, len(runs), changed, abs(len(name.parts) - len(other.parts))), m, runs))
    if not scored:
        return []
    low = min(s[0] for s in scored)
    best = [s for s in scored if s[0] == low]
    if len(best) > 1:  # finer criteria only where the structure ties
        dtype = state.metas[i].dtype
        fine = [((*s, -round(_similarity(r), 9), state.target[m].dtype != dtype), m, r) for s, m, r in best]
        low = min(f[0] for f in fine)
        best = [f for f in fine if f[0] == low]
    seen: dict[int, tuple] = {}
    for entry in best:
        seen.setdefault(state.target_groups[entry[1]], entry)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# step 3: rule sets from pairs


@dataclass
class _Candidate:
    rules: list[Rule]
    pairs: list[_Pair]
    family: int  # candidates of one family are alternatives: the first that passes wins


def _rule_candidates(state: _State, fit: _Fit, pairs: list[_Pair]) -> list[_Candidate]:
    """Per family of pairs that share a run (widest family first): the whole family, then each of its
    edit scripts alone; each at the general level, then anchored."""
    specs: list[list[tuple]] = []  # per pair, per run: (position, general rule, anchored rule)
    parent: dict[tuple, tuple] = {}

    def find(x: tuple) -> tuple:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for pair in pairs:
        name = state.parsed(fit.names[pair.index]).parts
        entry = [(r.pos, _general_rule(r, name), _anchored_rule(r, name)) for r in pair.runs]
        specs.append(entry)
        for _, general, _ in entry[1:]:
            parent[find(general)] = find(entry[0][1])
    families: dict[tuple, list[int]] = {}
    for k, entry in enumerate(specs):
        families.setdefault(find(entry[0][1]), []).append(k)

    out: list[_Candidate] = []
    ordered = sorted(families.values(), key=lambda ks: (-len(ks), pairs[ks[0]].index))
    for family, members in enumerate(ordered):
        scripts: dict[tuple, list[int]] = {}
        for k in members:
            scripts.setdefault(tuple(sorted(s[1] for s in specs[k])), []).append(k)
        subsets = [members]
        if len(scripts) > 1:
            subsets += sorted(scripts.values(), key=lambda ks: (-len(ks), ks[0]))
        for ks in subsets:
            for level in (1, 2):
                rules = _ordered_rules([s for k in ks for s in specs[k]], level)
                out.append(_Candidate(rules, [pairs[k] for k in ks], family))
    return out


def _ordered_rules(entries: list[tuple], level: int) -> list[Rule]:
    """Rules of one generality, rightmost runs first: rules anchored at the key's start then still
    see the left part unchanged."""
    position: dict[tuple, int] = {}
    for pos, general, anchored in entries:
        spec = general if level == 1 else anchored
        position[spec] = max(position.get(spec, -1), pos)
    ordered = sorted(position, key=lambda spec: (-position[spec], spec))
    return [Rule(kind, args, ORIGIN) for kind, args in ordered]


# ---------------------------------------------------------------------------------------------
# step 4: checks


def _accept(state: _State, fit: _Fit, rules: list[Rule],
            pairs: Sequence[_Pair]) -> tuple[list[Rule], list[str], _Fit] | None:
    """The rules that did something, the new names and their fit when ``rules`` help and harm
    nothing; None otherwise."""
    try:
        result = apply_remap(state.names, rules)
        new = [result.mapping[n] for n in state.names]
        after = state.fit(new)
    except (RemapError, KeyError):  # a collision, or a rule that emptied or dropped a key
        return None
    if after.double or len(after.matched) <= len(fit.matched):
        return None
    if not fit.landed <= after.landed or not after.mismatched <= fit.mismatched:
        return None
    if len(after.unexpected) > len(fit.unexpected):
        return None
    if any(after.names[p.index] != p.target for p in pairs):
        return None
    if len(after.landed - fit.landed) == 1 and len(pairs) == 1 and not pairs[0].evidence:
        return None
    idle = {id(r) for r in result.unmatched_rules}
    return [r for r in rules if id(r) not in idle], new, after


# ---------------------------------------------------------------------------------------------
# step 5: aliases


def _drop_rule(state: _State, fit: _Fit) -> Rule | None:
    """One ``drop`` for the checkpoint's second names of tensors that land, by module where it can."""
    landed_groups = {state.groups[i] for i in fit.landed}
    doomed_at = {i for i in fit.unexpected if state.groups[i] in landed_groups}
    if not doomed_at:
        return None
    doomed = {state.names[i] for i in doomed_at}
    kept = [n for k, n in enumerate(state.names) if k not in doomed_at]
    globs: set[str] = set()
    for name in sorted(doomed):
        parts = name.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if not any(k.startswith(prefix + ".") or k == prefix for k in kept):
                globs.add(_glob_escape(prefix) + ".*")
                break
        else:
            globs.add(_glob_escape(name))
    return Rule("drop", tuple(sorted(globs)), ORIGIN)


def _glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# ---------------------------------------------------------------------------------------------
# the driver


def infer_rules(checkpoint: Mapping[str, TensorMeta], target: Mapping[str, TensorMeta], *,
                checkpoint_aliases: Sequence[Sequence[str]] = (), target_aliases: Sequence[Sequence[str]] = (),
                base_rules: Sequence[Rule] = (), tail_rules: Sequence[Rule] = ()) -> Inference:
    """Rules that make more of ``checkpoint``'s keys land on ``target``'s, run in the chain
    ``base_rules + inferred + tail_rules``.

    ``checkpoint_aliases`` / ``target_aliases``: groups of names that are one tensor (tied weights,
    a module reachable under two names); a group counts once, and a checkpoint alias of a tensor
    that lands is dropped rather than paired. ``tail_rules``: rules that run after the inferred ones
    (a model preset's own remap, which the diff runs after the user's rules). Raises RemapError only
    when the given rules themselves collide.
    """
    base = apply_remap(checkpoint, list(base_rules))
    originals = list(base.mapping)
    state = _State([base.mapping[k] for k in originals], [checkpoint[k] for k in originals],
                   _group_ids(originals, checkpoint_aliases), target, _target_groups(target, target_aliases),
                   list(tail_rules))
    start = fit = state.fit(state.names)
    accepted: list[Rule] = []
    spare: set[int] = set()  # ids of rules from pairs (an offset's rules are all needed)
    for _ in range(MAX_ROUNDS):
        progress, fit = _round(state, fit, accepted, spare)
        if not progress:
            break
    fit = _prune(state, fit, accepted, spare)
    if accepted:
        drop = _drop_rule(state, fit)
        if drop is not None:
            accepted.append(drop)
    ambiguous = _final_ambiguity(state, fit, originals)
    chain = (list(base_rules), accepted, list(tail_rules))
    return _result(checkpoint, state, start, chain, ambiguous)


def _round(state: _State, fit: _Fit, accepted: list[Rule], spare: set[int]) -> tuple[bool, _Fit]:
    """One round: an offset if one fits, else rule sets from pairs; True when something was accepted."""
    offsets, _ = _offset_candidates(state, fit)
    for rules in offsets:
        outcome = _accept(state, fit, rules, ())
        if outcome is not None:
            used, state.names, fit = outcome
            accepted += used
            return True, fit
    for widen in (False, True):
        pairs, _ = _pairs(state, fit, widen)
        progress, done = False, set()
        for candidate in _rule_candidates(state, fit, pairs):
            if candidate.family in done:
                continue
            outcome = _accept(state, fit, candidate.rules, candidate.pairs)
            if outcome is not None:
                used, state.names, fit = outcome
                accepted += used
                spare.update(id(r) for r in used)
                done.add(candidate.family)
                progress = True
        if progress:
            return True, fit
    return False, fit


def _prune(state: _State, fit: _Fit, accepted: list[Rule], spare: set[int]) -> _Fit:
    """Drop rules from pairs that the rest makes unnecessary (a family's rename that the tail rules
    already perform), last first; the landed keys and counts must stay exactly the same."""
    for rule in [r for r in reversed(accepted) if id(r) in spare]:
        trial = [r for r in accepted if r is not rule]
        try:
            mapping = apply_remap(state.base, trial).mapping
            names = [mapping[n] for n in state.base]
            after = state.fit(names)
        except (RemapError, KeyError):
            continue
        if (after.landed, after.matched, len(after.unexpected)) == (fit.landed, fit.matched, len(fit.unexpected)):
            accepted.remove(rule)
            state.names, fit = names, after
    return fit


def _final_ambiguity(state: _State, fit: _Fit, originals: list[str]) -> list[dict]:
    """Ambiguities among the keys still open after the rules, named as the checkpoint names them."""
    _, from_offsets = _offset_candidates(state, fit)
    _, same_numbers = _pairs(state, fit)
    _, widened = _pairs(state, fit, widen=True)
    out: dict[tuple[str, Any], dict] = {}
    for entry in from_offsets + same_numbers + widened:  # the narrowest view of a key wins
        out.setdefault((entry["side"], entry["key"]), entry)
    named = []
    for entry in out.values():
        if entry["side"] == "checkpoint":
            named.append({**entry, "key": originals[entry["key"]]})
        else:
            named.append({**entry, "candidates": [originals[i] for i in entry["candidates"]]})
    return named


def _group_ids(names: list[str], aliases: Sequence[Sequence[str]]) -> list[int]:
    first: dict[str, int] = {}
    for number, group in enumerate(aliases):
        for name in group:
            first.setdefault(name, number)
    fresh = len(aliases)
    ids = []
    for name in names:
        if name not in first:
            first[name] = fresh
            fresh += 1
        ids.append(first[name])
    return ids


def _target_groups(target: Mapping[str, TensorMeta], aliases: Sequence[Sequence[str]]) -> dict[str, int]:
    return dict(zip(target, _group_ids(list(target), aliases), strict=True))


def _result(checkpoint: Mapping[str, TensorMeta], state: _State, start: _Fit,
            chain: tuple[list[Rule], list[Rule], list[Rule]], ambiguous: list[dict]) -> Inference:
    base_rules, accepted, tail_rules = chain
    before = _counts(state, start)
    note = ""
    if accepted:
        # judged once more on the whole chain from the checkpoint's own names, as a user will run it
        final = apply_remap(checkpoint, base_rules + accepted + tail_rules).mapping
        names = [final.get(k) for k in apply_remap(checkpoint, base_rules).mapping]
        state.tail = []
        end = state.fit(names)
        share = max(_checkpoint_share(state, end), len(end.matched) / max(state.group_count, 1))
        if len(end.matched) <= len(start.matched):
            accepted = []
        elif share < RELATED_FRACTION:
            note = (f"no rules suggested: with the best rules found, {share:.0%} of the checkpoint's or the "
                    "target's tensors fit; they look like different models")
            accepted, ambiguous = [], []
    if not accepted:
        return Inference([], [], *_interleave(before, before), ambiguous=ambiguous, note=note)
    return Inference(accepted, _maps(state.base, accepted), *_interleave(before, _counts(state, end)),
                     ambiguous=ambiguous)


def _counts(state: _State, fit: _Fit) -> tuple[int, int, int]:
    return len(fit.matched), len(fit.unexpected), state.group_count - len(fit.present)


def _interleave(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[int, ...]:
    return before[0], after[0], before[1], after[1], before[2], after[2]


def _checkpoint_share(state: _State, fit: _Fit) -> float:
    landed = {state.groups[i] for i in fit.landed}
    return len(landed) / max(len(set(state.groups)), 1)


def _maps(names: list[str], rules: list[Rule]) -> list[int]:
    """How many keys each rule changes or drops, run in order."""
    counts = [0] * len(rules)
    for name in names:
        current: str | None = name
        for k, rule in enumerate(rules):
            after = rule.apply(current)
            if rule.matched(current, after):
                counts[k] += 1
            current = after
            if current is None:
                break
    return counts


__all__ = ["Inference", "infer_rules"]

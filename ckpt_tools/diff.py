"""diff_keys(checkpoint, target) -> KeyReport: which checkpoint tensors a model would take, and why not.

Both sides become a ``Side``: TensorMeta per name plus alias groups (names that are one tensor).
A target tensor reachable under several names is covered when any name is present; a checkpoint
tensor stored under several names counts once. Each target tensor gets one status:

- ``matched``             same name, shape and dtype
- ``dtype_mismatch``      same shape, other dtype: loads with a cast
- ``shape_mismatch``      would crash ``load_state_dict``: excluded from a load
- ``missing_expected``    not in the checkpoint, and allowed to be (frozen, --expect-missing, preset,
                          or the model re-creates it: a tie it makes, transformers' ignore lists)
- ``missing_unexpected``  a trained parameter (or a --require glob) the checkpoint does not cover

and each checkpoint tensor that lands nowhere is ``unexpected``, unless the model re-creates or
ignores it when loading (a non-persistent buffer): then it is ``ignored``. The verdict fails on shape
mismatches, unexpected missing keys and unexpected keys; a dtype cast is reported, not failed.
Nothing here raises on the first problem: every problem is collected, with a fix where one can be
inferred (a prefix, a known rename, a layer interval, an embedding size, the preset's hints).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .errors import RemapError, UsageError
from .formats import open_checkpoint
from .infer import Inference, flag_words, infer_rules, rule_flags
from .meta import TensorMeta
from .naming import collapse, format_numbers, module_prefix
from .presets import ModelPreset, get_preset
from .remap import Rule, apply_remap, coerce_rules
from .render import human_count, markdown_table, plural, rich_table
from .side import Side
from .stats import ValueDiffReport, value_diff
from .targets import TargetOptions, open_side, resolve_target

COUNT_NAMES = ("matched", "dtype_mismatch", "shape_mismatch", "unexpected", "missing_expected",
               "missing_unexpected")
FAILING_KINDS = frozenset({"shape_mismatch", "missing_unexpected", "unexpected", "load", "value_check",
                           "value_change"})
LOADABLE = frozenset({"matched", "dtype_mismatch"})
# failing problems that are about values or the load, not keys, as the summary line counts them
OTHER_FAILURES = {"value_change": "value change", "value_check": "failed value check", "load": "load problem"}

# Module renames made by libraries between releases: (old segment, new segment, why).
KNOWN_RENAMES: tuple[tuple[str, str, str], ...] = (
    ("embed_out", "lm_head", "transformers 5 renamed GPT-NeoX's output head"),
    ("gamma", "weight", "old LayerNorm checkpoints"),
    ("beta", "bias", "old LayerNorm checkpoints"),
)
# Names of token-embedding-like tensors: a first-dimension mismatch there is a tokenizer length.
EMBEDDING_GLOBS = ("*embed*", "*wte*", "*lm_head*", "*word_embeddings*")
# How many problem groups / coverage rows a table shows before it says "and N more".
MAX_GROUPS = 12


# ---------------------------------------------------------------------------------------------
# the two sides


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class Problem:
    kind: str
    key: str
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "detail": self.detail, "fix": self.fix}


@dataclass
class CoverageRow:
    module: str
    status: str
    keys_covered: int
    keys_total: int
    params_covered: int
    params_total: int

    def to_dict(self) -> dict:
        return {"module": self.module, "status": self.status, "keys_covered": self.keys_covered,
                "keys_total": self.keys_total, "params_covered": self.params_covered,
                "params_total": self.params_total}

    def row(self) -> list[object]:
        return [self.module, f"{self.keys_covered}/{self.keys_total}",
                f"{human_count(self.params_covered)}/{human_count(self.params_total)}", self.status]


@dataclass
class Entry:
    """One target tensor (all its names) and what the checkpoint offers for it."""

    names: list[str]
    status: str
    model: TensorMeta
    ckpt_key: str | None = None  # the checkpoint's own (pre-remap) name of the source tensor
    ckpt: TensorMeta | None = None  # its meta, under the target's name
    reason: str = ""
    also: list[str] = field(default_factory=list)  # other checkpoint keys covering the same tensor

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class KeyReport:
    html_kind = "diff"  # the page ckpt_tools.html renders for it (--format html)

    source: str
    target: str
    entries: list[Entry]
    problems: list[Problem]
    hints: list[dict]
    coverage: list[CoverageRow]
    unexpected: list[str] = field(default_factory=list)  # the checkpoint's own names
    unexpected_metas: dict[str, TensorMeta] = field(default_factory=dict)  # by remapped name, same order
    duplicates: dict[str, str] = field(default_factory=dict)  # checkpoint alias -> name it repeats
    dropped: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    unmatched_require: list[str] = field(default_factory=list)
    load: dict | None = None
    inference: Inference | None = None  # remap rules inferred when keys did not match
    with_inferred: dict | None = None  # {"verdict", "counts", "summary"} the checkpoint gets with them
    auto_remapped: bool = False  # this report is the one with the inferred rules applied
    values: ValueDiffReport | None = None  # the values of matched tensors, against another checkpoint
    ignored: list[str] = field(default_factory=list)  # checkpoint keys the model re-creates or ignores
    model: Any = field(default=None, repr=False, compare=False)  # the model load_checkpoint built, if it built one

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(COUNT_NAMES, 0)
        for entry in self.entries:
            counts[entry.status] += 1
        counts["unexpected"] = len(self.unexpected)
        counts["missing_unexpected"] += len(self.unmatched_require)
        return counts

    @property
    def verdict(self) -> str:
        return "fail" if any(p.kind in FAILING_KINDS for p in self.problems) else "ok"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def loadable(self) -> list[Entry]:
        return [e for e in self.entries if e.status in LOADABLE]

    def to_dict(self) -> dict:
        out = {
            "verdict": self.verdict,
            "source": self.source,
            "target": self.target,
            "counts": self.counts,
            "problems": [p.to_dict() for p in self.problems],
            "coverage": [row.to_dict() for row in self.coverage],
            "hints": list(self.hints),
            "duplicates": len(self.duplicates),
            "dropped": list(self.dropped),
            "remap": list(self.rules),
            "ignored": list(self.ignored),
            "entries": self.entry_dicts(),
            "inferred_rules": self.inference.to_dict()["inferred_rules"] if self.inference else [],
            "auto_remap": self.auto_remapped,
        }
        if self.values is not None:
            out["value_diff"] = self.values.to_dict()
        if self.inference is not None:
            out["inference"] = {**{k: v for k, v in self.inference.to_dict().items() if k != "inferred_rules"},
                                "with_rules": self.with_inferred}
        if self.load is not None:
            out["load"] = dict(self.load)
        return out

    def entry_dicts(self) -> list[dict]:
        """One dict per target tensor, then one per unexpected checkpoint tensor: the per-key view
        (``key``, ``status``, the checkpoint's ``shape``/``dtype``/``nbytes``, the target's
        ``target_shape``/``target_dtype``, ``checkpoint_key`` when a remap renamed it, ``aliases``,
        ``reason``), then one per checkpoint tensor the model ignores (``ignored``)."""
        out = [_entry_dict(entry) for entry in self.entries]
        for old, (new, meta) in zip(self.unexpected, self.unexpected_metas.items(), strict=True):
            out.append({"key": new, "status": "unexpected", "shape": list(meta.shape), "dtype": meta.dtype,
                        "nbytes": meta.nbytes, "target_shape": None, "target_dtype": None,
                        "checkpoint_key": old if old != new else None, "aliases": [], "reason": ""})
        out += [{"key": key, "status": "ignored", "shape": None, "dtype": None, "nbytes": None, "target_shape": None,
                 "target_dtype": None, "checkpoint_key": None, "aliases": [],
                 "reason": "the model re-creates it when loaded"} for key in self.ignored]
        return out

    # -- rendering --

    def summary_line(self) -> str:
        c = self.counts
        parts = [f"{c['matched']} matched"]
        parts += [f"{c[k]} {k.replace('_', ' ')}" for k in COUNT_NAMES[1:] if c[k]]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} checkpoint duplicates counted once")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored (the model re-creates them)")
        for kind, what in OTHER_FAILURES.items():  # failures that are not key counts
            n = sum(1 for p in self.problems if p.kind == kind)
            if n:
                parts.append(plural(n, what))
        return ", ".join(parts)

    def verdict_line(self) -> str:
        text = f"verdict: {self.verdict.upper()} ({self.summary_line()})"
        if self.load is not None:
            text += f"; loaded {self.load.get('loaded', 0)}, verified: {str(self.load.get('verified')).lower()}"
        return text

    def inference_line(self) -> str:
        """``with these 2 rules: OK (171 matched)``, and how to use them."""
        n = len(self.inference.rules)
        if not n:
            return (f"no rule inferred: {plural(len(self.inference.ambiguous), 'ambiguous pairing')} (below) could "
                    "go either way; say which with --rename REGEX=REPL")
        head, them = ("with this inferred rule", "it") if n == 1 else (f"with these {n} inferred rules", "them")
        if self.auto_remapped:
            return f"applied {plural(n, 'inferred rule')} (--auto-remap): see below"
        return (f"{head}: {self.with_inferred['verdict'].upper()} ({self.with_inferred['summary']}); "
                f"write {them} with --write-rules FILE, or apply {them} with --auto-remap")

    def problem_groups(self) -> list[list[object]]:
        return group_problems(self.problems)

    def rich_table(self, *, with_verdict: bool = True):
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [Text(f"{self.source}  vs  {self.target}", style="bold")]
        parts.append(rich_table("coverage", ["module", "keys", "params", "status"],
                                [r.row() for r in self.coverage], justify_right=("keys", "params")))
        groups = self.problem_groups()
        if groups:
            parts.append(rich_table("problems", ["kind", "keys", "n", "detail", "fix"], groups,
                                    justify_right=("n",)))
        for hint in self.hints:
            parts.append(Text(f"hint: {_hint_text(hint)}"))
        if self.inference is not None:
            parts += [Text(self.inference_line(), style="bold"), self.inference.rules_table()]
        if self.values is not None:
            parts.append(self.values.rich_table())
        if self.load is not None:
            parts.append(Text("load: " + _load_text(self.load)))
        if with_verdict:
            parts.append(Text(self.verdict_line(), style="bold green" if self.ok else "bold red"))
        return Group(*parts)

    def to_markdown(self) -> str:
        mark = "✅" if self.ok else "❌"
        lines = [f"### {mark} Key report: **{self.verdict}**", "",
                 f"`{self.source}` vs `{self.target}`: {self.summary_line()}.", "",
                 markdown_table(["module", "keys", "params", "status"], [r.row() for r in self.coverage])]
        groups = self.problem_groups()
        if groups:
            lines += ["", "**Problems**", "",
                      markdown_table(["kind", "keys", "n", "detail", "fix"],
                                     [[k, f"`{keys}`", n, d, f"`{f}`" if f else ""] for k, keys, n, d, f in groups])]
        if self.hints:
            lines += [""] + [f"- hint: {_hint_text(h)}" for h in self.hints]
        if self.inference is not None:
            flags = rule_flags(self.inference.rules, self.inference.maps)
            lines += ["", f"**{self.inference_line()}**" + (f": `{flags}`" if flags else "")]
            lines += [f"- ambiguous: `{a['key']}` could be {', '.join(f'`{c}`' for c in a['candidates'])}"
                      for a in self.inference.ambiguous]
        if self.values is not None:
            lines += ["", self.values.to_markdown()]
        if self.load is not None:
            lines += ["", f"**Load**: {_load_text(self.load)}"]
        return "\n".join(lines) + "\n"


def _hint_text(hint: Mapping) -> str:
    text = str(hint.get("detail") or hint.get("message") or hint)
    if hint.get("fix"):
        text += f" (fix: {hint['fix']})"
    return text


def _load_text(load: Mapping) -> str:
    bits = [f"{plural(load.get('loaded', 0), 'tensor')} loaded", f"verified: {str(load.get('verified')).lower()}"]
    if load.get("ranks"):  # a sharded model: what each rank read of the state's bytes
        read = ", ".join(f"rank {r['rank']} {r['bytes_read']:,}" for r in load["ranks"][:8])
        bits.append(f"bytes read of {load.get('state_bytes', 0):,}: {read}"
                    + (f" (+{len(load['ranks']) - 8} ranks)" if len(load["ranks"]) > 8 else ""))
    if load.get("skipped"):
        bits.append(f"{len(load['skipped'])} skipped")
    if load.get("mismatched"):
        bits.append(f"differ after load: {', '.join(load['mismatched'][:3])}")
    bits += [f"check: {c['key']}: {c['detail']}" for c in load.get("checks", [])]
    return "; ".join(bits)


def group_problems(problems: Sequence[Problem], limit: int = MAX_GROUPS) -> list[list[object]]:
    """Rows ``[kind, collapsed keys, count, detail, fix]``: problems with one kind and fix share a
    row, their keys collapsed to module patterns, so thousands of keys stay a few lines."""
    buckets: dict[tuple[str, str | None], list[Problem]] = {}
    for p in problems:
        buckets.setdefault((p.kind, p.fix), []).append(p)
    rows: list[list[object]] = []
    for (kind, fix), items in buckets.items():
        detail_of = {p.key: p.detail for p in items}
        for pattern, members in _collapse_keys(list(detail_of)):
            # each row's detail comes from its own keys: one row never shows another key's shapes
            details = list(dict.fromkeys(detail_of[k] for k in members))
            detail = details[0] if len(details) == 1 else f"{details[0]} (and {len(details) - 1} other details)"
            rows.append([kind, pattern, len(members), detail, fix or ""])
    if len(rows) > limit:
        rest = rows[limit - 1:]
        rows = rows[:limit - 1] + [["...", f"{len(rest)} more groups", sum(r[2] for r in rest), "", ""]]
    return rows


def _collapse_keys(keys: list[str], max_rows: int = 4) -> list[tuple[str, list[str]]]:
    """Collapse keys into as few patterns as possible (at most ``max_rows``), each with the keys it
    stands for, preferring the finest level among equals: exact keys with numbered layers collapsed,
    whole modules (``blocks.{1,3}.x.*``), numbered blocks (``blocks.{0..2}.xattn.*``), then module
    prefixes."""
    best = list(collapse(keys).items())
    levels = [lambda k: module_prefix(k) or k, _template_prefix]
    levels += [lambda k, d=d: module_prefix(k, d) or k for d in range(max(len(k.split(".")) for k in keys), 0, -1)]
    for level in levels:
        if len(best) <= 1:
            break
        by_prefix: dict[str, list[str]] = {}
        for key in keys:
            by_prefix.setdefault(level(key), []).append(key)
        rows = []
        for name, members in collapse(by_prefix).items():
            inside = [k for m in members for k in by_prefix[m]]
            rows.append((inside[0], inside) if len(inside) == 1 else (f"{name}.*", inside))
        if len(rows) < len(best):
            best = rows
    return best if len(best) <= max_rows else [("*", keys)]


def _template_prefix(key: str) -> str:
    """The module up to a key's first layer number and one more segment (``a.blocks.3.xattn``)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 2]) if i + 2 < len(parts) else ".".join(parts[:i + 1])
    return module_prefix(key) or key


# ---------------------------------------------------------------------------------------------
# the diff


def _matches(names: Iterable[str], globs: Sequence[str]) -> str | None:
    for glob in globs:
        if any(fnmatch.fnmatchcase(name, glob) for name in names):
            return glob
    return None


@dataclass
class _Expectations:
    require: Sequence[str] = ()
    expect_missing: Sequence[str] = ()
    preset_require: Sequence[str] = ()
    preset_expect: Sequence[str] = ()
    recreated: Mapping[str, str] = field(default_factory=dict)  # the target's own: name -> why

    def classify(self, names: list[str], trainable: bool | None) -> tuple[bool, str]:
        """(expected?, why). The user's flags beat the preset's, require beats expect, and both beat
        what the model says it re-creates."""
        for globs, expected, why in ((self.require, False, "--require"),
                                     (self.expect_missing, True, "--expect-missing"),
                                     (self.preset_require, False, "the preset requires it"),
                                     (self.preset_expect, True, "the preset expects it missing")):
            glob = _matches(names, globs)
            if glob is not None:
                return expected, f"{why} '{glob}'" if why.startswith("--") else why
        why = next((self.recreated[n] for n in names if n in self.recreated), None)
        if why is not None:
            return True, why
        if trainable is None:
            return False, "the target holds it"
        return (not trainable), ("frozen in the model" if not trainable else "a trained parameter")


def diff_keys(checkpoint, target, *, remap=None, expect_missing: Sequence[str] = (),
              require: Sequence[str] = (), preset=None, select: str | None = None,
              inert: bool = False, model_class: str | None = None, trust_remote_code: bool = False,
              endpoint: str | None = None, token: str | bool | None = None, auto_remap: bool = False,
              values: bool = False, max_change: float | None = None) -> KeyReport:
    """Compare a checkpoint's keys with a target's; never loads tensor bytes.

    ``checkpoint``: a Checkpoint, a path or hf:// reference, or a mapping of TensorMeta (or tensors).
    ``target``: an nn.Module (real or meta), a ModelPreset, a mapping of TensorMeta, a Checkpoint, or
    a string: a preset name, a transformers folder or config.json, ``hf://ORG/NAME[@REVISION]``,
    ``timm:NAME``, ``open_clip:NAME``, ``package.module:callable`` (runs that code), a model-config
    file (.json/.toml) or another checkpoint (see ``targets.py``).
    ``remap``: rules (Rule objects or rules-file dicts) applied to the checkpoint's keys before the
    preset's own remap. ``preset``: a preset whose remap, expectations and hints apply to a target
    given as a model (``load_checkpoint`` passes it). ``select``/``inert``: as ``open_checkpoint``.
    ``model_class``, ``trust_remote_code``: how a transformers target is built (a repository's own
    code runs only with ``trust_remote_code``). ``endpoint``/``token``: the hub or mirror for
    hf:// sources and targets.
    ``auto_remap``: apply the remap rules inferred when keys do not match (always reported).
    ``values``: against another checkpoint, also compare the values of the tensors that match
    (``stats.value_diff``: streaming, one pair at a time); ``max_change``: a relative change above it
    is a problem. The key verdict is unchanged by values unless ``max_change`` is given.
    """
    ck, opened = open_side(checkpoint, select=select, inert=inert, endpoint=endpoint, token=token)
    options = TargetOptions(model_class, trust_remote_code, endpoint, token)
    try:
        side = resolve_target(target, options)
    finally:
        if opened is not None:
            opened.close()  # the listing is all a diff needs
    if preset is not None:
        side.preset = preset if isinstance(preset, ModelPreset) else get_preset(str(preset))
    report = compare(ck, side, remap=remap, expect_missing=expect_missing, require=require, auto_remap=auto_remap)
    if values or max_change is not None:
        _compare_values(report, checkpoint, side, max_change, {"select": select, "inert": inert})
    return report


def _compare_values(report: KeyReport, checkpoint, side: Side, max_change: float | None, options: dict) -> None:
    """The value diff of the tensors the key report matched, read side by side."""
    if side.source is None:
        raise UsageError("values can only be compared with another checkpoint", path=str(checkpoint),
                         fix="use --against SOURCE2 with --values")
    pairs = [(e.ckpt_key, e.name) for e in report.loadable()]
    with (checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint, **options)) as a, \
            open_checkpoint(side.source) as b:
        report.values = value_diff(a, b, pairs=pairs, max_change=max_change)
    report.problems += [Problem(**problem) for problem in report.values.problems]


def compare(ck: Side, target: Side, *, remap=None, expect_missing: Sequence[str] = (),
            require: Sequence[str] = (), infer: bool = True, auto_remap: bool = False) -> KeyReport:
    """The diff proper, on two resolved sides (what ``load_checkpoint`` calls on its own model).

    When checkpoint keys land nowhere, remap rules are inferred from names and shapes
    (``infer.infer_rules``) and the report says what the checkpoint would get with them; they are
    applied only with ``auto_remap`` (and the report then says so)."""
    preset_rules = coerce_rules(list(target.preset.remap) if target.preset else [])
    user_rules = coerce_rules(remap)
    report = _compare(ck, target, user_rules, preset_rules, expect_missing, require)
    if not infer or not report.unexpected:
        return report
    inference = infer_rules(ck.metas, target.metas, checkpoint_aliases=ck.groups, target_aliases=target.groups,
                            base_rules=user_rules, tail_rules=preset_rules)
    if not inference.rules:
        if inference.ambiguous:  # nothing applied, but the pairings that could go either way are said
            report.inference = inference
        return report
    with_rules = _compare(ck, target, user_rules + inference.rules, preset_rules, expect_missing, require)
    checked = {"verdict": with_rules.verdict, "counts": with_rules.counts, "summary": with_rules.summary_line()}
    if with_rules.ok and not auto_remap:
        _point_at_inferred(report, with_rules, inference.rules)
    chosen = with_rules if auto_remap else report
    chosen.inference, chosen.with_inferred, chosen.auto_remapped = inference, checked, auto_remap
    return chosen


GUESSED_HINTS = ("prefix", "rename", "layers")  # guesses from names alone; a preset's hints are knowledge
INFERRED_FIX = "apply the inferred rules: --auto-remap (or --write-rules FILE to keep them)"


def _point_at_inferred(report: KeyReport, with_rules: KeyReport, rules: Sequence[Rule]) -> None:
    """When the inferred rules make the checkpoint fit, they are the fix: each problem they solve
    points at them (unless its fix already says exactly them), and guesses from names alone that
    say something else (a prefix that lands layers one index off, "build the model with layers
    1..4") are dropped rather than shown beside a fix that contradicts them."""
    inferred = flag_words(rules)

    def same(fix: str | None) -> bool:
        try:
            return bool(fix) and shlex.split(fix) == inferred
        except ValueError:
            return False

    remaining = {p.key for p in with_rules.problems}
    for problem in report.problems:
        if problem.key not in remaining and not same(problem.fix):
            problem.fix = INFERRED_FIX
    report.hints = [h for h in report.hints if h.get("kind") not in GUESSED_HINTS or same(h.get("fix"))]


def _compare(ck: Side, target: Side, user_rules: list[Rule], preset_rules: list[Rule],
             expect_missing: Sequence[str], require: Sequence[str]) -> KeyReport:
    preset = target.preset
    rules = user_rules + preset_rules
    result = apply_remap(ck.metas, rules)
    renamed = result.mapping  # old -> new, kept keys only
    by_new = {new: old for old, new in renamed.items()}
    expect = _Expectations(require, expect_missing, tuple(preset.require) if preset else (),
                           tuple(preset.expect_missing) if preset else (), target.expected)

    entries: list[Entry] = []
    used_ck: set[str] = set()
    for group in target.groups:
        entries.append(_classify(group, target, ck, by_new, used_ck, expect))

    unexpected, duplicates = _unexpected(ck, renamed, used_ck)
    ignored = [old for old in unexpected if _ignored(renamed[old], target.ignored)]
    if ignored:
        skip = set(ignored)
        unexpected = [old for old in unexpected if old not in skip]
    ck_renamed = {renamed[k]: ck.metas[k].renamed(renamed[k]) for k in renamed}
    problems = _problems(entries, unexpected, renamed, ck, expect, target)
    hints = _infer_fixes(problems, entries, unexpected, renamed, ck_renamed, target)
    return KeyReport(
        source=ck.label, target=target.label, entries=entries, problems=problems, hints=hints,
        coverage=coverage_rows(entries), unexpected=unexpected,
        unexpected_metas={renamed[k]: ck.metas[k] for k in unexpected}, duplicates=duplicates,
        dropped=list(result.dropped), rules=[str(r) for r in rules],
        unmatched_require=[g for g in require if not any(fnmatch.fnmatchcase(n, g) for n in target.metas)],
        ignored=[renamed[old] for old in ignored],
    )


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def _classify(group: list[str], target: Side, ck: Side, by_new: dict[str, str], used_ck: set[str],
              expect: _Expectations) -> Entry:
    model_meta = target.metas[group[0]]
    present = [n for n in group if n in by_new]
    if present:
        name = present[0]
        used_ck.update(by_new[n] for n in present)
        ck_key = by_new[name]
        ck_meta = ck.metas[ck_key].renamed(name)
        model_meta = target.metas[name]
        if ck_meta.shape != model_meta.shape:
            status = "shape_mismatch"
        elif ck_meta.dtype != model_meta.dtype:
            status = "dtype_mismatch"
        else:
            status = "matched"
        also = [by_new[n] for n in present[1:]]
        return Entry(group, status, model_meta, ck_key, ck_meta, also=also)
    trainable = None if target.trainable is None else any(target.trainable.get(n, False) for n in group)
    expected, why = expect.classify(group, trainable)
    return Entry(group, "missing_expected" if expected else "missing_unexpected", model_meta, reason=why)


def _entry_dict(entry: Entry) -> dict:
    ck = entry.ckpt
    return {"key": entry.name, "status": entry.status,
            "shape": list(ck.shape) if ck else None, "dtype": ck.dtype if ck else None,
            "nbytes": ck.nbytes if ck else None,
            "target_shape": list(entry.model.shape), "target_dtype": entry.model.dtype,
            "checkpoint_key": entry.ckpt_key if entry.ckpt_key not in (None, entry.name) else None,
            "aliases": list(entry.names[1:]), "reason": entry.reason}


def _unexpected(ck: Side, renamed: dict[str, str], used_ck: set[str]) -> tuple[list[str], dict[str, str]]:
    """Checkpoint tensors nothing takes (one name per tensor) and aliases of tensors that are taken."""
    unexpected: list[str] = []
    duplicates: dict[str, str] = {}
    for group in ck.groups:
        kept = [n for n in group if n in renamed]
        used = [n for n in kept if n in used_ck]
        if used:
            duplicates.update({n: used[0] for n in kept if n not in used})
        elif kept:
            unexpected.append(kept[0])
            duplicates.update({n: kept[0] for n in kept[1:]})
    return unexpected, duplicates


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def target_noun(target: Side) -> str:
    """What the report calls the other side: ``model`` for a model or preset, else ``target``."""
    return "model" if target.model is not None or target.preset is not None else "target"


def _problems(entries: list[Entry], unexpected: list[str], renamed: dict[str, str], ck: Side,
              expect: _Expectations, target: Side) -> list[Problem]:
    problems: list[Problem] = []
    other = target_noun(target)
    for e in entries:
        if e.status == "shape_mismatch":
            problems.append(Problem("shape_mismatch", e.name,
                                    f"checkpoint {_shape_text(e.ckpt.shape)}, {other} {_shape_text(e.model.shape)}: "
                                    "excluded from the load", _embedding_fix(e)))
        elif e.status == "dtype_mismatch":
            problems.append(Problem("dtype_mismatch", e.name,
                                    f"checkpoint {e.ckpt.dtype}, {other} {e.model.dtype}: "
                                    f"will be cast {e.ckpt.dtype} -> {e.model.dtype}"))
        elif e.status == "missing_unexpected":
            problems.append(Problem("missing_unexpected", e.name, f"not in the checkpoint ({e.reason})"))
    for old in unexpected:
        new = renamed[old]
        where = f" (remapped from '{old}')" if new != old else ""
        problems.append(Problem("unexpected", new, f"in the checkpoint, nowhere in the {other}{where}"))
    for glob in expect.require:
        if not any(fnmatch.fnmatchcase(n, glob) for n in target.metas):
            problems.append(Problem("missing_unexpected", glob,
                                    "the --require pattern matches no key of the model",
                                    "check the pattern against the model's keys"))
    return problems


def _embedding_fix(e: Entry) -> str | None:
    a, b = e.ckpt.shape, e.model.shape
    if len(a) == len(b) and a[1:] == b[1:] and a[0] != b[0] and _matches([e.name], EMBEDDING_GLOBS):
        return (f"the checkpoint was saved with {a[0]} tokens (the model has {b[0]}): use the same "
                f"tokenizer, or resize the model's embeddings to {a[0]}")
    return None


# ---------------------------------------------------------------------------------------------
# inferring fixes


def _infer_fixes(problems: list[Problem], entries: list[Entry], unexpected: list[str],
                 renamed: dict[str, str], ck_renamed: dict[str, TensorMeta], target: Side) -> list[dict]:
    hints: list[dict] = []
    unexpected_new = [renamed[k] for k in unexpected]
    missing = {n for e in entries if e.status.startswith("missing") for n in e.names}
    fixes: dict[str, str] = {}
    for hint, covered, rule in _prefix_fixes(unexpected_new, missing) + _rename_fixes(unexpected_new, missing):
        if not _fix_helps(rule, ck_renamed, target):
            continue  # a name pattern that lines up but brings no tensor of the right shape home
        hints.append(hint)
        fixes.update(dict.fromkeys(covered, hint["fix"]))
    for hint, keys in _layer_hints(entries, unexpected_new, ck_renamed, target):
        hints.append(hint)
        fixes.update({k: hint["fix"] for k in keys if k not in fixes})
    preset_fixes: dict[str, str] = {}
    if target.preset is not None and target.preset.hints is not None:
        for hint in target.preset.hints(ck_renamed, target.metas) or []:
            hint = _normalise_hint(hint)
            hints.append(hint)
            if hint.get("fix"):
                # a hint names its keys by globs, or else by quoting them in its text
                for p in problems:
                    if _matches([p.key], hint.get("keys") or ()) or f"{p.key} " in f"{hint['detail']} ":
                        preset_fixes[p.key] = hint["fix"]
    for p in problems:
        # the model's own knowledge beats a generic guess
        p.fix = preset_fixes.get(p.key) or p.fix or fixes.get(p.key)
    return hints


def _normalise_hint(hint) -> dict:
    if not isinstance(hint, Mapping):
        return {"kind": "preset", "detail": str(hint), "fix": None}
    out = dict(hint)
    out.setdefault("kind", "preset")
    out.setdefault("detail", out.pop("message", ""))
    out.setdefault("fix", None)
    return out


def _fix_helps(rule: Rule, ck_renamed: Mapping[str, TensorMeta], target: Side) -> bool:
    """Whether applying ``rule`` to the checkpoint's (already remapped) names lands more tensors
    with the target's shape and adds no unexpected name: only then is it shown as a fix."""
    def fit(pairs) -> tuple[int, int]:
        landed = sum(1 for new, meta in pairs if new in target.metas and target.metas[new].shape == meta.shape)
        return landed, sum(1 for new, _ in pairs if new not in target.metas)

    try:
        mapping = apply_remap(list(ck_renamed), [rule]).mapping
    except RemapError:
        return False
    landed, unexpected = fit(ck_renamed.items())
    landed_after, unexpected_after = fit((new, ck_renamed[old]) for old, new in mapping.items())
    return landed_after > landed and unexpected_after <= unexpected


def _prefix_fixes(unexpected: list[str], missing: set[str]) -> list[tuple[dict, list[str], Rule]]:
    """Prefix swaps (strip, add, or replace) that turn unexpected keys into missing ones."""
    if not unexpected or not missing:
        return []
    by_suffix: dict[str, list[str]] = {}
    for name in missing:
        parts = name.split(".")
        for i in range(len(parts) - 1):  # suffixes of two or more segments
            by_suffix.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]))
    votes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key in unexpected:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            suffix = ".".join(parts[i:])
            if suffix in by_suffix:
                if len(by_suffix[suffix]) == 1:  # an ambiguous suffix (attn.weight) proves nothing
                    old, new = ".".join(parts[:i]), by_suffix[suffix][0]
                    votes.setdefault((old, new), []).append((key, f"{new}.{suffix}" if new else suffix))
                break
    out: list[tuple[dict, list[str]]] = []
    claimed: set[str] = set()
    for (old, new), pairs in sorted(votes.items(), key=lambda kv: -len(kv[1])):
        if (old, new) == ("", ""):
            continue
        # once a swap is established, it also explains one-segment rests (module.step -> step)
        head = old + "." if old else ""
        pairs = [(u, (f"{new}." if new else "") + u[len(head):]) for u in unexpected
                 if u.startswith(head) and u not in claimed]
        pairs = [(u, m) for u, m in pairs if m in missing]
        if not pairs:
            continue
        claimed.update(u for u, _ in pairs)
        if not new:
            fix, rule = f"--strip-prefix {old}.", Rule("strip_prefix", (f"{old}.",))
            detail = f"{plural(len(pairs), 'unexpected key')} match missing ones without the prefix '{old}.'"
        elif not old:
            fix, rule = f"--add-prefix {new}.", Rule("add_prefix", (f"{new}.",))
            detail = f"{plural(len(pairs), 'unexpected key')} match missing ones with the prefix '{new}.'"
        else:
            fix, rule = f"--rename '^{re.escape(old)}\\.={new}.'", Rule("rename", (f"^{re.escape(old)}\\.", f"{new}."))
            detail = f"{plural(len(pairs), 'unexpected key')} match missing ones with '{old}.' replaced by '{new}.'"
        covered = [u for u, _ in pairs] + [m for _, m in pairs]
        out.append(({"kind": "prefix", "detail": detail, "fix": fix}, covered, rule))
    return out


def _segment_rename(old: str, new: str, keys: list[str]) -> tuple[str, str]:
    """The plainest regex that renames the segment ``old`` in every one of ``keys``."""
    first = [k.startswith(old + ".") for k in keys]
    if all(first):
        return f"^{re.escape(old)}\\.", f"{new}."
    if not any(first):
        if all(k.endswith("." + old) for k in keys):
            return f"\\.{re.escape(old)}$", f".{new}"
        if not any(k.endswith("." + old) for k in keys):
            return f"\\.{re.escape(old)}\\.", f".{new}."
    return f"(?<![^.]){re.escape(old)}(?=\\.|$)", new


def _rename_fixes(unexpected: list[str], missing: set[str]) -> list[tuple[dict, list[str], Rule]]:
    out: list[tuple[dict, list[str], Rule]] = []
    for old, new, why in KNOWN_RENAMES:
        pattern = re.compile(rf"(?<![^.]){re.escape(old)}(?=\.|$)")
        pairs = [(u, pattern.sub(new, u)) for u in unexpected if pattern.search(u)]
        pairs = [(u, m) for u, m in pairs if m in missing]
        if pairs:
            pattern, replacement = _segment_rename(old, new, [u for u, _ in pairs])
            fix = f"--rename '{pattern}={replacement}'"
            detail = f"'{old}' is now '{new}' ({why}): {plural(len(pairs), 'unexpected key')} match missing ones"
            out.append(({"kind": "rename", "detail": detail, "fix": fix},
                        [u for u, _ in pairs] + [m for _, m in pairs], Rule("rename", (pattern, replacement))))
    return out


def _layer_template(name: str) -> tuple[str, int] | None:
    """``a.blocks.3.xattn.w`` -> (``a.blocks.{}.xattn``, 3): the module up to the first layer number
    and one named segment after it."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            after = parts[i + 1:i + 2] if i + 2 < len(parts) else []
            return ".".join(parts[:i] + ["{}"] + after), int(part)
    return None


def _whole_blocks(mismatched: dict[str, tuple[set[int], set[int]]],
                  ck_layers: dict[str, set[int]]) -> dict[str, tuple[set[int], set[int]]]:
    """Merge the sub-modules of one numbered block into one hint (``layer1.{}``) when all that differ
    differ alike and the others sit within those layers (a downsampling in block 0 only): a
    shallower network, not a sub-module left out."""
    by_block: dict[str, list[str]] = {}
    for template in ck_layers:
        by_block.setdefault(template.split("{}")[0] + "{}", []).append(template)
    out: dict[str, tuple[set[int], set[int]]] = {}
    for template, sets in mismatched.items():
        block = template.split("{}")[0] + "{}"
        members = by_block[block]
        differing = [m for m in members if m in mismatched]
        whole = (len(differing) > 1 and all(mismatched[m] == sets for m in differing)
                 and all(ck_layers[m] <= sets[0] for m in members))
        out[block if whole else template] = sets
    return out


def _in_template(name_template: str, template: str) -> bool:
    """A key's template belongs to a hint's: the same, or inside a whole block (``layer1.{}``)."""
    return name_template == template or (template.endswith("{}") and name_template.startswith(template + "."))


def _describe_layers(numbers: set[int]) -> str:
    values = sorted(numbers)
    text = format_numbers(values)
    if len(values) >= 2:
        step = values[1] - values[0]
        if all(b - a == step for a, b in zip(values, values[1:], strict=False)):
            text += f" (every {step})" if step > 1 else ""
    return text


def _layer_hints(entries: list[Entry], unexpected: list[str], ck: Mapping[str, TensorMeta],
                 target: Side) -> list[tuple[dict, list[str]]]:
    """Numbered modules present at different layer sets on the two sides (an interval mismatch)."""
    involved = {e.name for e in entries if e.status == "missing_unexpected"} | set(unexpected)
    templates = {t[0] for t in map(_layer_template, involved) if t}
    ck_layers: dict[str, set[int]] = {}
    for name in ck:
        t = _layer_template(name)
        if t:
            ck_layers.setdefault(t[0], set()).add(t[1])
    model_layers: dict[str, set[int]] = {}
    for name in target.metas:
        t = _layer_template(name)
        if t:
            model_layers.setdefault(t[0], set()).add(t[1])
    mismatched = {template: (ck_set, model_layers.get(template)) for template, ck_set in ck_layers.items()
                  if model_layers.get(template) and model_layers[template] != ck_set and template in templates}
    out = []
    for template, (ck_set, model_set) in _whole_blocks(mismatched, ck_layers).items():
        keys = [n for n in list(ck) + sorted(involved) if _in_template((_layer_template(n) or ("",))[0], template)]
        module = template.replace("{}", "N")  # blocks.N.xattn: N is the layer number
        detail = (f"the checkpoint has {module} at layers {_describe_layers(ck_set)}; "
                  f"the {target_noun(target)} at {_describe_layers(model_set)}")
        fix = f"build the model with {module} at layers {_describe_layers(ck_set)}"
        out.append(({"kind": "layers", "module": module, "checkpoint_layers": sorted(ck_set),
                     "model_layers": sorted(model_set), "detail": detail, "fix": fix}, keys))
    return out


# ---------------------------------------------------------------------------------------------
# coverage


_COVERAGE_CLASS = {"matched": "loaded", "dtype_mismatch": "loaded", "shape_mismatch": "shape mismatch",
                   "missing_expected": "missing (expected)", "missing_unexpected": "MISSING"}


def _status_text(entries: list[Entry]) -> str:
    classes = {_COVERAGE_CLASS[e.status] for e in entries}
    if classes == {"loaded"}:
        casts = sorted({f"{e.ckpt.dtype}->{e.model.dtype}" for e in entries if e.status == "dtype_mismatch"})
        return "ok" + (f" (cast {', '.join(casts)})" if casts else "")
    if len(classes) == 1:
        return classes.pop()
    return "partial: " + ", ".join(sorted(classes))


def coverage_rows(entries: list[Entry]) -> list[CoverageRow]:
    """Rows by module: a module whose tensors share one status is one row; mixed ones are split,
    first by layer number (interval mismatches), then by child module, where children that share
    a status stay one row (``layers.{0..31}.* (rest)`` beside ``layers.{3,7}.xattn.*``)."""
    rows: list[tuple[list[str], list[Entry], str]] = []
    by_top: dict[str, list[Entry]] = {}
    for e in entries:
        by_top.setdefault(e.name.split(".")[0], []).append(e)
    for top, items in by_top.items():
        _split([top], items, rows)
    return [_row(parts, items, note) for parts, items, note in rows]


def _cls(e: Entry) -> str:
    return _COVERAGE_CLASS[e.status]


def _split(prefix: list[str], items: list[Entry], out: list) -> None:
    depth = len(prefix)
    classes = {_cls(e) for e in items}
    leaf = any(len(e.name.split(".")) <= depth for e in items)
    if len(classes) == 1 or leaf:
        out.append((prefix, items, ""))
        return
    numbers = [i for i, p in enumerate(prefix) if p == "{}"]
    if numbers:
        # Does the status depend only on which layer a tensor is in? Then split by layer sets.
        per_layer: dict[tuple, set[str]] = {}
        for e in items:
            parts = e.name.split(".")
            per_layer.setdefault(tuple(parts[i] for i in numbers), set()).add(_cls(e))
        if all(len(c) == 1 for c in per_layer.values()):
            by_class: dict[str, list[Entry]] = {}
            for e in items:
                by_class.setdefault(_cls(e), []).append(e)
            out.extend((prefix, group, "") for group in by_class.values())
            return
    children: dict[str, list[Entry]] = {}
    for e in items:
        part = e.name.split(".")[depth]
        children.setdefault("{}" if part.isdigit() else part, []).append(e)
    uniform: dict[str, list[str]] = {}
    for part, group in children.items():
        group_classes = {_cls(e) for e in group}
        if len(group_classes) == 1:
            uniform.setdefault(group_classes.pop(), []).append(part)
    merged = {parts[0]: cls for cls, parts in uniform.items() if len(parts) > 1}
    for part, group in children.items():
        cls = _cls(group[0])
        if part in merged:
            members = [e for p in uniform[merged[part]] for e in children[p]]
            out.append((prefix, members, " (rest)" if len(merged) < len(children) else ""))
        elif not (cls in uniform and len(uniform[cls]) > 1 and part in uniform[cls]):
            _split(prefix + [part], group, out)


def _row(prefix: list[str], items: list[Entry], note: str = "") -> CoverageRow:
    display = []
    for i, part in enumerate(prefix):
        if part == "{}":
            values = {int(e.name.split(".")[i]) for e in items}
            display.append(str(next(iter(values))) if len(values) == 1 else "{" + format_numbers(values) + "}")
        else:
            display.append(part)
    name = ".".join(display)
    if any(len(e.name.split(".")) > len(prefix) for e in items):
        name += ".*"
    covered = [e for e in items if e.status in LOADABLE]
    return CoverageRow(name + note, _status_text(items), len(covered), len(items),
                       sum(e.model.numel for e in covered), sum(e.model.numel for e in items))


__all__ = ["CoverageRow", "Entry", "KeyReport", "Problem", "compare", "diff_keys", "group_problems"]

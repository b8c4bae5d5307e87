"""Key remapping as data: rules, presets, and ``apply_remap(keys, rules) -> RemapResult``.

A rule is one of five kinds (``RULE_KINDS``):

- ``strip_prefix P``  remove ``P`` when the key starts with it (only at the start: a blind
  ``k.replace("module.", "")`` corrupts keys such as ``vision.module.proj``);
- ``add_prefix P``    prepend ``P`` to every key;
- ``rename REGEX REPL`` ``re.sub`` over the whole key (every match; anchor with ``^``/``$``);
- ``drop GLOB...``    drop keys matching any glob;
- ``keep GLOB...``    drop keys matching none of the globs.

Globs use ``fnmatch`` on the full key, case-sensitive; ``*`` also matches dots.

Rules CHAIN: they run in order and each rule sees the previous rule's output, so
``strip_prefix module.`` followed by ``rename ^encoder\\. enc.`` turns ``module.encoder.x`` into
``enc.x``. A key that a ``drop``/``keep`` rule removes is gone for the rules after it.

Rules come from flags (``rules_from_cli``) in this documented order: ``--preset``s first (they
undo training wrappers, so the user's own rules see clean names: ``--preset ddp --drop 'x.*'``
works on ``module.x.y``), then ``--strip-prefix``, ``--add-prefix``, ``--rename``, ``--drop``,
``--keep``, and last the ``--rules`` file. Use a rules file when you need another order.

Presets are named rule lists. Built in: ``ddp``, ``compile``, ``fsdp``. Other packages add
their own through the entry-point group ``ckpt_tools.remaps`` (an entry point names a callable
returning ``{name: [rule dicts]}``); model presets (``ckpt_tools.models``) are found by name too.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RemapError, UsageError
from .presets import available_presets

ENTRY_POINT_GROUP = "ckpt_tools.remaps"

# A path segment starts at the beginning of the key or right after a dot.
_SEGMENT_START = r"(?<![^.])"


def _strip_prefix(key: str, args: tuple[str, ...]) -> str | None:
    return key[len(args[0]):] if key.startswith(args[0]) else key


def _add_prefix(key: str, args: tuple[str, ...]) -> str | None:
    return args[0] + key


def _rename(key: str, args: tuple[str, ...]) -> str | None:
    return _compiled(args[0]).sub(args[1], key)


def _drop(key: str, args: tuple[str, ...]) -> str | None:
    return None if _matches_any(key, args) else key


def _keep(key: str, args: tuple[str, ...]) -> str | None:
    return key if _matches_any(key, args) else None


def _matches_any(key: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, glob) for glob in globs)


def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@dataclass(frozen=True)
class RuleKind:
    """How one kind of rule rewrites a key (None = dropped) and how many arguments it takes."""

    apply: Callable[[str, tuple[str, ...]], str | None]
    arity: int | None  # None: one or more (globs)
    # a filter "matched" when it let a key through (keep) or removed it (drop); a rewrite when it changed it
    filter: bool = False


RULE_KINDS: dict[str, RuleKind] = {
    "strip_prefix": RuleKind(_strip_prefix, 1),
    "add_prefix": RuleKind(_add_prefix, 1),
    "rename": RuleKind(_rename, 2),
    "drop": RuleKind(_drop, None, filter=True),
    "keep": RuleKind(_keep, None, filter=True),
}


@dataclass(frozen=True)
class Rule:
    """One remap rule. ``origin`` says where it came from (a flag, a preset, a file)."""

    kind: str
    args: tuple[str, ...]
    origin: str | None = None

    def __post_init__(self) -> None:
        spec = RULE_KINDS.get(self.kind)
        if spec is None:
            raise RemapError(f"unknown rule kind {self.kind!r}", path=self.origin,
                             fix=f"use one of: {', '.join(RULE_KINDS)}, preset")
        object.__setattr__(self, "args", tuple(str(a) for a in self.args))
        if (spec.arity is not None and len(self.args) != spec.arity) or not self.args:
            want = "one or more globs" if spec.arity is None else f"{spec.arity} argument(s)"
            raise RemapError(f"rule {self.kind} takes {want}, got {list(self.args)}", path=self.origin,
                             fix='write e.g. rename = ["^old\\\\.", "new."] or drop = "*.bias"')
        if self.kind == "rename":
            try:
                _compiled(self.args[0]).sub(self.args[1], "")  # also parses the replacement's group references
            except re.error as exc:
                raise RemapError(f"invalid rename {self.args[0]!r} -> {self.args[1]!r}: {exc}", path=self.origin,
                                 fix="check the pattern and the replacement's group references (Python re syntax)") from None
        if self.kind in ("strip_prefix", "add_prefix") and not self.args[0]:
            raise RemapError(f"rule {self.kind} needs a non-empty prefix", path=self.origin,
                             fix="give the prefix, e.g. 'module.'")

    def apply(self, key: str) -> str | None:
        """The new key, or None when this rule drops it."""
        return RULE_KINDS[self.kind].apply(key, self.args)

    def matched(self, before: str, after: str | None) -> bool:
        if RULE_KINDS[self.kind].filter:
            return (after is None) == (self.kind == "drop")
        return after != before

    def to_dict(self) -> dict[str, Any]:
        """The rules-file form: ``{"rename": [regex, repl]}``, ``{"drop": glob}``..."""
        if self.kind == "rename":
            return {"rename": list(self.args)}
        value = self.args[0] if len(self.args) == 1 else list(self.args)
        return {self.kind: value}

    def __str__(self) -> str:
        return f"{self.kind} {' '.join(repr(a) for a in self.args)}"


@dataclass
class RemapResult:
    """What a rule list did to a key list.

    mapping          old -> new for every kept key, in input order
    renamed          old -> new for kept keys whose name changed
    dropped          keys removed by drop/keep rules, in input order
    unmatched_rules  rules that changed, removed or let through no key at all
    renamed_by_rule  old keys changed by an explicit ``rename`` rule (the names rules point to)
    dropped_as       old -> the name the key had when a rule dropped it
    """

    mapping: dict[str, str]
    renamed: dict[str, str]
    dropped: list[str]
    unmatched_rules: list[Rule]
    rules: list[Rule] = field(default_factory=list)
    renamed_by_rule: set[str] = field(default_factory=set)
    dropped_as: dict[str, str] = field(default_factory=dict)

    def require_kept(self, source: str | None) -> RemapResult:
        """Refuse a result that keeps no tensor: writing an empty checkpoint is never what was meant."""
        if not self.mapping:
            raise RemapError("the rules drop every tensor", path=source, fix="check --drop/--keep globs")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [r.to_dict() for r in self.rules],
            "kept": len(self.mapping),
            "renamed": dict(self.renamed),
            "dropped": list(self.dropped),
            "unmatched_rules": [r.to_dict() for r in self.unmatched_rules],
        }


def _moved_to(old: str, new: str) -> dict[str, str | None]:
    """For every module above key ``old`` (``""``: the root), where it went in ``new``: under the new
    path that precedes the key's unchanged path below it, else in place when the module's own path
    is unchanged (a rename deeper down), else None."""
    parts = old.split(".")
    out: dict[str, str | None] = {}
    for i in range(len(parts)):
        module, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if new == rest or new.endswith("." + rest):
            out[module] = new[:-len(rest) - 1] if new != rest else ""
        else:
            out[module] = module if not module or new.startswith(module + ".") else None
    return out


def remap_module_names(modules: Iterable[str], mapping: Mapping[str, str], dropped: Iterable[str]) -> dict[str, str]:
    """Old module path -> new, for a state dict's ``_metadata`` (the module versions
    ``load_state_dict`` reads), derived from how the keys below each module were renamed: a module
    whose kept keys all moved under one new path goes there; one whose keys were all dropped, or
    were renamed inside it, is left out; a module holding no key (an activation) follows its nearest
    ancestor that moved. No two modules get one new name (the first keeps it)."""
    targets: dict[str, set[str | None]] = {}
    for old, new in mapping.items():
        for module, target in _moved_to(old, new).items():
            targets.setdefault(module, set()).add(target)
    gone = {module for key in dropped for module in _moved_to(key, key)} - set(targets)
    out: dict[str, str] = {}
    for module in modules:
        new = _module_target(module, targets, gone)
        if new is not None and new not in out.values():
            out[module] = new
    return out


def _module_target(module: str, targets: dict[str, set[str | None]], gone: set[str]) -> str | None:
    if module in gone:
        return None
    own = targets.get(module)
    if own is not None:
        return next(iter(own)) if len(own) == 1 else None
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):  # the nearest ancestor that has keys decides
        ancestor = ".".join(parts[:i])
        if ancestor in gone:
            return None
        above = targets.get(ancestor)
        if above is not None:
            if len(above) != 1 or None in above:
                return None
            tail, base = ".".join(parts[i:]), next(iter(above))
            return f"{base}.{tail}" if base else tail
    return None


def apply_remap(keys: Iterable[str], rules: Sequence[Rule] | None) -> RemapResult:
    """Run ``rules`` (chained, in order) over ``keys``; raise RemapError on a name collision."""
    rules = list(rules or [])
    hits = [0] * len(rules)
    mapping: dict[str, str] = {}
    dropped_as: dict[str, str] = {}
    by_rename: set[str] = set()
    for key in keys:
        new: str | None = key
        for i, rule in enumerate(rules):
            after = rule.apply(new)
            if after is None:
                dropped_as[key] = new
            if rule.matched(new, after):
                hits[i] += 1
                if rule.kind == "rename":
                    by_rename.add(key)
            new = after
            if new is None:
                break
        if new is None:
            continue
        if not new:
            raise RemapError("rules turn the key into an empty name", key=key,
                             fix="anchor the rename/strip rule so something remains")
        mapping[key] = new
    _check_collisions(mapping)
    renamed = {old: new for old, new in mapping.items() if old != new}
    unmatched = [rule for rule, n in zip(rules, hits, strict=True) if n == 0]
    return RemapResult(mapping, renamed, list(dropped_as), unmatched, rules, by_rename & set(renamed), dropped_as)


def _check_collisions(mapping: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for old, new in mapping.items():
        if new in seen:
            raise RemapError(f"keys '{seen[new]}' and '{old}' both map to '{new}'", key=new,
                             fix="add a --drop for one of them or make the rename more specific")
        seen[new] = old


# -- presets --

def _builtin_presets() -> dict[str, list[dict[str, Any]]]:
    return {
        # DistributedDataParallel wraps the whole model, so `module.` is only ever leading;
        # an inner submodule may legitimately be called `module`.
        "ddp": [{"strip_prefix": "module."}],
        # torch.compile wraps whatever it was given: the model (leading `_orig_mod.`) or a
        # submodule (`encoder._orig_mod.layer`), so the segment is removed wherever it stands.
        "compile": [{"rename": [_SEGMENT_START + r"_orig_mod\.", ""]}],
        # FSDP and activation checkpointing wrap submodules at any depth.
        "fsdp": [{"rename": [_SEGMENT_START + r"_fsdp_wrapped_module\.", ""]},
                 {"rename": [_SEGMENT_START + r"_checkpoint_wrapped_module\.", ""]}],
    }


def available_remaps() -> dict[str, list[dict[str, Any]]]:
    """Built-in presets plus those registered under ``ckpt_tools.remaps`` (read when called).
    A plugin cannot redefine a built-in name: ``ddp`` means the same everywhere."""
    from importlib.metadata import entry_points

    found: dict[str, list[dict[str, Any]]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.update(ep.load()())
    return {**found, **_builtin_presets()}


def preset_rules(name: str, *, _depth: int = 0) -> list[Rule]:
    """The rules of a remap preset, or of a model preset's ``remap`` when no remap preset has the name."""
    if _depth > 4:
        raise RemapError(f"preset {name!r} nests presets too deeply", fix="remove the preset cycle")
    # built-in names resolve without scanning installed packages' entry points
    remaps = _builtin_presets()
    if name not in remaps:
        remaps = available_remaps()
    if name in remaps:
        return _rules_from(remaps[name], origin=f"preset {name}", depth=_depth + 1)
    models = _model_presets()
    if name in models:
        return _rules_from(models[name].remap, origin=f"model preset {name}", depth=_depth + 1)
    known = ", ".join(sorted(remaps) + sorted(models))
    raise UsageError(f"unknown remap preset {name!r}", fix=f"use one of: {known}")


def _model_presets() -> dict:
    try:
        return available_presets()
    except ImportError:  # a model package that is not importable has no presets to offer
        return {}


# -- building rule lists --

def rules_from_dicts(items: Iterable[Mapping[str, Any]], *, origin: str | None = None) -> list[Rule]:
    """Rules from the rules-file schema: each dict holds exactly one of ``strip_prefix``,
    ``add_prefix``, ``rename`` ([regex, repl]), ``drop``/``keep`` (glob or list), ``preset``."""
    return _rules_from(items, origin=origin, depth=0)


def _rules_from(items: Iterable[Mapping[str, Any]], *, origin: str | None, depth: int) -> list[Rule]:
    rules: list[Rule] = []
    for item in items:
        if not isinstance(item, Mapping) or len(item) != 1:
            raise RemapError(f"each rule needs exactly one kind, got {item!r}", path=origin,
                             fix='write one key per [[rule]], e.g. strip_prefix = "module."')
        (kind, value), = item.items()
        if kind == "preset":
            rules += preset_rules(str(value), _depth=depth)
            continue
        args = tuple(value) if isinstance(value, list | tuple) else (value,)
        rules.append(Rule(kind, args, origin))
    return rules


def rules_from_file(path: str | Path) -> list[Rule]:
    """Rules from a TOML file of ``[[rule]]`` tables."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("rules file not found", path=str(path), fix="check the --rules path") from None
    return rules_from_toml(text, origin=str(path))


def rules_from_toml(text: str, *, origin: str | None = None) -> list[Rule]:
    """Rules from the text of a rules file (``[[rule]]`` tables)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RemapError(f"invalid TOML: {exc}", path=origin, fix="fix the syntax") from None
    unknown = set(data) - {"rule"}
    if unknown:
        raise RemapError(f"unknown top-level keys {sorted(unknown)}", path=origin,
                         fix="put every rule in a [[rule]] table")
    return rules_from_dicts(data.get("rule", []), origin=origin)


def coerce_rules(rules) -> list[Rule]:
    """Rules given any way the library accepts them: None, a list of ``Rule`` objects and/or
    rules-file dicts (``{"preset": "ddp"}``, ``{"rename": [regex, repl]}``), one such dict, the
    text of a rules file, or the path of one. Anything else is a RemapError naming it."""
    if rules is None:
        return []
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, Mapping):
        return rules_from_dicts([rules])
    if isinstance(rules, Path) or (isinstance(rules, str) and not rules.lstrip().startswith("[")
                                   and Path(rules).suffix == ".toml"):
        return rules_from_file(rules)
    if isinstance(rules, str):
        return rules_from_toml(rules, origin="rules text")
    if isinstance(rules, Iterable):
        out: list[Rule] = []
        for item in rules:
            if isinstance(item, Rule):
                out.append(item)
            elif isinstance(item, Mapping):
                out += rules_from_dicts([item])
            else:
                raise RemapError(f"a rule must be a Rule or a rules-file dict, got {item!r:.80}",
                                 fix='write e.g. {"preset": "ddp"} or {"rename": ["^old\\.", "new."]}')
        return out
    raise RemapError(f"rules must be a list of rules, a rules file or its text, got {type(rules).__name__}",
                     fix='pass e.g. [{"preset": "ddp"}], or a path to a .toml rules file')


def parse_rename(text: str) -> tuple[str, str]:
    """``REGEX=REPL`` split at the last ``=`` (a regex may hold ``=``, e.g. ``(?=``; a replacement may not)."""
    regex, sep, repl = text.rpartition("=")
    if not sep or not regex:
        raise UsageError(f"--rename {text!r} is not REGEX=REPL", fix="write e.g. --rename '^enc\\.=encoder.'")
    return regex, repl


def rules_from_cli(strip_prefix: Sequence[str] = (), add_prefix: Sequence[str] = (),
                   rename: Sequence[str] = (), drop: Sequence[str] = (), keep: Sequence[str] = (),
                   presets: Sequence[str] = (), rules_file: str | Path | None = None) -> list[Rule] | None:
    """Rules from the CLI flags, in the documented order: presets, strip-prefix, add-prefix,
    rename, drop, keep, then the rules file. Each --drop glob is a rule of its own (so one that
    matches nothing is reported); repeated --keep globs form one rule (a key is kept when it
    matches any of them). None when no flag was given."""
    rules: list[Rule] = []
    for name in presets:
        rules += preset_rules(name)
    rules += [Rule("strip_prefix", (p,), "--strip-prefix") for p in strip_prefix]
    rules += [Rule("add_prefix", (p,), "--add-prefix") for p in add_prefix]
    rules += [Rule("rename", parse_rename(text), "--rename") for text in rename]
    rules += [Rule("drop", (glob,), "--drop") for glob in drop]
    if keep:
        rules.append(Rule("keep", tuple(keep), "--keep"))
    if rules_file is not None:
        rules += rules_from_file(rules_file)
    return rules or None


def rules_to_json(rules: Sequence[Rule] | None) -> str:
    """Compact JSON of a rule list, for provenance metadata."""
    return json.dumps([r.to_dict() for r in rules or []], separators=(",", ":"))

"""render_html(kind, data) -> one self-contained HTML page for an inspect, diff or validate report.

The page depends only on a report's JSON schema (``to_dict()``), so any saved ``--format json``
output renders too. It is one file: inline CSS and a little JavaScript, no request of any kind (a
Content-Security-Policy with ``default-src 'none'`` and hashes of the one style and one script
enforces it), readable with JavaScript off. The module tree is static ``<details>`` markup: the
script only adds the key filter, expand/collapse and the copy buttons.

A diff's per-tensor statuses come from its ``"entries"`` list (one dict per target tensor and per
unexpected checkpoint tensor: ``key``, ``status``, ``shape``, ``dtype``, ``nbytes`` of the
checkpoint's tensor, ``target_shape``, ``target_dtype`` of the model's, ``checkpoint_key`` when a
remap renamed it, ``aliases``, ``reason``). A diff without entries still renders: its tree then
holds the problem keys only, and the page says so.
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

from .errors import UsageError
from .meta import DTYPES
from .naming import format_numbers
from .render import chunk_text, human_bytes, human_count

KINDS = ("inspect", "diff", "validate")


@dataclass(frozen=True)
class Status:
    word: str  # what the page says: colour is never the only signal
    css: str  # the class suffix whose colours the style sheet defines for both schemes


# Per-tensor statuses (a diff's, then an inspect listing's), in the coverage bar's order.
STATUSES: dict[str, Status] = {
    "matched": Status("matched", "m"),
    "dtype_mismatch": Status("dtype cast", "d"),
    "shape_mismatch": Status("shape mismatch", "s"),
    "missing_expected": Status("missing (expected)", "e"),
    "missing_unexpected": Status("missing (unexpected)", "u"),
    "unexpected": Status("unexpected", "x"),
    "load": Status("load check", "u"),
    "stored": Status("stored", "t"),
    "alias": Status("alias", "a"),
}
OTHER = Status("other", "a")  # the colour of any status not listed
# Colours per scheme: each is a badge background under --on text, contrast >= 4.5:1 in both.
PALETTE = {
    "light": {"m": "#1a7f37", "d": "#9a6700", "s": "#bc4c00", "e": "#59636e", "u": "#cf222e",
              "x": "#8250df", "t": "#0969da", "a": "#57606a", "on": "#ffffff"},
    "dark": {"m": "#3fb950", "d": "#d29922", "s": "#f0883e", "e": "#9198a1", "u": "#ff7b72",
             "x": "#bc8cff", "t": "#58a6ff", "a": "#8b949e", "on": "#0d1117"},
}
SURFACE = {
    "light": {"bg": "#ffffff", "fg": "#1f2328", "mut": "#59636e", "line": "#d1d9e0", "card": "#f6f8fa"},
    "dark": {"bg": "#0d1117", "fg": "#e6edf3", "mut": "#9198a1", "line": "#3d444d", "card": "#151b23"},
}
# A module with at most this many tensors lists them all in one table instead of sub-nodes.
FLAT_TENSORS = 24
# Problems shown per group before the rest folds into "N more".
GROUP_PREVIEW = 20
# Flags a fix may suggest -> the rules-file key of the same rule (see ckpt_tools.remap).
VALUE_KINDS = ("value_change", "value_check")  # problems about values, not keys
RULE_FLAGS = {"--strip-prefix": "strip_prefix", "--add-prefix": "add_prefix", "--rename": "rename",
              "--drop": "drop", "--keep": "keep", "--preset": "preset"}


def esc(value: object) -> str:
    """Text for HTML content or a quoted attribute: keys and paths are user data."""
    return _html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------
# tensors and the module tree


@dataclass(frozen=True)
class TensorRow:
    key: str
    status: str
    shape: tuple[int, ...] | None = None  # the checkpoint's (or the listing's)
    dtype: str | None = None
    nbytes: int | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    note: str = ""

    @property
    def params(self) -> int:
        shape = self.target_shape if self.target_shape is not None else self.shape
        return math.prod(shape) if shape is not None else 0

    @property
    def size(self) -> int | None:
        if self.nbytes is not None:
            return self.nbytes
        if self.target_shape is None or self.target_dtype not in DTYPES:
            return None
        return int(self.params * DTYPES[self.target_dtype][0])


@dataclass
class Node:
    label: str
    path: str = ""  # the key prefix of the tensors under it
    children: list[Node] = field(default_factory=list)
    tensors: list[TensorRow] = field(default_factory=list)

    def walk(self) -> Iterable[TensorRow]:
        yield from self.tensors
        for child in self.children:
            yield from child.walk()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.walk():
            out[t.status] = out.get(t.status, 0) + 1
        return out


def build_tree(rows: Sequence[TensorRow]) -> Node:
    """Modules by key segment; numbered layers with the same tensors and statuses collapse into one
    node (``blocks.{0..2,4..6}``); single-child chains merge (``lang_encoder.transformer``); a small
    module lists its tensors directly."""
    root: dict = {}
    for row in rows:
        parts = row.key.split(".")
        level = root
        for part in parts[:-1]:
            level = level.setdefault(part, {})
        level.setdefault(None, []).append(row)  # None holds a module's own tensors (a segment may be "")
    tree = _node("", None, root)
    tree.children = _collapse_layers([_compact(child) for child in tree.children])
    return tree


def _node(label: str, path: str | None, level: dict) -> Node:
    node = Node(label, path or "", tensors=list(level.get(None, ())))
    node.children = [_node(name, name if path is None else f"{path}.{name}", sub)
                     for name, sub in level.items() if name is not None]
    return node


def _compact(node: Node) -> Node:
    if sum(1 for _ in node.walk()) <= FLAT_TENSORS:
        return Node(node.label, node.path, tensors=list(node.walk()))
    node.children = _collapse_layers([_compact(child) for child in node.children])
    while len(node.children) == 1 and not node.tensors:
        child = node.children[0]
        node = Node(f"{node.label}.{child.label}", child.path, child.children, child.tensors)
    return node


def _signature(node: Node) -> tuple:
    start = len(node.path) + 1
    return tuple((t.key[start:], t.status) for t in node.walk())


def _numbered(node: Node) -> bool:
    return node.label.isascii() and node.label.isdigit()


def _collapse_layers(children: list[Node]) -> list[Node]:
    """Numbered siblings with one signature become one node labelled with their numbers."""
    groups: dict[tuple, list[Node]] = {}
    for child in children:
        if _numbered(child):
            groups.setdefault(_signature(child), []).append(child)
    first = {id(group[0]): group for group in groups.values()}
    out: list[Node] = []
    for child in children:
        group = first.get(id(child))
        if not _numbered(child) or (group is not None and len(group) == 1):
            out.append(child)
        elif group is not None:  # the group stands where its first member stood
            label = "{" + format_numbers(int(m.label) for m in group) + "}"
            out.append(Node(label, group[0].path.rpartition(".")[0], children=group))
    return out


# ---------------------------------------------------------------------------------------------
# reading the report dicts


def _shape(value) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


def inspect_rows(data: Mapping) -> list[TensorRow]:
    secondary = {name: group[0] for group in data.get("aliases") or () for name in group[1:]}
    chunks = data.get("chunks") or {}  # a DCP folder: what each rank wrote
    rows = []
    for key, meta in (data.get("tensors") or {}).items():
        status, note = ("alias", f"same tensor as {secondary[key]}") if key in secondary else ("stored", "")
        if chunks.get(key):
            note = f"chunks (rank: range) {chunk_text(chunks[key])}"
        rows.append(TensorRow(key, status, _shape(meta.get("shape")), meta.get("dtype"), meta.get("nbytes"),
                              note=note))
    return rows


def diff_rows(data: Mapping) -> list[TensorRow] | None:
    """Rows from a diff dict's entries; None when the dict has none (an older schema)."""
    entries = data.get("entries")
    if entries is None:
        return None
    rows = []
    for e in entries:
        notes = []
        if e.get("checkpoint_key") and e["checkpoint_key"] != e["key"]:
            notes.append(f"stored as {e['checkpoint_key']}")
        if e.get("aliases"):
            notes.append("also " + ", ".join(e["aliases"]))
        if e.get("reason"):
            notes.append(e["reason"])
        rows.append(TensorRow(e["key"], e["status"], _shape(e.get("shape")), e.get("dtype"), e.get("nbytes"),
                              _shape(e.get("target_shape")), e.get("target_dtype"), "; ".join(notes)))
    return rows


def problem_rows(data: Mapping) -> list[TensorRow]:
    """The fallback tree: the problem keys (a load check names no key and stays out)."""
    return [TensorRow(p["key"], p["kind"], note=p.get("detail") or "") for p in data.get("problems") or ()
            if p.get("kind") != "load"]


# ---------------------------------------------------------------------------------------------
# small renderers


def _status(name: str) -> Status:
    """A status a newer report may add still shows its own name, in the neutral colour."""
    return STATUSES.get(name) or Status(str(name).replace("_", " "), OTHER.css)


def badge(status: str, text: str | None = None) -> str:
    st = _status(status)
    return f'<b class="s-{st.css}">{esc(text if text is not None else st.word)}</b>'


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def _bar_widths(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Whole percentages summing to 100 (largest remainder), at least 1 for any non-zero count."""
    total = sum(counts.values())
    items = [(k, v) for k, v in counts.items() if v]
    if not total or not items:
        return []
    raw = {k: v * 100 / total for k, v in items}
    widths = {k: max(1, int(r)) for k, r in raw.items()}
    order = sorted(raw, key=lambda k: raw[k] - int(raw[k]), reverse=True)
    i = 0
    while sum(widths.values()) < 100:
        widths[order[i % len(order)]] += 1
        i += 1
    while sum(widths.values()) > 100:
        widest = max(widths, key=widths.get)
        widths[widest] -= 1
    return [(k, widths[k]) for k, _ in items]


def _ordered(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    known = [(k, counts[k]) for k in STATUSES if counts.get(k)]
    return known + [(k, v) for k, v in counts.items() if k not in STATUSES and v]


def coverage_bar(counts: Mapping[str, int]) -> str:
    segments = "".join(f'<i class="s-{_status(k).css} w{w}"></i>' for k, w in _bar_widths(dict(_ordered(counts))))
    return f'<span class="bar" aria-hidden="true">{segments}</span>'


def status_words(counts: Mapping[str, int]) -> str:
    return " ".join(badge(k, f"{n} {_status(k).word}") for k, n in _ordered(counts))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", caption: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    caption = f"<caption>{caption}</caption>" if caption else ""
    return f"<table{attr}>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def copy_button(text: str, label: str) -> str:
    return f'<button type="button" class="copy" data-copy="{esc(text)}" hidden>{esc(label)}</button>'


# ---------------------------------------------------------------------------------------------
# the tree


def _tensor_cells(t: TensorRow, with_note: bool = True) -> list[str]:
    if t.target_shape is not None and t.shape is not None and t.shape != t.target_shape:
        shape = f"{_shape_text(t.shape)} (model {_shape_text(t.target_shape)})"
    else:
        shape = _shape_text(t.shape if t.shape is not None else t.target_shape)
    if t.target_dtype and t.dtype and t.dtype != t.target_dtype:
        dtype = f"{t.dtype} → {t.target_dtype}"
    else:
        dtype = t.dtype or t.target_dtype or "-"
    size = t.size
    note = f'<br><small>{esc(t.note)}</small>' if t.note and with_note else ""
    return [esc(t.key), esc(shape), esc(dtype), human_bytes(size) if size is not None else "-",
            badge(t.status) + note]


def _tensor_table(tensors: Sequence[TensorRow]) -> str:
    notes = {t.note for t in tensors}
    shared = notes.pop() if len(notes) == 1 and len(tensors) > 1 else ""  # said once, not on every row
    caption = f"every tensor here: {esc(shared)}" if shared else ""
    return _table(["key", "shape", "dtype", "bytes", "status"],
                  (_tensor_cells(t, with_note=not shared) for t in tensors), "tt", caption)


def _summary(node: Node, with_bar: bool) -> str:
    rows = list(node.walk())
    counts = node.counts()
    params = sum(t.params for t in rows)
    parts = [f'<span class="nm">{esc(node.label)}</span>']
    if with_bar:
        parts.append(coverage_bar(counts))
    plural = "s" if len(rows) != 1 else ""
    parts.append(f'<span class="ct">{len(rows):,} key{plural} · {human_count(params)} params</span>')
    parts.append(f'<span class="sw">{status_words(counts)}</span>')
    return "<summary>" + "".join(parts) + "</summary>"


def render_node(node: Node, with_bar: bool, extra: str = "") -> str:
    inner = extra + "".join(render_node(c, with_bar) for c in node.children)
    if node.tensors:
        inner += _tensor_table(node.tensors)
    return f"<details>{_summary(node, with_bar)}<div>{inner}</div></details>"


def render_tree(tree: Node, with_bar: bool, provenance: Mapping[str, list[dict]] | None = None) -> str:
    out = []
    for child in tree.children:
        rows = (provenance or {}).get(child.label.split(".", 1)[0], [])
        extra = ""
        if rows:
            extra = '<p class="prov">Weights from: ' + "; ".join(
                f"{esc(r['module'])}: {esc(r['source'])} ({float(r['share']):.1%})" for r in rows) + "</p>"
        out.append(render_node(child, with_bar, extra))
    if tree.tensors:
        out.append(_tensor_table(tree.tensors))
    return "".join(out)


def legend(statuses: Iterable[str]) -> str:
    items = "".join(f'<li><i class="s-{_status(s).css}"></i>{badge(s)}</li>' for s in statuses)
    return f'<ul class="legend" aria-label="status colours">{items}</ul>'


# ---------------------------------------------------------------------------------------------
# problems, hints and fixes


def rules_file(fix: str) -> str | None:
    """The rules-file TOML of a fix made of remap flags (``--strip-prefix module.``), else None."""
    try:
        words = shlex.split(fix)
    except ValueError:
        return None
    if not words or len(words) % 2:
        return None
    rules = []
    for flag, value in zip(words[::2], words[1::2], strict=True):
        key = RULE_FLAGS.get(flag)
        if key is None:
            return None
        if key == "rename":
            regex, sep, repl = value.rpartition("=")
            if not sep or not regex:
                return None
            rules.append({"rename": [regex, repl]})
        else:
            rules.append({key: value})
    return rules_toml(rules)


def rules_toml(rules: Sequence[Mapping]) -> str:
    """A rules file (TOML) of rules in their dict form (``{"rename": [regex, repl]}``)."""
    lines = []
    for rule in rules:
        for key, value in rule.items():
            if isinstance(value, list | tuple):
                lines.append(f"[[rule]]\n{key} = [{', '.join(_toml_str(str(v)) for v in value)}]")
            else:
                lines.append(f"[[rule]]\n{key} = {_toml_str(str(value))}")
    return "\n".join(lines) + "\n"


def _rule_text(rule: Mapping) -> str:
    """A rule as the flag that gives it: ``--rename '^a\\.=b.'``."""
    flags = {key: flag for flag, key in RULE_FLAGS.items()}
    return " ".join(f"{flags.get(key, key)} {shlex.quote('='.join(value) if isinstance(value, list) else str(value))}"
                    for key, value in rule.items() if key != "maps")


def inferred_html(diff: Mapping, command_line: str) -> str:
    """The remap rules inferred when keys did not match: what they map, what the checkpoint gets
    with them, and buttons to copy them as a rules file or as the command that applies them."""
    rules = diff.get("inferred_rules") or []
    ambiguous = (diff.get("inference") or {}).get("ambiguous") or []
    if not rules:
        return _ambiguous_html(ambiguous)
    with_rules = (diff.get("inference") or {}).get("with_rules") or {}
    if diff.get("auto_remap"):
        line = f"Applied (--auto-remap): the report above is the checkpoint with these {len(rules):,} rules."
    else:
        line = (f"With these rules: {str(with_rules.get('verdict', '')).upper()} ({with_rules.get('summary', '')}). "
                "They are not applied: pass --auto-remap, or keep them with --write-rules FILE.")
    rows = [[f"<code>{esc(_rule_text(r))}</code>", f"{int(r.get('maps') or 0):,}"] for r in rules]
    plain = [{k: v for k, v in r.items() if k != "maps"} for r in rules]
    buttons = copy_button(rules_toml(plain), "Copy rules file")
    if not diff.get("auto_remap"):
        buttons += " " + copy_button(f"{command_line} --auto-remap".strip(), "Copy command")
    return f"<p>{esc(line)}</p>{_table(['rule', 'keys it maps'], rows, 'pt')}<p>{buttons}</p>"


def _ambiguous_html(ambiguous: Sequence[Mapping]) -> str:
    """Pairings that could go either way: no rule is guessed, the user says which."""
    if not ambiguous:
        return ""
    rows = [[f"<code>{esc(a.get('key', ''))}</code>", ", ".join(f"<code>{esc(c)}</code>" for c in a.get("candidates") or ())]
            for a in ambiguous]
    return (f"<p>No rule inferred: {len(ambiguous):,} ambiguous pairing{'s' if len(ambiguous) != 1 else ''} could go "
            "either way; say which with <code>--rename REGEX=REPL</code>.</p>"
            + _table(["key", "could be"], rows, "pt"))


def _toml_str(text: str) -> str:
    if "'" not in text and "\n" not in text:
        return f"'{text}'"  # a literal string: backslashes in a regex stay as written
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def fix_html(fix: str | None, command_line: str) -> str:
    """The fix text, and copy buttons when it is a command (flags to add) or a rules file."""
    if not fix:
        return '<span class="mut">no fix inferred</span>'
    out = f"<code>{esc(fix)}</code>"
    if fix.startswith("--"):
        command = f"{command_line} {fix}" if command_line else fix
        out += " " + copy_button(command, "Copy command")
        toml = rules_file(fix)
        if toml:
            out += " " + copy_button(toml, "Copy rules file")
    return out


def problems_html(problems: Sequence[Mapping], command_line: str) -> str:
    if not problems:
        return "<p>No problems.</p>"
    groups: dict[tuple[str, str | None], list[Mapping]] = {}
    for p in problems:
        groups.setdefault((p.get("kind", ""), p.get("fix")), []).append(p)
    out = []
    for (kind, fix), items in groups.items():
        rows = [[f"<code>{esc(p.get('key', ''))}</code>", esc(p.get("detail", ""))] for p in items]
        body = _table(["key", "detail"], rows[:GROUP_PREVIEW], "pt")
        if len(rows) > GROUP_PREVIEW:
            rest = len(rows) - GROUP_PREVIEW
            body += (f"<details><summary>{rest:,} more {esc(_status(kind).word)} keys</summary>"
                     f"{_table(['key', 'detail'], rows[GROUP_PREVIEW:], 'pt')}</details>")
        out.append(f'<div class="pg"><h3>{badge(kind)} {len(items):,} key{"s" if len(items) != 1 else ""}</h3>'
                   f'<p class="fix">Fix: {fix_html(fix, command_line)}</p>{body}</div>')
    return "".join(out)


def hints_html(hints: Sequence[Mapping], command_line: str) -> str:
    items = []
    for h in hints:
        detail = h.get("detail") or h.get("message") or ""
        items.append(f"<li><b>{esc(h.get('kind', 'hint'))}</b>: {esc(detail)}"
                     + (f"<br>Fix: {fix_html(h['fix'], command_line)}" if h.get("fix") else "") + "</li>")
    return f"<ul>{''.join(items)}</ul>"


# ---------------------------------------------------------------------------------------------
# sections


def _dl(pairs: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs if v) + "</dl>"


def _code(value: object) -> str:
    return f"<code>{esc(value)}</code>" if value not in (None, "") else ""


def _counts_text(counts: Mapping[str, int], ignored: int = 0) -> str:
    parts = [f"{counts.get('matched', 0):,} matched"]
    parts += [f"{n:,} {_status(k).word}" for k, n in _ordered(counts) if k != "matched"]
    if ignored:
        parts.append(f"{ignored:,} ignored (the model re-creates them)")
    return ", ".join(parts)


def verdict_html(kind: str, data: Mapping) -> str:
    if kind == "inspect":
        text = (f"Listing: {len(data.get('tensors') or {}):,} tensors, {human_count(data.get('total_params') or 0)} "
                f"params, {human_bytes(data.get('total_bytes') or 0)}")
        return f'<p class="verdict v-info" role="status"><span>{esc(text)}</span></p>'
    ok = data.get("verdict") == "ok"
    diff = data if kind == "diff" else data.get("diff") or {}
    word = "OK" if ok else "FAIL"
    meaning = "the checkpoint fits the model" if ok else "the checkpoint does not fit the model as it is"
    reasons = [] if ok else _fail_reasons(kind, data)
    why = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    return (f'<div class="verdict v-{"ok" if ok else "fail"}" role="status">'
            f'<p><span class="mark" aria-hidden="true">{"✓" if ok else "✗"}</span> '
            f'<strong>Verdict: {word}</strong>: {esc(meaning)}</p>'
            f'<p>{esc(_counts_text(diff.get("counts") or {}, len(diff.get("ignored") or ())))}</p>'
            + (f"<ul>{why}</ul>" if why else "") + "</div>")


def _fail_reasons(kind: str, data: Mapping) -> list[str]:
    diff = data if kind == "diff" else data.get("diff") or {}
    load = data.get("load") or {}
    out = []
    if diff.get("verdict") == "fail":
        failing = [p for p in diff.get("problems") or () if p.get("kind") != "dtype_mismatch"]
        about_values = [p for p in failing if p.get("kind") in VALUE_KINDS]
        if len(about_values) < len(failing):
            n = len(failing) - len(about_values)
            out.append(f"the key check failed: {n:,} problem{'' if n == 1 else 's'} below")
        if about_values:
            n = len(about_values)
            out.append(f"the values failed: {n:,} problem{'' if n == 1 else 's'} below")
    if data.get("stopped"):
        out.append(f"stopped: {data['stopped']}")
    if load.get("refused"):
        out.append(f"load refused: {load['refused']}")
    elif load and not load.get("verified"):
        out.append("the load was not verified")
    if (data.get("conversion") or {}).get("verified") is False:
        out.append("the conversion was not verified")
    prov = data.get("provenance") or {}
    if prov.get("verdict") == "fail":
        out.append(f"{int(prov.get('random_params') or 0):,} parameters are still randomly initialised")
    return out


def source_html(kind: str, data: Mapping) -> str:
    inspect = data if kind == "inspect" else data.get("inspect") or {}
    remote = data.get("remote") or {}
    download = data.get("download") or {}
    files = download.get("files") or []
    fmt = inspect.get("format")
    if fmt and inspect.get("wrapper"):
        fmt = f"{fmt} (state dict under '{inspect['wrapper']}')"
    pairs = [("source", _code(data.get("source"))),
             ("pinned", _code(remote.get("pinned"))),
             ("commit", _code(remote.get("commit") or download.get("commit"))),
             ("format", esc(fmt) if fmt else "")]
    pairs += [("sha256", f"{_code(f.get('sha256'))} <small>{esc(f.get('path', ''))}, {int(f.get('size') or 0):,} "
                         f"bytes</small>") for f in files if f.get("sha256")]
    if remote.get("bytes_fetched") is not None:
        pairs.append(("checked before download", f"{int(remote['bytes_fetched']):,} bytes fetched; "
                                                 f"key check: {esc(remote.get('verdict'))}"))
    if kind != "inspect":
        pairs.append(("target", _code(data.get("target"))))
    diff = data if kind == "diff" else data.get("diff") or {}
    if diff.get("remap"):
        pairs.append(("remap rules", "<br>".join(_code(r) for r in diff["remap"])))
    conversion = data.get("conversion") or {}
    if conversion:
        pairs.append(("converted to", f"{_code(conversion.get('destination'))} "
                                      f"({'verified bit for bit' if conversion.get('verified') else 'NOT verified'})"))
    return _dl(pairs)


def load_html(data: Mapping) -> str:
    load = data.get("load") or {}
    if not load:
        return ""
    if load.get("refused"):
        return f"<p>{badge('missing_unexpected', 'refused')} {esc(load['refused'])}</p>"
    pairs = [("loaded", f"{int(load.get('loaded') or 0):,} tensors"),
             ("verified", badge("matched", "verified") if load.get("verified") else badge("missing_unexpected",
                                                                                          "NOT verified")),
             ("cast", f"{load['cast']:,}" if load.get("cast") else ""),
             ("skipped", "<br>".join(_code(k) for k in load.get("skipped") or ())),
             ("differ after load", "<br>".join(_code(k) for k in load.get("mismatched") or ())),
             ("checks", "<br>".join(esc(c) for c in load.get("checks") or ()))]
    return _dl(pairs)


def provenance_html(prov: Mapping) -> str:
    rows = [[esc(r.get("module")), esc(r.get("source")), human_count(int(r.get("params") or 0)),
             f"{float(r.get('share') or 0):.1%}"] for r in prov.get("modules") or ()]
    random = int(prov.get("random_params") or 0)
    status = badge("missing_unexpected" if prov.get("verdict") == "fail" else "matched",
                   f"{random:,} parameters randomly initialised")
    return f"<p>{status}</p>" + _table(["module", "source", "params", "share"], rows)


def coverage_html(rows: Sequence[Mapping]) -> str:
    cells = [[esc(r.get("module")), f"{int(r.get('keys_covered') or 0):,}/{int(r.get('keys_total') or 0):,}",
              f"{human_count(int(r.get('params_covered') or 0))}/{human_count(int(r.get('params_total') or 0))}",
              esc(r.get("status"))] for r in rows]
    return _table(["module", "keys", "params", "status"], cells)


def inspect_extras_html(data: Mapping) -> str:
    pairs = [("aliases", "<br>".join(esc(" = ".join(g)) for g in data.get("aliases") or ())),
             ("extras", "<br>".join(f"{_code(k)} ({esc(v)})" for k, v in (data.get("extras") or {}).items())),
             ("metadata", "<br>".join(f"{_code(k)} = {esc(str(v)[:200])}"
                                      for k, v in (data.get("metadata") or {}).items())),
             ("notes", "<br>".join(esc(n) for n in data.get("notes") or ())),
             ("bytes read to list it", f"{int(data['bytes_read']):,}" if data.get("bytes_read") is not None else "")]
    return _dl(pairs)


# ---------------------------------------------------------------------------------------------
# the page


def _tree_section(kind: str, data: Mapping) -> str:
    diff = data if kind == "diff" else data.get("diff") or {}
    note = ""
    if kind == "inspect":
        rows, with_bar = inspect_rows(data), False
    else:
        rows, with_bar = diff_rows(diff), True
        if rows is None:
            rows = problem_rows(diff)
            note = ("<p class=\"note\">This report has no per-tensor entries (its diff predates the "
                    "<code>entries</code> field): the tree shows the problem keys only.</p>")
    tree = build_tree(rows)
    provenance: dict[str, list[dict]] = {}
    for r in (data.get("provenance") or {}).get("modules") or ():
        provenance.setdefault(str(r.get("module", "")).split(" ", 1)[0].split(".", 1)[0], []).append(r)
    statuses = [s for s in STATUSES if any(r.status == s for r in rows)]
    statuses += sorted({r.status for r in rows} - set(STATUSES))
    controls = ('<div class="controls" id="controls" hidden><label for="filter">Filter keys</label> '
                '<input id="filter" type="search" autocomplete="off" spellcheck="false" '
                'placeholder="text, * for any characters"> '
                '<button type="button" id="expand">Expand all</button> '
                '<button type="button" id="collapse">Collapse all</button> '
                f'<output id="shown" for="filter">{len(rows):,} tensors</output></div>')
    return (f'<section id="tree-section"><h2>Modules and tensors</h2>{note}{legend(statuses)}{controls}'
            f'<div id="tree" data-total="{len(rows)}">{render_tree(tree, with_bar, provenance)}</div></section>')


def _section(title: str, body: str, ident: str) -> str:
    return f'<section id="{ident}"><h2>{esc(title)}</h2>{body}</section>' if body else ""


def rerun_command(command_line: str) -> str:
    """The command line without its output options: a copied fix command prints its report where
    a command normally does, instead of overwriting this page."""
    try:
        words = shlex.split(command_line)
    except ValueError:
        return command_line
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _OUTPUT_OPTIONS:
            skip = True
        elif not word.startswith(tuple(f"{o}=" for o in _OUTPUT_OPTIONS if o.startswith("--"))):
            out.append(word)
    return shlex.join(out)


_OUTPUT_OPTIONS = ("--format", "--output")


def _body(kind: str, data: Mapping, command_line: str, tool_version: str, title: str) -> str:
    diff = data if kind == "diff" else data.get("diff") or {}
    shown, command_line = command_line, rerun_command(command_line)
    parts = [f"<header><h1>{esc(title)}</h1>{verdict_html(kind, data)}</header><main>",
             _section("Checkpoint and target" if kind != "inspect" else "Checkpoint", source_html(kind, data),
                      "source")]
    if kind != "inspect":
        parts.append(_section("Problems", problems_html(diff.get("problems") or (), command_line), "problems"))
        if diff.get("hints"):
            parts.append(_section("Hints", hints_html(diff["hints"], command_line), "hints"))
        parts.append(_section("Inferred remap rules", inferred_html(diff, command_line), "inferred"))
        parts.append(_section("Load", load_html(data), "load"))
        if data.get("provenance"):
            parts.append(_section("Where every weight came from", provenance_html(data["provenance"]),
                                  "provenance"))
        if diff.get("coverage"):
            parts.append(_section("Coverage by module", coverage_html(diff["coverage"]), "coverage"))
        if diff.get("value_diff"):
            parts.append(_section("Values", value_diff_html(diff["value_diff"]), "values"))
    else:
        parts.append(_section("Details", inspect_extras_html(data), "details"))
        if data.get("stats"):
            parts.append(_section("Values", stats_html(data["stats"]), "values"))
    parts.append(_tree_section(kind, data))
    parts.append(f'</main><footer><p>ckpt-tools {esc(tool_version)}</p><p>Command: <code id="command">'
                 f'{esc(shown)}</code> {copy_button(shown, "Copy command line")}</p>'
                 '<p id="live" class="sr" role="status" aria-live="polite"></p></footer>')
    return "".join(parts)


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return esc(f"{value:.4g}")
    return esc(f"{value:,}")


def stats_html(stats: Mapping) -> str:
    """``inspect --stats``: the values per module, and the tensors that are all zero or not finite."""
    rows = [[esc(m["name"]), _number(m["tensors"]), _number(m["numel"]), _number(m["min"]), _number(m["max"]),
             _number(m["mean"]), _number(m["std"]), _number(m["abs_mean"]), _number(m["nan"]), _number(m["inf"]),
             esc(f"{m['zero_fraction']:.2%}")] for m in stats.get("modules") or ()]
    notes = [f"<p>Not finite: {', '.join(_code(n) for n in stats['nonfinite'])}</p>"] if stats.get("nonfinite") else []
    notes += [f"<p>All zero: {', '.join(_code(n) for n in stats['all_zero'])}</p>"] if stats.get("all_zero") else []
    return "".join(notes) + _table(["module", "tensors", "values", "min", "max", "mean", "std", "abs mean", "NaN",
                                    "Inf", "zeros"], rows, caption="Values by module")


def value_diff_html(values: Mapping) -> str:
    """``diff --values``: how much each module changed between the two checkpoints."""
    rows = [[esc(m["name"]), esc(f"{m['identical']}/{m['tensors']}"), _number(m["mean_relative_change"]),
             _number(m["relative_change"]), _number(m["cosine"]), _number(m["max_abs_diff"])]
            for m in values.get("modules") or ()]
    return _table(["module", "bitwise identical", "mean relative change", "relative change", "cosine",
                   "max |a-b|"], rows, caption="Value changes by module")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_html(kind: str, data: dict, *, command_line: str, tool_version: str, title: str | None = None) -> str:
    """One self-contained page for a report dict (``to_dict()`` of an inspect, diff or validate report)."""
    if kind not in KINDS:
        raise UsageError(f"no HTML report for {kind!r}", fix=f"choose one of {', '.join(KINDS)}")
    if title is None:
        name = PurePath(str(data.get("source") or "checkpoint")).name or str(data.get("source"))
        title = f"{kind} report: {name}"
    body = _body(kind, data, command_line, tool_version, title)
    css = _css()
    # Only the page's own style and script run; nothing may be fetched (default-src 'none').
    csp = (f"default-src 'none'; style-src {_csp_hash(css)}; script-src {_csp_hash(SCRIPT)}; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="color-scheme" content="light dark">'
            f'<meta name="generator" content="ckpt-tools {esc(tool_version)}">'
            f'<title>{esc(title)}</title><link rel="icon" href="data:,">'
            f"<style>{css}</style></head><body>{body}<script>{SCRIPT}</script></body></html>\n")


def _scheme_vars(scheme: str) -> str:
    values = {**SURFACE[scheme], **PALETTE[scheme]}
    return ";".join(f"--{k}:{v}" for k, v in values.items())


def _css() -> str:
    statuses = sorted({s.css for s in STATUSES.values()} | {OTHER.css})
    status_rules = "".join(f".s-{c}{{background:var(--{c});color:var(--on)}}" for c in statuses)
    widths = "".join(f".w{i}{{width:{i}%}}" for i in range(1, 101))
    return (f":root{{{_scheme_vars('light')}}}"
            f"@media (prefers-color-scheme:dark){{:root{{{_scheme_vars('dark')}}}}}" + STYLE + status_rules + widths)


STYLE = (
    "*{box-sizing:border-box}"
    "body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"
    "'Segoe UI',sans-serif}"
    "header,main,footer{max-width:1200px;margin:0 auto;padding:0 16px}"
    "h1{font-size:20px;margin:16px 0 8px;overflow-wrap:anywhere}h2{font-size:16px;margin:20px 0 8px;"
    "border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:14px;margin:12px 0 4px}"
    "code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}"
    ".verdict{border-radius:6px;padding:10px 14px;margin:8px 0;font-size:15px}"
    ".verdict p{margin:2px 0}.verdict ul{margin:4px 0 0;padding-left:20px}"
    ".v-ok{background:var(--m);color:var(--on)}.v-fail{background:var(--u);color:var(--on)}"
    ".v-info{background:var(--card);color:var(--fg);border:1px solid var(--line)}"
    ".mark{font-weight:bold}"
    "dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}"
    "dt{color:var(--mut)}dd{margin:0;overflow-wrap:anywhere}"
    "table{border-collapse:collapse;width:100%;margin:4px 0}"
    "th,td{text-align:left;padding:2px 6px;border-bottom:1px solid var(--line);vertical-align:top}"
    "th{color:var(--mut);font-weight:600}caption{text-align:left;color:var(--mut);font-size:12px}"
    ".tt td:first-child{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}"
    ".tt td:nth-child(4){text-align:right;white-space:nowrap}"
    "b[class^=s-]{border-radius:3px;padding:0 5px;font-weight:600;font-size:12px;white-space:nowrap}"
    "small,.mut{color:var(--mut)}"
    "details{margin:1px 0}details>div{margin-left:18px;border-left:1px solid var(--line);padding-left:8px}"
    "summary{cursor:pointer;padding:2px 0;display:list-item}"
    "summary>span{margin-right:10px}.nm{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;"
    "font-size:13px;overflow-wrap:anywhere}"
    ".ct{color:var(--mut)}.sw b{margin-right:4px}"
    ".bar{display:inline-flex;width:120px;height:10px;vertical-align:middle;border:1px solid var(--line);"
    "border-radius:2px;overflow:hidden}.bar i{display:block;height:100%}"
    ".legend{list-style:none;padding:0;margin:4px 0;display:flex;flex-wrap:wrap;gap:4px 14px}"
    ".legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}"
    ".controls{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:8px 0}"
    "input,button{font:inherit;color:var(--fg);background:var(--card);border:1px solid var(--line);"
    "border-radius:4px;padding:2px 8px}input{min-width:24em}button{cursor:pointer}"
    ":focus-visible{outline:2px solid var(--t);outline-offset:1px}"
    ".pg{margin:6px 0 12px}.fix{margin:2px 0}.prov,.note{color:var(--mut);margin:2px 0}"
    "footer{color:var(--mut);margin-top:24px;padding-bottom:24px}"
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}"
    "[hidden]{display:none!important}"
)

# The filter hides tensor rows whose key does not contain the text (``*`` matches anything) and the
# modules left empty, and opens the modules that hold a match; clearing it restores what was open.
SCRIPT = r"""(function(){
"use strict";
var tree=document.getElementById("tree");
var rows=Array.prototype.slice.call(tree.querySelectorAll("table.tt tbody tr"));
var keys=rows.map(function(r){return r.firstChild.textContent.toLowerCase();});
var nodes=Array.prototype.slice.call(tree.querySelectorAll("details"));
var tables=Array.prototype.slice.call(tree.querySelectorAll("table.tt"));
var open=nodes.map(function(d){return d.open;});
var shown=document.getElementById("shown");
var live=document.getElementById("live");
function matcher(q){
  if(q.indexOf("*")<0){return function(k){return k.indexOf(q)>=0;};}
  var re=new RegExp(q.split("*").map(function(s){return s.replace(/[.+?^${}()|[\]\\]/g,"\\$&");}).join(".*"));
  return function(k){return re.test(k);};
}
function filter(){
  var q=document.getElementById("filter").value.trim().toLowerCase();
  var hit=matcher(q), n=0;
  nodes.forEach(function(d){d.hidden=!!q;});
  tables.forEach(function(t){t.hidden=!!q;});
  rows.forEach(function(r,i){
    var ok=!q||hit(keys[i]);
    r.hidden=!ok;
    if(!ok){return;}
    n++;
    if(!q){return;}
    var t=r.closest("table");t.hidden=false;
    for(var d=t.closest("details");d;d=d.parentElement.closest("details")){d.hidden=false;d.open=true;}
  });
  if(!q){nodes.forEach(function(d,i){d.open=open[i];});}
  shown.textContent=q?n+" of "+rows.length+" tensors match":rows.length+" tensors";
}
function setAll(state){nodes.forEach(function(d,i){d.open=state;open[i]=state;});}
function copy(text){
  if(navigator.clipboard&&window.isSecureContext){return navigator.clipboard.writeText(text);}
  return new Promise(function(resolve,reject){
    var t=document.createElement("textarea");t.value=text;t.className="sr";document.body.appendChild(t);t.select();
    var ok=false;try{ok=document.execCommand("copy");}catch(e){}
    t.remove();if(ok){resolve();}else{reject(new Error("copy refused"));}
  });
}
document.getElementById("filter").addEventListener("input",filter);
document.getElementById("expand").addEventListener("click",function(){setAll(true);});
document.getElementById("collapse").addEventListener("click",function(){setAll(false);});
document.addEventListener("click",function(e){
  var b=e.target.closest("button[data-copy]");
  if(!b){return;}
  copy(b.getAttribute("data-copy")).then(function(){live.textContent="Copied: "+b.textContent;},
    function(){live.textContent="Copy failed: select the text and copy it by hand";});
});
document.getElementById("controls").hidden=false;
Array.prototype.forEach.call(document.querySelectorAll("button[data-copy]"),function(b){b.hidden=false;});
})();"""

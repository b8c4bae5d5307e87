"""Key listings of diff targets as JSON data, shipped or cached, so a key diff needs no model build.

Building a model's meta-device skeleton imports its whole stack (for OpenFlamingo: torch,
transformers, open_clip), which costs seconds before a millisecond diff. What the diff needs from
the skeleton is small: every state-dict name with its shape and dtype, which names are one tensor,
which are trained, and what the model re-creates itself. That listing is plain JSON
(``to_json``/``from_json``), read three ways:

- shipped with a preset (``ModelPreset.listing``: a path or a loader; ``read_listing``), generated
  by ``scripts/gen_skeletons.py`` and checked by a test against the built skeleton;
- cached for any other target under ``$CKPT_CACHE/skeletons/`` (default ``~/.cache/ckpt-tools``),
  keyed by a fingerprint of its data (``cached_listing``/``data_fingerprint``: a config's content,
  an architecture name, the class asked for) and of the versions of the libraries that build it;
- cached for a preset that ships no listing, keyed by the preset's data, the source files of the
  package that defines its ``build`` and of this module and the listing code (their syntax, not
  their comments), and every installed distribution's version (``preset_listing``).

Any change that can alter a listing gives a new key; ``CKPT_SKELETON_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fs import atomic_write
from .meta import TensorMeta
from .side import Side
from .version import VERSION

FORMAT_VERSION = 2
LISTING_CODE = ("skeleton.py", "side.py", "targets.py", "libraries.py")  # the code a listing comes from


def cache_dir() -> Path:
    return Path(os.environ.get("CKPT_CACHE") or Path.home() / ".cache" / "ckpt-tools") / "skeletons"


def enabled() -> bool:
    return os.environ.get("CKPT_SKELETON_CACHE", "1") != "0"


def _package_sources(module_name: str) -> list[Path]:
    top = module_name.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        return []
    if not spec.submodule_search_locations:  # a plain module: its own file
        return [Path(spec.origin)] if spec.origin and Path(spec.origin).is_file() else []
    roots = list(spec.submodule_search_locations)
    files = [p for root in roots for p in Path(root).rglob("*") if p.suffix in (".py", ".json", ".toml")]
    return sorted(files)


def fingerprint(preset) -> str:
    from importlib.metadata import distributions

    digest = hashlib.sha256()
    data = {"name": preset.name, "info": preset.info, "remap": list(preset.remap),
            "expect_missing": list(preset.expect_missing), "require": list(preset.require),
            "format": FORMAT_VERSION, "python": sys.version}
    digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    module = getattr(preset.build, "__module__", None) or ""
    here = Path(__file__).resolve().parent
    for path in _package_sources(module) + [here / name for name in LISTING_CODE]:
        digest.update(path.name.encode())
        digest.update(_code_digest(path))
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
    digest.update("\n".join(versions).encode())
    return digest.hexdigest()[:24]


def _code_digest(path: Path) -> bytes:
    """What of a source file can change a listing: a Python file's syntax tree without its
    docstrings (so a comment or docstring edit keeps the cache), any other file's bytes."""
    raw = path.read_bytes()
    if path.suffix != ".py":
        return hashlib.sha256(raw).digest()
    try:
        tree = ast.parse(raw)
    except (SyntaxError, ValueError):
        return hashlib.sha256(raw).digest()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).digest()


def to_json(side: Side) -> dict[str, Any]:
    """A Side as plain JSON data: every name with its shape and dtype (in state-dict order), the
    groups of names that are one tensor (only those of several names), the trained names (None:
    unknown), what the target re-creates (``expected``, ``ignored``)."""
    return {"format": FORMAT_VERSION, "label": side.label,
            "tensors": {k: [list(m.shape), m.dtype] for k, m in side.metas.items()},
            "groups": [list(g) for g in side.groups if len(g) > 1],
            "trainable": None if side.trainable is None else [k for k, on in side.trainable.items() if on],
            "expected": dict(side.expected), "ignored": list(side.ignored)}


def from_json(data: dict[str, Any]) -> Side:
    """The Side ``to_json`` wrote; raises ValueError on data of another format."""
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"listing format {data.get('format')!r}, expected {FORMAT_VERSION}")
    metas = {k: TensorMeta.of(k, shape, dtype) for k, (shape, dtype) in data["tensors"].items()}
    shared = {name: list(group) for group in data["groups"] for name in group}
    groups: list[list[str]] = []
    seen: set[str] = set()
    for name in metas:  # a group comes where its first name does, as module_side made it
        if name not in seen:
            group = shared.get(name, [name])
            seen.update(group)
            groups.append(group)
    trained = data["trainable"]
    trainable = None if trained is None else dict.fromkeys(metas, False) | dict.fromkeys(trained, True)
    return Side(data["label"], metas, groups, trainable, expected=dict(data.get("expected") or {}),
                ignored=list(data.get("ignored") or []))


def read_listing(source, label: str) -> Side:
    """A listing shipped as data: a JSON file's path, or a callable returning the JSON data."""
    try:
        data = source() if callable(source) else json.loads(Path(source).read_text(encoding="utf-8"))
        side = from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the skeleton listing of {label!r}: {exc}", path=str(source),
                         fix="reinstall the package that defines it, or regenerate it "
                             "(python scripts/gen_skeletons.py)") from None
    side.label = label
    return side


def _load_cached(path: Path) -> Side | None:
    try:
        return from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(path: Path, side: Side, stale_glob: str) -> None:
    """Write atomically (a reader never sees half a file) and drop the listings ``path`` replaces."""
    try:
        atomic_write(path, json.dumps(to_json(side)).encode("utf-8"))
        for stale in path.parent.glob(stale_glob):
            if stale != path:  # listings of older code, data or library versions are never read again
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache only costs the build next time


@functools.cache
def listing_code_digest() -> str:
    """What of this package's code decides a listing (which names are trained, tied, re-created):
    its syntax without comments and docstrings, so a code change gives new keys and an edit of
    the prose does not."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in LISTING_CODE:
        digest.update(name.encode())
        digest.update(_code_digest(here / name))
    return digest.hexdigest()[:16]


def data_fingerprint(key: Mapping[str, Any], distributions: Sequence[str]) -> str:
    """A fingerprint of what determines a target's listing: its data (a config, a name, the class
    asked for) and the versions of the libraries that build it. Reads no source file and imports
    nothing, so a cached listing is found in milliseconds."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in distributions:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    blob = {"key": key, "versions": versions, "format": FORMAT_VERSION, "python": sys.version,
            "ckpt_tools": VERSION, "code": listing_code_digest()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_listing(name: str, key: Mapping[str, Any], distributions: Sequence[str],
                   build_side: Callable[[], Side]) -> Side:
    """A target's listing from the cache when ``key`` (with the libraries' versions) is there, else
    built with ``build_side()`` and stored. The file is named by ``name`` (readable only) and the
    fingerprint, so one config reached by two paths shares one listing. Files are small (a 7B
    model's is about 30 kB) and never removed here; the folder may be deleted at any time."""
    if not enabled():
        return build_side()
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "target"
    path = cache_dir() / f"{readable}-{data_fingerprint(key, distributions)}.json"
    side = _load_cached(path)
    if side is None:
        side = build_side()
        _store(path, side, path.name)
    return side


def preset_listing(preset, build_side: Callable[[], Side]) -> Side:
    """The skeleton side of a preset that ships no listing, from the cache when its fingerprint
    is there, else built with ``build_side()`` and stored."""
    if not enabled():
        return build_side()
    path = cache_dir() / f"{preset.name}-{fingerprint(preset)}.json"
    side = _load_cached(path)
    if side is None:
        side = build_side()
        _store(path, side, f"{preset.name}-*.json")
    return side

"""A cache of preset skeletons' key listings, so a key diff against a preset needs no model build.

Building a preset's meta-device skeleton imports its whole model stack (for OpenFlamingo:
transformers, open_clip, torchvision), which costs seconds before a millisecond diff. What the diff
needs from the skeleton is small: every state-dict name with its shape and dtype, which names are
one tensor, and which are trained. That listing is stored as JSON under
``$CKPT_CACHE/skeletons/`` (default ``~/.cache/ckpt-tools``), keyed by a fingerprint of
everything that could change it: the preset's data, the source files of the package that defines
its ``build`` and of this module and the listing code (their syntax, not their comments), and
every installed distribution's version. Any change that can alter a listing gives a new key;
``CKPT_SKELETON_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .fs import atomic_write
from .meta import TensorMeta
from .side import Side

FORMAT_VERSION = 1


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
    for path in _package_sources(module) + [here / "skeleton.py", here / "side.py", here / "targets.py"]:
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


def _to_json(side: Side) -> dict[str, Any]:
    return {"label": side.label, "groups": side.groups, "trainable": side.trainable,
            "tensors": {k: [list(m.shape), m.dtype] for k, m in side.metas.items()}}


def _from_json(data: dict[str, Any]) -> Side:
    metas = {k: TensorMeta.of(k, shape, dtype) for k, (shape, dtype) in data["tensors"].items()}
    return Side(data["label"], metas, [list(g) for g in data["groups"]], data["trainable"])


def preset_listing(preset, build_side):
    """The preset's skeleton side, from the cache when its fingerprint is there, else built with
    ``build_side()`` and stored (atomically: a reader never sees half a file)."""
    if not enabled():
        return build_side()
    path = cache_dir() / f"{preset.name}-{fingerprint(preset)}.json"
    try:
        side = _from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        side = None
    if side is not None:
        return side
    side = build_side()
    try:
        atomic_write(path, json.dumps(_to_json(side)).encode("utf-8"))
        for stale in path.parent.glob(f"{preset.name}-*.json"):
            if stale != path:  # listings of older code or library versions are never read again
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache only costs the build next time
    return side

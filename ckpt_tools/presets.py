"""Model presets: what ckpt_tools needs to know about a model family, plugged in from outside.

``ckpt_tools`` never imports a model package. Packages register presets under the entry-point
group ``ckpt_tools.models``; each entry point names a callable returning ``{name: ModelPreset}``.
The ``model`` package of this distribution registers the published OpenFlamingo checkpoints.

A preset is data plus a few callables:
- ``build(device, dtype)`` returns the model (``device="meta"``: a skeleton, no weights allocated);
- ``listing``: the skeleton's key listing as data (a JSON file's path, or a callable returning the
  JSON data; see ``skeleton.py``), so a key diff against the preset builds nothing and imports no
  model code (``build`` is left for loads);
- ``remap``: rules (the TOML rules-file schema, see ``remap.py``) each published file needs;
- ``expect_missing`` / ``require``: globs of keys a checkpoint may omit / must cover;
- ``hints(checkpoint_metas, model_metas)``: model-specific explanations of mismatches
  (for OpenFlamingo: the cross-attention interval and tokenizer length a file implies);
- ``value_checks``: checks on the loaded values, as data: ``{"name", "globs", "kind"[, "detail",
  "fix"]}`` with a kind of ``stats.CHECK_KINDS`` (``finite``, ``not_all_zero``, ``not_constant``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import UsageError

ENTRY_POINT_GROUP = "ckpt_tools.models"


@dataclass(frozen=True)
class ModelPreset:
    name: str
    build: Callable[..., Any]
    description: str = ""
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    remap: Sequence[Mapping[str, Any]] = ()
    expect_missing: Sequence[str] = ()
    require: Sequence[str] = ()
    hints: Callable[[Mapping, Mapping], list[dict]] | None = None
    value_checks: Sequence[Mapping[str, Any]] = ()
    info: Mapping[str, Any] = field(default_factory=dict)
    listing: str | Path | Callable[[], Mapping[str, Any]] | None = None


def available_presets() -> dict[str, ModelPreset]:
    """Every preset registered under ``ckpt_tools.models``, read when called (never at import)."""
    found: dict[str, ModelPreset] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.update(ep.load()())
    return found


def get_preset(name: str) -> ModelPreset:
    presets = available_presets()
    try:
        return presets[name]
    except KeyError:
        known = ", ".join(sorted(presets)) or "none installed"
        raise UsageError(f"unknown model preset {name!r}", fix=f"use one of: {known}") from None

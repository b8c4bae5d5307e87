"""Build a model from a config file of factory keyword arguments, without importing any model package.

A model config is a JSON or TOML file holding the keyword arguments of a model factory, for
OpenFlamingo those of ``create_model_and_transforms``::

    {"clip_vision_encoder_path": "vit.json", "clip_vision_encoder_pretrained": null,
     "lang_encoder_path": "lm", "tokenizer_path": "lm", "cross_attn_every_n_layers": 4}

Relative paths resolve against the file's folder (a value under a ``*_path``/``*_pretrained`` key
that names an existing file or folder there, or any value starting with ``./`` or ``../``).

Which factory: ``ckpt_tools`` never imports a model package by name. The factory is found, in order:

1. the config's own ``factory`` key: a ``module:attribute`` path, or the name of a factory entry point;
2. the entry-point group ``ckpt_tools.factories`` (``name = "package.module:callable"``) when it
   holds exactly one factory;
3. the model presets (``ckpt_tools.models``): a preset whose ``info["factory"]`` names one
   (``module:attribute``), when all presets that name one agree.

A factory returning a tuple (``(model, image_processor, tokenizer)``) gives its first element.
``device`` (``"meta"`` for a skeleton) is passed when the factory takes it.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UsageError, foreign_message
from .presets import available_presets

FACTORY_GROUP = "ckpt_tools.factories"
_PATH_SUFFIXES = ("_path", "_pretrained", "_dir", "_file")


def read_config(path: str | Path) -> dict[str, Any]:
    """The config's keyword arguments, relative paths resolved against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("model config not found", path=str(path), fix="check the --model-config path") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"invalid model config: {exc}", path=str(path), fix="fix the JSON/TOML syntax") from None
    if not isinstance(data, dict):
        raise UsageError("a model config must be a table of keyword arguments", path=str(path),
                         fix='write e.g. {"lang_encoder_path": "lm", ...}')
    return {key: _resolve(key, value, path.parent, path) for key, value in data.items()}


def _resolve(key: str, value: Any, folder: Path, config: Path) -> Any:
    """A path-like value resolved against the config's folder; an explicit path (``/``, ``./``,
    ``../``, ``~``) that leads nowhere is an error naming the key, where a hub id is left alone."""
    if not isinstance(value, str) or not value:
        return value
    explicit = value.startswith(("/", "./", "../", "~"))
    candidate = Path(value).expanduser() if value.startswith(("/", "~")) else folder / value
    if explicit and not candidate.exists():
        raise UsageError(f"names {candidate}, which does not exist", path=str(config), key=key,
                         fix="fix the path in the config (relative paths resolve against the config's folder)")
    if explicit or (key.endswith(_PATH_SUFFIXES) and candidate.exists()):
        return str(candidate.resolve())
    return value


def find_factory(name: str | None = None, *, config_path: str | None = None) -> Callable[..., Any]:
    """The model factory a config file asks for (see the module docstring for the order)."""
    registered = _registered_factories()
    if name and ":" in name:
        return _import(name, config_path)
    if name:
        if name in registered:
            return registered[name].load()
        raise UsageError(f"unknown model factory {name!r}", path=config_path,
                         fix=f"use module:attribute or one of: {', '.join(sorted(registered)) or 'none registered'}")
    if len(registered) == 1:
        return next(iter(registered.values())).load()
    named = _preset_factories()
    if len(named) == 1:
        return _import(named.pop(), config_path)
    raise UsageError("cannot tell which model factory builds this config", path=config_path,
                     fix='add "factory": "package.module:create_model_and_transforms" to the config')


def _registered_factories() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=FACTORY_GROUP)}


def _preset_factories() -> set[str]:
    try:
        presets = available_presets()
    except ImportError:
        return set()
    return {str(p.info["factory"]) for p in presets.values() if p.info and p.info.get("factory")}


def _import_fix(module_name: str, exc: Exception) -> str:
    """A module file in the current folder is not found because the ``ckpt`` command, unlike
    ``python``, does not put the current folder on sys.path: say so when that is the case."""
    local = Path(*module_name.split(".")).with_suffix(".py")
    if isinstance(exc, ModuleNotFoundError) and (local.is_file() or local.with_suffix("").is_dir()):
        return f"{local} is in this folder, which ckpt does not search: run it as PYTHONPATH=. ckpt ..."
    return ("check the factory's module:attribute path; a module of yours needs its folder on PYTHONPATH "
            "(PYTHONPATH=. ckpt ...), a package must be installed")


def _import(spec: str, config_path: str | None) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import model factory {spec!r}: {foreign_message(exc)}", path=config_path,
                         fix=_import_fix(module_name, exc)) from None
    return obj


def build_from_config(path: str | Path, *, device: str | None = "meta", full: bool = False, **overrides) -> Any:
    """The model a config file describes (``device="meta"``: a skeleton, no weights allocated).
    ``full``: return whatever the factory returned (e.g. ``(model, image_processor, tokenizer)``)."""
    kwargs = read_config(path)
    factory = find_factory(kwargs.pop("factory", None), config_path=str(path))
    kwargs.update(overrides)
    return call_factory(factory, device=device, full=full, where=str(path), **kwargs)


def call_factory(factory: Callable[..., Any], *, device: str | None = "meta", full: bool = False,
                 where: str | None = None, **kwargs) -> Any:
    """Call a model factory: ``device`` is passed when it takes one, else the call runs under
    ``torch.device(device)`` so a skeleton stays a skeleton. A tuple result gives its first
    element (``full``: the whole result)."""
    if device is not None and _accepts(factory, "device"):
        kwargs.setdefault("device", device)
        device = None
    try:
        if device is None:
            built = factory(**kwargs)
        else:
            import torch

            with torch.device(device):
                built = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"the model factory rejected the config: {foreign_message(exc)}", path=where,
                         fix="check the keyword names against the factory's arguments") from None
    if full:
        return built
    return built[0] if isinstance(built, tuple) else built


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

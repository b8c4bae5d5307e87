"""What a checkpoint is compared with: one resolver for every kind of target, and its key listing
as a ``Side``.

A target given as a string (``ckpt diff/validate --model``, ``target=`` of ``diff_keys``,
``model=`` of ``load_checkpoint`` and ``validate``) is read in this order:

- ``timm:NAME``, ``open_clip:NAME``: that library's architecture, pretrained weights off;
- ``hf://ORG/NAME[@REVISION]`` (or ``hf://ORG/NAME[@REVISION]/PATH/config.json``): a transformers
  config read from the hub at the commit the revision resolves to (only config.json is fetched);
  any other ``hf://`` reference is a checkpoint;
- an existing path: a folder holding a config.json, or a .json holding ``model_type`` or
  ``architectures``, is a transformers config; another .json/.toml (not an index) is a model-config
  file (factory keyword arguments, ``modelconfig.py``); anything else is a checkpoint;
- ``package.module:callable``: the user's own factory (this runs the user's code);
- anything else: a preset name.

A transformers config builds the class its ``architectures`` names (else the auto class for its
task; ``model_class`` chooses) with ``from_config`` on the meta device; a repository that needs its
own code is refused unless ``trust_remote_code`` (``libraries.py``).

Listings: a preset's comes from the data it ships (``ModelPreset.listing``), a transformers, timm
or open_clip target's from the listing cache, keyed by its config data and the library versions
(``skeleton.py``), so only the first diff against a target builds a model. A factory is called
every time (what it returns can depend on anything its code reads). ``build_model`` builds the
model itself, for a load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import CheckpointNotFoundError, UsageError
from .formats import open_checkpoint
from .libraries import (
    CONFIG_NAME,
    HubConfig,
    factory_model,
    fetch_hub_config,
    is_transformers_config,
    open_clip_model,
    read_local_config,
    remote_code_digest,
    timm_model,
    transformers_model,
)
from .magic import is_index_name
from .meta import TensorMeta
from .modelconfig import build_from_config
from .presets import ModelPreset, get_preset
from .side import Side, groups_from_aliases
from .skeleton import cached_listing, preset_listing, read_listing
from .sources import HfReference, parse_hf_reference

HUB_REPO_RE = re.compile(r"^hf://(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^/]+))?/?$")
FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
LIBRARY_PREFIXES = ("timm:", "open_clip:")
# The libraries whose versions key a cached listing, by target kind (torch's layers define shapes too).
LIBRARY_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "transformers": ("torch", "transformers"),
    "timm": ("torch", "timm"),
    "open_clip": ("torch", "open_clip_torch", "timm"),
}
MODEL_FORMS = ("a transformers folder or config.json, hf://ORG/NAME[@REVISION], timm:NAME, open_clip:NAME "
               "or package.module:callable")
TARGET_FORMS = f"a preset name, {MODEL_FORMS}, or a checkpoint"


# ---------------------------------------------------------------------------------------------
# sides of models, checkpoints and mappings


def _tensor_identity(tensor) -> tuple:
    if tensor.device.type == "meta" or tensor.data_ptr() == 0:
        return ("id", id(tensor))
    return ("ptr", tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def _side_from_state(label: str, state: Mapping[str, Any], trainable: dict[str, bool] | None,
                     model: Any = None) -> Side:
    by_identity: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        by_identity.setdefault(_tensor_identity(tensor), []).append(name)
    metas = {name: TensorMeta.from_tensor(name, t) for name, t in state.items()}
    return Side(label, metas, list(by_identity.values()), trainable, model)


def module_side(model, label: str | None = None) -> Side:
    """Parameters and persistent buffers of a model (real or meta), with its tied names and what it
    re-creates itself (``recreated``)."""
    import torch

    # state_dict(keep_vars=True) lists every name load_state_dict expects, including names a
    # shared submodule is reachable under, and leaves out non-persistent buffers.
    state = model.state_dict(keep_vars=True)
    trainable = {name: isinstance(t, torch.nn.Parameter) and t.requires_grad for name, t in state.items()}
    trainable.update(_buffers_of_trained_modules(state, trainable, torch))
    side = _side_from_state(label or type(model).__name__, state, trainable, model)
    side.expected, side.ignored = recreated(model, side)
    return side


def _buffers_of_trained_modules(state, trainable: dict[str, bool], torch) -> dict[str, bool]:
    """A persistent buffer (BatchNorm's running statistics) is state the checkpoint must carry when
    its module is trained (has a trainable parameter), and may be absent when the module is frozen:
    it counts as trained exactly when the nearest module above it that holds parameters is trained."""
    modules: dict[str, bool] = {}
    for name, is_trained in trainable.items():
        if isinstance(state[name], torch.nn.Parameter):
            module = name.rpartition(".")[0]
            modules[module] = modules.get(module, False) or is_trained
    found = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.nn.Parameter):
            continue
        module = name.rpartition(".")[0]
        while module not in modules and module:
            module = module.rpartition(".")[0]
        found[name] = modules.get(module, False)
    return found


def recreated(model, side: Side) -> tuple[dict[str, str], list[str]]:
    """What a model re-creates when loaded: (names a checkpoint may lack, with why; regexes of
    checkpoint keys it ignores). Its non-persistent buffers, and for transformers models (at any
    depth) ``_keys_to_ignore_on_load_missing`` / ``_unexpected`` and weight ties it has not made yet."""
    group_of = {name: i for i, group in enumerate(side.groups) for name in group}
    expected: dict[str, str] = {}
    ignored = [f"^{re.escape(name)}$" for name, _ in model.named_buffers() if name not in side.metas]
    for prefix, module in model.named_modules():
        # transformers keeps some of these lists as sets: sorted, so a listing is the same in every process
        missing = sorted(getattr(module, "_keys_to_ignore_on_load_missing", None) or ())
        unexpected = sorted(getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
        ties = getattr(module, "all_tied_weights_keys", None)
        ties = ties if isinstance(ties, Mapping) else {}
        if not (missing or unexpected or ties):
            continue
        head = f"{prefix}." if prefix else ""
        for pattern in missing:
            for name in side.metas:
                if name.startswith(head) and re.search(pattern, name[len(head):]):
                    expected.setdefault(name, f"the model ignores it when missing ('{pattern}')")
        # transformers searches these anywhere in a key, so GPT-2's 'attn.bias' (a buffer) would also
        # hide 'c_attn.bias' (a trained bias): here a pattern must span whole name segments
        ignored += [f"^{re.escape(head)}(?:.*?\\.)?(?:{pattern})(?:\\.|$)" for pattern in unexpected]
        for tied, source in ties.items():
            name, origin = head + str(tied), head + str(source)
            # a tie already made is one group: covered by either name, nothing to expect
            if name in side.metas and origin in side.metas and group_of[name] != group_of[origin]:
                expected.setdefault(name, f"tied to {origin} when the model is loaded")
    return expected, list(dict.fromkeys(ignored))


def checkpoint_side(ckpt) -> Side:
    return Side(ckpt.source, ckpt.metas(), groups_from_aliases(ckpt.keys(), ckpt.aliases), source=ckpt.source)


def mapping_side(mapping: Mapping[str, Any], label: str) -> Side:
    """A mapping of TensorMeta, or a state dict of tensors (ties found by storage)."""
    values = list(mapping.values())
    if all(isinstance(v, TensorMeta) for v in values):
        metas = {k: (v if v.name == k else v.renamed(k)) for k, v in mapping.items()}
        return Side(label, metas, [[k] for k in metas])
    return _side_from_state(label, mapping, None)


def is_module(obj) -> bool:
    return hasattr(obj, "state_dict") and hasattr(obj, "named_parameters")


def open_side(source, **options) -> tuple[Side, Any]:
    """A checkpoint side from a Checkpoint, a path/hf:// reference, or a mapping; returns the
    Checkpoint when one was opened here (the caller closes it). ``options``: as ``open_checkpoint``."""
    if isinstance(source, Checkpoint):
        return checkpoint_side(source), None
    if isinstance(source, Mapping):
        return mapping_side(source, "checkpoint"), None
    if isinstance(source, str | Path):
        ckpt = open_checkpoint(source, **options)
        return checkpoint_side(ckpt), ckpt
    raise UsageError(f"cannot diff a {type(source).__name__}",
                     fix="pass a path, an hf:// reference, a Checkpoint or a mapping of TensorMeta")


# ---------------------------------------------------------------------------------------------
# targets given as text


@dataclass(frozen=True)
class TargetOptions:
    """How a target is built: the transformers class to use (``--model-class``), whether a
    repository's own code may run (``--trust-remote-code``), and the hub to read configs from."""

    model_class: str | None = None
    trust_remote_code: bool = False
    endpoint: str | None = None
    token: str | bool | None = None


@dataclass
class TargetSpec:
    """A target string, parsed: its kind and what it names. Nothing is read or built yet."""

    kind: str  # preset | transformers | timm | open_clip | factory | model-config | checkpoint
    given: str
    name: str = ""  # the preset, architecture or factory name
    path: Path | None = None  # a local config.json, model-config file or checkpoint
    ref: HfReference | None = None  # a hub config.json (revision not yet pinned)
    options: TargetOptions = field(default_factory=TargetOptions)
    _hub: HubConfig | None = field(default=None, repr=False)  # the config once read, at its commit

    @property
    def folder(self) -> Path | None:
        """Where a local transformers config's repository code would be."""
        return self.path.parent if self.kind == "transformers" and self.path is not None else None


def parse_target(text: str | Path, options: TargetOptions | None = None) -> TargetSpec:
    """What a target string names (see the module docstring for the order)."""
    given, options = str(text), options or TargetOptions()
    for prefix in LIBRARY_PREFIXES:
        if given.startswith(prefix):
            name = given[len(prefix):].strip()
            if not name:
                raise UsageError(f"{prefix} needs an architecture name", path=given, fix=f"e.g. {prefix}resnet18")
            return TargetSpec(prefix[:-1], given, name=name, options=options)
    if given.startswith("hf://"):
        return _parse_hub(given, options)
    path = Path(given)
    if path.exists():
        return _parse_path(given, path, options)
    if FACTORY_RE.match(given):
        return TargetSpec("factory", given, name=given, options=options)
    if "/" in given or path.suffix in (".json", ".toml", ".pt", ".bin", ".safetensors", ".pth", ".ckpt"):
        raise UsageError("no such file or folder", path=given,
                         fix="check the path; a hub model is written hf://ORG/NAME[@REVISION]")
    return TargetSpec("preset", given, name=given, options=options)


def _parse_hub(given: str, options: TargetOptions) -> TargetSpec:
    match = HUB_REPO_RE.match(given)
    if match is not None:
        ref = HfReference(f"{match['org']}/{match['name']}", match["rev"] or "main", CONFIG_NAME)
        return TargetSpec("transformers", given, ref=ref, options=options)
    ref = parse_hf_reference(given)
    if ref.path.rsplit("/", 1)[-1] == CONFIG_NAME:
        return TargetSpec("transformers", given, ref=ref, options=options)
    return TargetSpec("checkpoint", given, options=options)


def _parse_path(given: str, path: Path, options: TargetOptions) -> TargetSpec:
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            return TargetSpec("transformers", given, path=config, options=options)
        return TargetSpec("checkpoint", given, path=path, options=options)
    if path.suffix in (".json", ".toml") and not is_index_name(path.name):
        if path.suffix == ".json" and is_transformers_config(read_local_config(path)):
            return TargetSpec("transformers", given, path=path, options=options)
        return TargetSpec("model-config", given, path=path, options=options)
    return TargetSpec("checkpoint", given, path=path, options=options)


def is_model_config(path: str | Path) -> bool:
    """A .json/.toml file that is not a sharded checkpoint's index."""
    path = Path(path)
    return path.suffix in (".json", ".toml") and not is_index_name(path.name) and path.is_file()


# ---------------------------------------------------------------------------------------------
# listings


def target_side(spec: TargetSpec) -> Side:
    """The key listing of a parsed target (from shipped data or the cache where there is one)."""
    if spec.kind == "preset":
        return preset_side(_preset(spec.name))
    if spec.kind == "checkpoint":
        try:
            side, ckpt = open_side(spec.given, endpoint=spec.options.endpoint, token=spec.options.token)
        except CheckpointNotFoundError as exc:
            if spec.path is not None and spec.path.is_dir():  # the folder may have been meant as a model
                exc.fix = f"{exc.fix}; a transformers model folder holds {CONFIG_NAME}"
            raise
        ckpt.close()
        return side
    if spec.kind == "model-config":
        return module_side(build_from_config(spec.path, device="meta"), label=spec.given)
    if spec.kind == "factory":
        return module_side(factory_model(spec.name), label=spec.given)
    label = _label(spec)
    key = _cache_key(spec)
    name = f"{spec.kind}-{key['config'].get('model_type', 'model')}" if spec.kind == "transformers" else spec.given
    side = cached_listing(name, key, LIBRARY_DISTRIBUTIONS[spec.kind],
                          lambda: module_side(_build(spec, "meta"), label=label))
    side.label = label
    return side


def _preset(name: str) -> ModelPreset:
    """A preset by name; the error names the other kinds of target too (a mistyped path lands here)."""
    try:
        return get_preset(name)
    except UsageError as exc:
        raise UsageError(f"{name!r} is neither a model preset nor an existing path", path=None,
                         fix=f"{exc.fix}; or give {MODEL_FORMS}") from None


def _label(spec: TargetSpec) -> str:
    """The target as given; a hub config as its repository at the commit it was read at."""
    if spec.kind == "transformers" and spec.ref is not None:
        return _hub_config(spec).label
    return spec.given


def _hub_config(spec: TargetSpec) -> HubConfig:
    if spec._hub is None:
        spec._hub = fetch_hub_config(spec.ref, endpoint=spec.options.endpoint, token=spec.options.token)
    return spec._hub


def _config_data(spec: TargetSpec) -> dict[str, Any]:
    return _hub_config(spec).data if spec.ref is not None else read_local_config(spec.path)


def _cache_key(spec: TargetSpec) -> dict[str, Any]:
    """The data a listing is keyed by: never a source file of a library (its version stands for it)."""
    if spec.kind != "transformers":
        return {"kind": spec.kind, "name": spec.name}
    trusted = spec.options.trust_remote_code
    code = None
    if trusted:  # the repository's own code decides the model: the folder's code, or the commit
        code = remote_code_digest(spec.folder) if spec.ref is None else _hub_config(spec).ref.revision
    return {"kind": "transformers", "config": _config_data(spec), "model_class": spec.options.model_class,
            "remote_code": code}


def _build(spec: TargetSpec, device: str):
    if spec.kind == "timm":
        return timm_model(spec.name, device=device)
    if spec.kind == "open_clip":
        return open_clip_model(spec.name, device=device)
    if spec.kind == "factory":
        return factory_model(spec.name, device=device)
    if spec.ref is not None:
        hub = _hub_config(spec)
        location, revision, where = spec.ref.repo_id, hub.ref.revision, hub.label
    else:
        location, revision, where = (str(spec.folder), None, spec.given)
    return transformers_model(_config_data(spec), where=where, model_class=spec.options.model_class,
                              device=device, trust_remote_code=spec.options.trust_remote_code,
                              code_location=location, revision=revision)


@dataclass
class BuiltModel:
    """A target's model, built: the module, the preset it came from (if any), the label reports
    show, and the factory's whole result when a factory returned more than the model."""

    model: Any
    preset: ModelPreset | None
    label: str
    full: tuple | None = None


def build_model(target: str | Path | TargetSpec, *, device: str = "meta",
                options: TargetOptions | None = None) -> BuiltModel:
    """The model a target names, built on ``device`` (``meta``: a skeleton, no weights allocated)."""
    spec = target if isinstance(target, TargetSpec) else parse_target(target, options)
    if spec.kind == "preset":
        preset = _preset(spec.name)
        return BuiltModel(preset.build(device=device), preset, preset.name)
    if spec.kind == "checkpoint":
        raise UsageError("a checkpoint is not a model to build", path=spec.given,
                         fix=f"give the model as a preset name, {MODEL_FORMS}")
    if spec.kind == "model-config":
        full = build_from_config(spec.path, device=device, full=True)
        model = full[0] if isinstance(full, tuple) else full
        return BuiltModel(model, None, spec.given, full if isinstance(full, tuple) else (full,))
    return BuiltModel(_build(spec, device), None, _label(spec))


# ---------------------------------------------------------------------------------------------
# the resolver


def resolve_target(target, options: TargetOptions | None = None) -> Side:
    """A target side from a model, a preset (name or ModelPreset), a target string (see the module
    docstring), another checkpoint (path, hf:// reference or Checkpoint) or a mapping."""
    if isinstance(target, Side):
        return target
    if is_module(target):
        return module_side(target)
    if isinstance(target, ModelPreset):
        return preset_side(target)
    if callable(target):  # a deferred target: built only once the checkpoint opened fine
        return resolve_target(target(), options)
    if isinstance(target, Checkpoint | Mapping):
        return open_side(target)[0]
    if not isinstance(target, str | Path):
        raise UsageError(f"cannot diff against a {type(target).__name__}",
                         fix=f"pass an nn.Module, a Side, a mapping, or {TARGET_FORMS}")
    return target_side(parse_target(target, options))


def target_from_options(model: str | None = None, model_config: str | None = None,
                        against: str | None = None, options: TargetOptions | None = None) -> Callable[[], Side]:
    """The target of ``ckpt diff`` (exactly one of a model target, a model-config file, a checkpoint),
    deferred: ``diff_keys`` builds it after the checkpoint opened, so a bad path fails fast."""
    given = [v for v in (model, model_config, against) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one target: --model TARGET, --model-config FILE or --against SOURCE",
                         fix="e.g. ckpt diff checkpoint.pt --model openflamingo-3b-vitl-mpt1b")

    def build() -> Side:
        if model is not None:
            return target_side(parse_target(model, options))
        if model_config is not None:
            return module_side(build_from_config(model_config, device="meta"), label=str(model_config))
        side, ckpt = open_side(against)
        ckpt.close()
        return side

    return build


def preset_side(preset, *, cached: bool = True) -> Side:
    """A preset's key listing: the one it ships as data (``ModelPreset.listing``; imports no model
    code), else its meta-device skeleton's (from the listing cache when possible). ``cached=False``
    always builds the skeleton."""
    if not isinstance(preset, ModelPreset):
        preset = get_preset(str(preset))

    def build() -> Side:
        return module_side(preset.build(device="meta"), label=preset.name)

    if not cached:
        side = build()
    elif preset.listing is not None:
        side = read_listing(preset.listing, preset.name)
    else:
        side = preset_listing(preset, build)
    side.preset = preset
    return side

"""What a checkpoint is compared with, as a ``Side``: a model, a preset's skeleton, a model config's
build, another checkpoint, or a mapping of TensorMeta.

A preset's skeleton listing comes from the skeleton cache when it can (``skeleton.py``), so a key
diff against a preset needs no model build. A target given as a string is read in this order: a
model-config file (``.json``/``.toml`` that is not an index), a preset name (anything that is not
an existing path or ``hf://``), else a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import UsageError
from .formats import open_checkpoint
from .magic import is_index_name
from .meta import TensorMeta
from .modelconfig import build_from_config
from .presets import ModelPreset, get_preset
from .side import Side, groups_from_aliases
from .skeleton import preset_listing


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
    """Parameters and persistent buffers of a model (real or meta), with its tied names."""
    import torch

    # state_dict(keep_vars=True) lists every name load_state_dict expects, including names a
    # shared submodule is reachable under, and leaves out non-persistent buffers.
    state = model.state_dict(keep_vars=True)
    trainable = {name: isinstance(t, torch.nn.Parameter) and t.requires_grad for name, t in state.items()}
    return _side_from_state(label or type(model).__name__, state, trainable, model)


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


def resolve_target(target) -> Side:
    """A target side from a model, a preset (name or ModelPreset), a model-config file, another
    checkpoint (path, hf:// reference or Checkpoint) or a mapping."""
    if isinstance(target, Side):
        return target
    if is_module(target):
        return module_side(target)
    if isinstance(target, ModelPreset):
        return preset_side(target)
    if callable(target):  # a deferred target: built only once the checkpoint opened fine
        return resolve_target(target())
    if isinstance(target, Checkpoint | Mapping):
        return open_side(target)[0]
    if not isinstance(target, str | Path):
        raise UsageError(f"cannot diff against a {type(target).__name__}",
                         fix="pass an nn.Module, a preset name, a model config file, a checkpoint or a mapping")
    text = str(target)
    if is_model_config(text):
        return module_side(build_from_config(text, device="meta"), label=text)
    if not text.startswith("hf://") and not Path(text).exists():
        return preset_side(text)  # get_preset raises with the list of known presets
    side, ckpt = open_side(text)
    ckpt.close()
    return side


def target_from_options(model: str | None = None, model_config: str | None = None,
                        against: str | None = None) -> Callable[[], Side]:
    """The target of ``ckpt diff`` (exactly one of a preset name, a model-config file, a checkpoint),
    deferred: ``diff_keys`` builds it after the checkpoint opened, so a bad path fails fast."""
    given = [v for v in (model, model_config, against) if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one target: --model PRESET, --model-config FILE or --against SOURCE",
                         fix="e.g. ckpt diff checkpoint.pt --model openflamingo-3b-vitl-mpt1b")

    def build() -> Side:
        if model is not None:
            return preset_side(model)
        if model_config is not None:
                return module_side(build_from_config(model_config, device="meta"), label=str(model_config))
        side, ckpt = open_side(against)
        ckpt.close()
        return side

    return build


def is_model_config(path: str | Path) -> bool:
    """A .json/.toml file that is not a sharded checkpoint's index."""
    path = Path(path)
    return path.suffix in (".json", ".toml") and not is_index_name(path.name) and path.is_file()


def preset_side(preset, *, cached: bool = True) -> Side:
    """The key listing of a preset's meta-device skeleton (from the skeleton cache when possible)."""
    if not isinstance(preset, ModelPreset):
        preset = get_preset(str(preset))

    def build() -> Side:
        return module_side(preset.build(device="meta"), label=preset.name)

    side = preset_listing(preset, build) if cached else build()
    side.preset = preset
    return side

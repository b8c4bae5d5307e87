"""Training wrappers around a state dict, unwrapped in a documented priority order.

A checkpoint may be a bare state dict, or a dict holding one under a conventional name beside
other things (optimizer state, epoch, config). At each level the first of ``WRAPPER_KEYS`` whose
value is a mapping is entered; the path taken is reported as ``wrapper`` (e.g. ``model_state_dict``
or ``state_dict.module``) and every non-tensor entry met on the way is listed in ``extras``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from ..errors import InvalidCheckpointError
from .tensor_ref import TensorRef

WRAPPER_KEYS: tuple[str, ...] = (
    "state_dict",        # Lightning, many research repos
    "model_state_dict",  # the common training-loop convention (OpenFlamingo training checkpoints)
    "model",             # timm, DeiT, fairseq
    "module",            # DeepSpeed / a saved DDP wrapper
    "state_dict_ema",    # timm EMA weights
    "model_ema",
    "ema",
    "params",
    "weights",
)
MAX_DEPTH = 4


def _is_tensor(value) -> bool:
    """A torch tensor, or a tensor reference from the torch-free zip reader. Without torch
    imported, nothing can be a torch tensor, so listing never imports it."""
    if isinstance(value, TensorRef):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def unwrap(obj, source: str) -> tuple[dict, str | None, dict[str, str]]:
    """Return (state dict {str: tensor}, wrapper path or None, extras {dotted name: type name})."""
    path: list[str] = []
    extras: dict[str, str] = {}
    for _ in range(MAX_DEPTH + 1):
        if not isinstance(obj, Mapping):
            raise InvalidCheckpointError(
                f"the pickle holds a {type(obj).__name__}{' at ' + '.'.join(path) if path else ''}, not a dict of tensors",
                path=source, fix="save a state dict: torch.save(model.state_dict(), path)")
        if any(_is_tensor(v) for v in obj.values()):
            return _state_dict(obj, path, extras, source), ".".join(path) or None, extras
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        prefix = ".".join(path + [""]) if path else ""
        extras.update({prefix + str(k): type(v).__name__ for k, v in obj.items() if k != inner})
        path.append(inner)
        obj = obj[inner]
    keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else ""
    raise InvalidCheckpointError(
        f"no tensors found (top-level entries: {keys or 'none'})", path=source,
        fix=f"expected a state dict, or one under {', '.join(WRAPPER_KEYS[:5])}, ...")


def _state_dict(obj: Mapping, path: list[str], extras: dict[str, str], source: str) -> dict:
    prefix = ".".join(path + [""]) if path else ""
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InvalidCheckpointError(f"a state-dict key is a {type(key).__name__} ({key!r:.60}), not a string",
                                         path=source, fix="keys of a state dict must be strings")
        if _is_tensor(value):
            state[key] = value
        else:
            extras[prefix + key] = type(value).__name__
    return state


def extra_values(root, wrapper: str | None, extras: dict[str, str]) -> dict[str, object]:
    """The values behind ``extras`` (named as ``unwrap`` names them), taken from the loaded object."""
    values: dict[str, object] = {}
    obj, prefix = root, ""
    for part in wrapper.split(".") if wrapper else []:
        values.update({prefix + str(k): v for k, v in obj.items() if k != part})
        prefix, obj = prefix + part + ".", obj[part]
    values.update({prefix + str(k): v for k, v in obj.items() if prefix + str(k) in extras})
    return values

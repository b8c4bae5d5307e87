"""An OpenFlamingo-compatible model package and the registry of the published checkpoints.

``create_model_and_transforms`` and ``Flamingo`` are drop-ins for OpenFlamingo v2's; ``presets()``
lists the published checkpoints (and a tiny offline model) for ``ckpt_tools``. Imports are lazy so
``ckpt_tools`` can read the registry without importing torch.
"""

from __future__ import annotations

import importlib

_API = {
    "create_model_and_transforms": "factory",
    "Flamingo": "flamingo",
    "presets": "registry",
    "specs": "registry",
    "tiny_model_and_transforms": "registry",
    "tiny_tokenizer": "registry",
    "save_tiny_assets": "registry",
    "trained_state_dict": "trained",
    "make_trained_looking": "trained",
    "ResamplerConfig": "config",
    "CrossAttentionConfig": "config",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

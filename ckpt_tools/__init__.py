"""ckpt_tools: checkpoints as first-class objects.

The public API is imported lazily (PEP 562) so ``import ckpt_tools`` and ``ckpt --help`` stay
instant; torch is imported only by the functions that move tensor bytes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "CkptError": "errors",
    "CheckpointNotFoundError": "errors",
    "InvalidCheckpointError": "errors",
    "UnsupportedFormatError": "errors",
    "UnsafePickleError": "errors",
    "RemapError": "errors",
    "OutputExistsError": "errors",
    "UsageError": "errors",
    "HubError": "errors",
    "DiskFullError": "errors",
    "IntegrityError": "errors",
    "LoadRefusedError": "errors",
    "TensorMeta": "meta",
    "Rule": "remap",
    "RemapResult": "remap",
    "apply_remap": "remap",
    "rules_from_cli": "remap",
    "rules_from_dicts": "remap",
    "available_remaps": "remap",
    "convert_to_safetensors": "convert",
    "ConversionResult": "convert",
    "remap_checkpoint": "convert",
    "RemapCheckpointResult": "convert",
    "restore_aliases": "convert",
    "Checkpoint": "reader",
    "open_checkpoint": "reader",
    "inspect_checkpoint": "inspect",
    "InspectReport": "inspect",
    "ModelPreset": "presets",
    "available_presets": "presets",
    "get_preset": "presets",
    "download": "hub",
    "DownloadResult": "hub",
    "RetryPolicy": "hub",
    "HubServer": "server",
    "publish": "server",
    "parse_hf_reference": "formats.remote",
    "open_remote": "formats.remote",
    "diff_keys": "diff",
    "KeyReport": "diff",
    "load_checkpoint": "load",
    "validate": "validation",
    "ValidationReport": "validation",
    "scan_pickle": "scan",
    "ScanReport": "scan",
    "unsafe_globals": "scan",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

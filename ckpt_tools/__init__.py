"""ckpt_tools: checkpoints as first-class objects.

The public API is the command-level calls (one per ``ckpt`` command), the reports they return and
the errors they raise. No module imports torch, transformers or huggingface_hub at load time, so
``import ckpt_tools`` stays fast; the functions that move tensor bytes import torch themselves.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .convert import ConversionResult, convert_to_dcp, convert_to_safetensors, restore_aliases
from .diff import KeyReport, diff_keys
from .errors import (
    CheckpointNotFoundError,
    CkptError,
    DiskFullError,
    HubError,
    IntegrityError,
    InvalidCheckpointError,
    LoadRefusedError,
    OutputExistsError,
    RemapError,
    UnsafePickleError,
    UnsupportedFormatError,
    UsageError,
)
from .formats import open_checkpoint
from .http import RetryPolicy
from .hub import DownloadPlan, DownloadResult, download, plan_download
from .inspect import InspectReport, inspect_checkpoint
from .load import load_checkpoint
from .meta import TensorMeta
from .presets import ModelPreset
from .remap import Rule
from .remap_file import RemapCheckpointResult, remap_checkpoint
from .scan import ScanReport, scan_pickle
from .server import HubServer
from .validation import ValidationReport, validate
from .version import VERSION as __version__

__all__ = [
    "CheckpointNotFoundError", "Checkpoint", "CkptError", "ConversionResult", "DiskFullError", "DownloadPlan",
    "DownloadResult", "HubError", "HubServer", "InspectReport", "IntegrityError", "InvalidCheckpointError",
    "KeyReport", "LoadRefusedError", "ModelPreset", "OutputExistsError", "RemapCheckpointResult", "RemapError",
    "RetryPolicy", "Rule", "ScanReport", "TensorMeta", "UnsafePickleError", "UnsupportedFormatError",
    "UsageError", "ValidationReport", "__version__", "convert_to_dcp", "convert_to_safetensors", "diff_keys", "download",
    "inspect_checkpoint", "load_checkpoint", "open_checkpoint", "plan_download", "remap_checkpoint",
    "restore_aliases", "scan_pickle", "validate",
]

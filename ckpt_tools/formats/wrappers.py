"""Training wrappers around a state dict: which one is the model's.

The choice is made by content (``ckpt_tools.selection``: the most tensor bytes among state dicts
with parameter-like keys, optimizer state never). ``WRAPPER_KEYS`` is the documented priority
that only breaks ties between comparable state dicts (the same tensors and shapes), such as a
model and its EMA copy: the earlier name wins.
"""

from __future__ import annotations

from ..selection import Selection, select_state_dict

WRAPPER_KEYS: tuple[str, ...] = (
    "state_dict",        # Lightning, timm, many research repos
    "model_state_dict",  # the common training-loop convention (OpenFlamingo training checkpoints)
    "model",             # nanoGPT, fairseq, DeiT, YOLO (a pickled module)
    "module",            # DeepSpeed / a saved DDP wrapper
    "state_dict_ema",    # timm EMA weights
    "model_ema",
    "ema",               # YOLO's EMA module
    "params",
    "weights",
)


def choose(root, source: str, select: str | None = None) -> Selection:
    """The model's state dict in an unpickled checkpoint, its alternatives, extras and accounting."""
    return select_state_dict(root, select=select, priority=WRAPPER_KEYS, source=source)

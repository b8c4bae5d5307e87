"""Training wrappers around a state dict: which one is the model's.

The choice is made by content (``ckpt_tools.selection``: the most tensor bytes among state dicts
with parameter-like keys, optimizer state never). ``WRAPPER_KEYS`` is the documented priority
that only breaks ties between comparable state dicts (the same tensors and shapes), such as a
model and its EMA copy: the earlier name wins.
"""

from __future__ import annotations

from ..render import plural
from ..selection import TOP, Selection, select_state_dict

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


def selection_notes(selection, not_executed: dict[str, list[str]]) -> list[str]:
    """One line each for what else the file holds beside the selection, so nothing goes unmentioned
    (the torch pickle and DCP readers add them to their notes)."""
    lines = [f"also found: {a.select} ({plural(a.tensors, 'tensor')}, {a.nbytes:,} bytes): --select {a.select}"
             for a in selection.alternatives]
    accounting = selection.accounting
    if any(b.kind != "selected" for b in accounting.buckets):
        elsewhere = ", ".join(b.describe() for b in accounting.buckets if b.kind != "selected")
        lines.append(f"the file holds {plural(accounting.tensors, 'tensor')} ({accounting.nbytes:,} bytes); "
                     f"besides the selected ones: {elsewhere}")
    if not_executed:
        outer = _outermost(not_executed)
        shown = [f"{name} at {', '.join(p or TOP for p in paths[:3]) or '(no entry)'}"
                 + (f" (+{len(paths) - 3})" if len(paths) > 3 else "") for name, paths in outer.items()]
        inner = len(not_executed) - len(outer)
        lines.append(f"not executed (read inertly, never imported or called): {'; '.join(shown)}"
                     + (f"; and {inner} more globals inside them" if inner else ""))
    return lines


def _outermost(not_executed: dict[str, list[str]]) -> dict[str, list[str]]:
    """The placeholders that do not sit inside another one (a DictConfig, not its nodes)."""
    every = {path for paths in not_executed.values() for path in paths}

    def inside(path: str) -> bool:
        if path and "" in every:
            return True
        cut = path.rfind(".")
        while cut > 0:
            if path[:cut] in every:
                return True
            cut = path.rfind(".", 0, cut)
        return False

    outer = {name: [p for p in paths if not inside(p)] for name, paths in not_executed.items()}
    return {name: paths for name, paths in outer.items() if paths or not not_executed[name]}

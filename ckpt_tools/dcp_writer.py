"""Writing a torch.distributed.checkpoint (DCP) folder with torch's own ``dcp.save``, one tensor at a time.

torch's machinery writes the folder (``FileSystemWriter``: one ``__0_0.distcp`` of ``torch.save``
chunks, then ``.metadata``), so torch's ``dcp.load`` reads it back into a model sharded any way,
and the layout stays whatever torch's current version writes. What changes is where the bytes
come from: ``dcp.save`` is given meta-device placeholders (shapes and dtypes only, no memory) and
a planner whose ``resolve_data`` reads each tensor from the source only when the writer asks for
it. torch's writer resolves and writes the items one by one, so memory holds about one tensor,
not the state. It runs in this process alone (``no_dist``): no process group is needed, and one
that is initialised is left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import CkptError
from .meta import TensorMeta, torch_dtype

DATA_FILE = "__0_0.distcp"  # what torch's FileSystemWriter names the one file of rank 0
METADATA_FILE = ".metadata"


def dcp_file(name: str) -> bool:
    """A file a DCP folder's writer owns (replaced when the folder is written again)."""
    return name == METADATA_FILE or name.endswith(".distcp")


def write_dcp(folder: Path, entries: Sequence[tuple[TensorMeta, Callable[[], object]]]) -> int:
    """Write ``entries`` ((output meta, a callable returning the source tensor)) as a DCP folder at
    ``folder`` (which must exist); each tensor is cast to its meta's dtype as it is written.
    Returns the bytes of the files written."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    by_name = {meta.name: (meta, load) for meta, load in entries}

    class OnDemand(DefaultSavePlanner):
        """Resolves a tensor from the source when the writer reaches it, not before."""

        def resolve_data(self, write_item):
            meta, load = by_name[write_item.index.fqn]
            tensor = load().to(torch_dtype(meta.dtype))
            return tensor if tensor.is_contiguous() else tensor.contiguous()

    placeholders = {meta.name: torch.empty(meta.shape, dtype=torch_dtype(meta.dtype), device="meta")
                    for meta, _ in entries}
    writer = FileSystemWriter(folder, single_file_per_rank=True, sync_files=True, overwrite=True)
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        # no_dist: one process writes every tensor, even inside a process group (no collectives)
        try:
            save(placeholders, storage_writer=writer, planner=OnDemand(), no_dist=True)
        except CheckpointException as exc:
            # torch wraps what resolve_data raised (an overflowing cast, a damaged source): the
            # error of ours inside is the one line the user should see
            causes = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
            ours = next((c for c in causes if isinstance(c, CkptError)), None)
            if ours is None:
                raise
            raise ours from None
    return sum(p.stat().st_size for p in folder.iterdir() if dcp_file(p.name))

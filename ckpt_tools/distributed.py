"""What a rank needs to load its own part of a sharded model: the slices it owns, read alone, and a
few collectives that carry JSON (never a pickle) between ranks.

A model sharded with FSDP2 (``fully_shard``) or DTensor tensor parallelism holds ``DTensor``
parameters: each rank keeps one block of each tensor (``to_local()``), placed by its
``placements``. DCP's own protocol says which block: ``DTensor.__create_chunk_list__()`` gives its
offsets and sizes in the global tensor, whatever the placements (``Shard(0)``, ``Shard(1)``,
``Replicate()``, or several mesh dimensions at once). A plain tensor in such a model is whole on
every rank.

The collectives run on the default process group (gloo on CPU, NCCL with tensors on the current
CUDA device), so every rank of it must take part. ``agree`` makes a step fail on every rank when
it fails on one, so no rank waits forever for another that gave up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from . import errors
from .errors import CkptError, UnsupportedFormatError
from .meta import DTYPES, torch_dtype

T = TypeVar("T")


def is_sharded(model) -> bool:
    """True when ``torch.distributed`` is initialised and the model holds a DTensor."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in model.state_dict(keep_vars=True).values())


def rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def owned_box(tensor, name: str) -> tuple[tuple[int, ...], tuple[int, ...], Any]:
    """(offsets, sizes) of the block of ``tensor`` this rank holds, and the local tensor to fill."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return (0,) * tensor.dim(), tuple(tensor.shape), tensor
    chunks = tensor.__create_chunk_list__()
    local = tensor.to_local()
    if len(chunks) != 1 or tuple(chunks[0].sizes) != tuple(local.shape):
        raise UnsupportedFormatError(f"this rank holds its part of the tensor as {len(chunks)} blocks "
                                     f"(placements {tensor.placements})", key=name,
                                     fix="load it unsharded and shard it afterwards, or with torch.distributed."
                                         "checkpoint.load")
    return tuple(int(o) for o in chunks[0].offsets), tuple(int(s) for s in chunks[0].sizes), local


def read_slice(checkpoint, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
               out=None) -> tuple[Any, int]:
    """The block ``[offsets, offsets + sizes)`` of a checkpoint tensor and the bytes read for it:
    readers that know their files (safetensors, DCP, a sharded index of them) read only the block's
    byte runs, straight into ``out`` when it is given (a contiguous CPU tensor of the block's shape
    and the checkpoint's dtype); any other reader maps the tensor and copies the block (its bytes
    are counted)."""
    reader = getattr(checkpoint, "read_slice", None)
    if reader is not None:
        before = checkpoint.data_bytes_read
        block = reader(key, offsets, sizes, out=out)
        return block, checkpoint.data_bytes_read - before
    block = checkpoint.tensor(key)[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
    block = block.clone() if out is None else out.copy_(block)
    meta = checkpoint.meta(key)
    return block, math.prod(sizes) * int(DTYPES[meta.dtype][0])


def fits(buffer, sizes: tuple[int, ...], dtype: str) -> bool:
    """Whether a block of ``sizes`` and ``dtype`` (a safetensors name) can be read straight into
    ``buffer``."""
    return (tuple(buffer.shape) == tuple(sizes) and buffer.is_contiguous() and buffer.device.type == "cpu"
            and buffer.dtype == torch_dtype(dtype))


# ---------------------------------------------------------------------------------------------
# collectives carrying JSON

def _device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_tensor(payload: bytes, device):
    import torch

    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)


def broadcast_json(value, src: int = 0):
    """``value`` (JSON-able) from rank ``src`` to every rank."""
    import torch
    import torch.distributed as dist

    device = _device()
    payload = json.dumps(value).encode("utf-8") if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buffer = _to_tensor(payload, device) if dist.get_rank() == src else \
        torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src)
    return json.loads(bytes(buffer.cpu().numpy()).decode("utf-8"))


def gather_json(value) -> list:
    """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
    import torch
    import torch.distributed as dist

    device = _device()
    payload = json.dumps(value).encode("utf-8")
    world = dist.get_world_size()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[:len(payload)] = _to_tensor(payload, device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [json.loads(bytes(part[:int(n.item())].cpu().numpy()).decode("utf-8")) for part, n in zip(parts, sizes,
                                                                                                    strict=True)]


def agree(step: Callable[[], T]) -> T:
    """Run ``step`` on this rank; if it raised here or on any other rank, raise on every rank (the
    error itself where it happened, the same error class naming that rank elsewhere)."""
    failure: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then raised again below
        failure = exc
    rank, _ = rank_and_size()
    mine = None if failure is None else {"kind": type(failure).__name__, "text": _one_line(failure)}
    statuses = gather_json(mine)
    if failure is not None:
        raise failure
    for other, status in enumerate(statuses):
        if status is not None and other != rank:
            raise _error_class(status["kind"])(f"rank {other} failed: {status['text']}",
                                               fix="see that rank's error; every rank stopped at the same step")
    return result


def on_first_rank(step: Callable[[], Any]):
    """``step()`` (JSON-able) computed on rank 0 only and handed to every rank; if it raised, every
    rank raises (rank 0 the error itself)."""
    rank, _ = rank_and_size()
    failure: BaseException | None = None
    payload = None
    if rank == 0:
        try:
            payload = {"value": step()}
        except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then raised again below
            failure = exc
            payload = {"kind": type(exc).__name__, "text": _one_line(exc)}
    payload = broadcast_json(payload)
    if failure is not None:
        raise failure
    if "value" not in payload:
        raise _error_class(payload["kind"])(f"rank 0 failed: {payload['text']}",
                                            fix="see rank 0's error; every rank stopped at the same step")
    return payload["value"]


def _error_class(name: str) -> type:
    kind = getattr(errors, name, None)
    return kind if isinstance(kind, type) and issubclass(kind, CkptError) else CkptError


def _one_line(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, CkptError) else f"{type(exc).__name__}: {exc}"

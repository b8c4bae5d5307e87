"""A torch.distributed.checkpoint folder written by torch's own ``dcp.save`` from an FSDP2 model on
N CPU ranks (gloo), with the shapes of a decoder-only language model.

At --scale 1 the state is 4.0 GB of float32: a 32000 x 2048 embedding and 14 layers of four
2048 x 2048 attention projections, three 8192 x 2048 / 2048 x 8192 feed-forward matrices and two
norm vectors. --scale S multiplies the widths by sqrt(S), so the bytes scale by about S.

Tensor number i holds ``i + (flat index) / numel``: distinct, cheap, and computed for each rank's
own rows only, so a rank never holds more than its half of the state. The folder is written to
``OUT.tmp`` and renamed into place.

Usage (N ranks):
    python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/bench/gen_dcp.py --scale 0.01 --out DIR
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path

LAYERS = 14


def dims(scale: float) -> tuple[int, int]:
    """(vocabulary, width) at ``scale``: widths by sqrt(scale), in multiples of 64."""
    root = math.sqrt(scale)
    return max(256, round(32000 * root / 64) * 64), max(64, round(2048 * root / 64) * 64)


def layout(scale: float) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, in the model's order."""
    vocab, width = dims(scale)
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (vocab, width)}
    for i in range(LAYERS):
        for name in ("wq", "wk", "wv", "wo"):
            shapes[f"layers.{i}.attention.{name}.weight"] = (width, width)
        shapes[f"layers.{i}.feed_forward.w1.weight"] = (4 * width, width)
        shapes[f"layers.{i}.feed_forward.w2.weight"] = (width, 4 * width)
        shapes[f"layers.{i}.feed_forward.w3.weight"] = (4 * width, width)
        shapes[f"layers.{i}.attention_norm.weight"] = (width,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (width,)
    return shapes


def state_bytes(scale: float) -> int:
    return sum(math.prod(s) * 4 for s in layout(scale).values())


def model(scale: float, device: str = "meta"):
    """An nn.Module whose state dict has ``layout(scale)``'s names and shapes (on ``device``)."""
    import torch
    from torch import nn

    vocab, width = dims(scale)

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(width))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Module()
            for name in ("wq", "wk", "wv", "wo"):
                setattr(self.attention, name, nn.Linear(width, width, bias=False))
            self.feed_forward = nn.Module()
            self.feed_forward.w1 = nn.Linear(width, 4 * width, bias=False)
            self.feed_forward.w2 = nn.Linear(4 * width, width, bias=False)
            self.feed_forward.w3 = nn.Linear(width, 4 * width, bias=False)
            self.attention_norm, self.ffn_norm = Norm(), Norm()

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_embeddings = nn.Embedding(vocab, width)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    with torch.device(device):
        return Decoder()


def sharded_model(scale: float):
    """``model(scale)`` sharded with FSDP2 over every rank (each layer, then the root), on CPU,
    uninitialised."""
    from torch.distributed.fsdp import fully_shard

    built = model(scale)
    for layer in built.layers:
        fully_shard(layer)
    fully_shard(built)
    return built.to_empty(device="cpu")


def values(index: int, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]):
    """The block ``[offsets, offsets + sizes)`` of tensor number ``index`` (a row block)."""
    import torch

    numel = math.prod(shape)
    row = math.prod(shape[1:])
    first = offsets[0] * row if shape else 0
    flat = torch.arange(first, first + math.prod(sizes), dtype=torch.float64) / max(numel, 1) + index
    return flat.to(torch.float32).reshape(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    out = Path(args.out)
    staging = Path(f"{out}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    built = sharded_model(args.scale)
    with torch.no_grad():
        for index, tensor in enumerate(built.state_dict().values()):
            chunk = tensor.__create_chunk_list__()[0] if isinstance(tensor, DTensor) else None
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            offsets = tuple(chunk.offsets) if chunk is not None else (0,) * tensor.dim()
            local.copy_(values(index, tuple(tensor.shape), offsets, tuple(local.shape)))
    dist.barrier()
    dcp.save(get_model_state_dict(built), checkpoint_id=str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.rename(staging, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

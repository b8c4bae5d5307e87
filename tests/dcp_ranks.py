"""Run under ``torchrun --nproc-per-node N``: DCP folders written by torch from an FSDP2 model, then
loaded back every way, on CPU with gloo. ``python -m torch.distributed.run --standalone
--nproc-per-node N dcp_ranks.py WORKDIR`` leaves in WORKDIR:

- ``dcp-full/``: torch's ``dcp.save`` of ``{"model": ..., "optim": ...}`` from ``get_state_dict``
  (an FSDP2 model after one AdamW step); ``dcp-model/``: the model alone, flat keys;
- ``original.safetensors``: the same model unsharded (``full_state_dict=True``), the reference;
- ``ours-dcp/``: ``convert_to_dcp(original.safetensors)``, which torch's own ``dcp.load`` then reads
  into a fresh FSDP2 model;
- ``result-<rank>.json``: per scenario, whether the loaded model equals the original bit for bit,
  the load report's verdict, and the bytes this rank read next to the bytes of the blocks it owns.

Scenarios: torch's loader on our DCP; ``load_checkpoint`` into FSDP2 models from safetensors and
from torch's DCP; into a tensor-parallel model (Shard(0), Shard(1) and Replicate placements) from
both; a model with a wrong shape, which every rank must refuse alike.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ckpt_tools import LoadRefusedError, convert_to_dcp, load_checkpoint

ROWS, WIDTH, HIDDEN, OUT = 257, 64, 128, 48  # odd row counts: the last rank's blocks are shorter


class Tiny(nn.Module):
    def __init__(self, rows: int = ROWS) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, WIDTH)
        self.body = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
        self.register_buffer("scale", torch.arange(OUT, dtype=torch.float32))  # stays whole on every rank

    def forward(self, ids):
        return self.body(self.embed(ids)) * self.scale


def fsdp_model(seed: int, rows: int = ROWS) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny(rows)
    fully_shard(model)
    return model


def tp_model(seed: int, mesh) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    # embed Shard(1); body.0 Shard(0) weight and bias; body.2 Shard(1) weight, Replicate bias
    return parallelize_module(model, mesh, {"embed": ColwiseParallel(), "body.0": ColwiseParallel(),
                                            "body.2": RowwiseParallel()})


def full_state(model) -> dict:
    """The whole model on every rank (collective), plain CPU tensors."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return out


def owned_bytes(model) -> int:
    """What this rank holds: its DTensor blocks and its plain tensors."""
    total = 0
    for tensor in model.state_dict().values():
        if isinstance(tensor, DTensor):
            total += sum(math.prod(c.sizes) for c in tensor.__create_chunk_list__()) * tensor.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def same_as(model, original: dict) -> bool:
    state = full_state(model)
    return set(state) == set(original) and all(
        torch.equal(state[k].contiguous().view(torch.uint8), original[k].contiguous().view(torch.uint8))
        for k in original)


def scenario(load, model, original: dict) -> dict:
    report = load()
    mine = report.load["ranks"][dist.get_rank()]
    return {"equal": same_as(model, original), "verdict": report.verdict, "verified": report.load["verified"],
            "bytes_read": mine["bytes_read"], "verify_bytes_read": mine["verify_bytes_read"],
            "owned": owned_bytes(model), "state_bytes": report.load["state_bytes"],
            "all_ranks_bytes": [r["bytes_read"] for r in report.load["ranks"]], "world": report.load["world_size"],
            "markdown": report.to_markdown()}


def main(work: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.set_num_threads(1)
    results: dict = {}

    trained = fsdp_model(0)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    trained(torch.arange(16) % ROWS).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(trained, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(work / "dcp-full"))
    dcp.save(get_model_state_dict(trained), checkpoint_id=str(work / "dcp-model"))
    original = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    original = {k: v.contiguous() for k, v in original.items()} if rank == 0 else None
    if rank == 0:
        from safetensors.torch import save_file

        save_file(original, work / "original.safetensors")
        convert_to_dcp(work / "original.safetensors", work / "ours-dcp")
    dist.barrier()
    original = full_state(trained)

    fresh = fsdp_model(1)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=str(work / "ours-dcp"))
    set_model_state_dict(fresh, state)
    results["torch_loads_ours"] = {"equal": same_as(fresh, original)}

    sources = {"safetensors": work / "original.safetensors", "dcp": work / "dcp-full"}
    for kind, source in sources.items():
        model = fsdp_model(2)
        results[f"fsdp_from_{kind}"] = scenario(lambda s=source, m=model: load_checkpoint(s, m), model, original)
        model = tp_model(3, mesh)
        results[f"tp_from_{kind}"] = scenario(lambda s=source, m=model: load_checkpoint(s, m), model, original)
        results[f"tp_from_{kind}"]["placements"] = {k: [str(p) for p in v.placements]
                                                    for k, v in model.state_dict().items() if isinstance(v, DTensor)}

    wrong = fsdp_model(4, rows=ROWS + 1)
    try:
        load_checkpoint(work / "original.safetensors", wrong)
        results["refused"] = {"refused": False}
    except LoadRefusedError as exc:
        results["refused"] = {"refused": True, "verdict": exc.report.verdict,
                              "shape_mismatch": exc.report.counts["shape_mismatch"]}

    (work / f"result-{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()  # every rank's results are on disk
    # Leave without running C++ destructors: with three ranks on two cores, gloo's teardown can abort
    # ("terminate called without an active exception") after all the work is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # torch's notices about FSDP2 and DCP internals
    main(Path(sys.argv[1]))

"""One side of the multi-rank load benchmark: ``load_checkpoint(SOURCE, model)`` timed and its memory
sampled, in a model with ``gen_dcp.layout(SCALE)``.

Under ``torch.distributed.run`` (``RANK`` set) the model is sharded with FSDP2 over the ranks
(gloo, CPU) and each rank loads its own blocks; run plainly it is one unsharded model in one
process, the baseline. Each process samples its own RssAnon every 10 ms from the moment the model
is allocated to the end of the last load (the floor is taken before, with torch, FSDP2 and DTensor
imported and the process group up), and writes ``OUT/rank-<rank>.json`` (``single.json``
without ranks): the load times, the RssAnon floor before the model and the peak, the bytes the
report says this rank read, and whether the loaded values are the generator's.

Usage:
    python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/bench/dcp_load_worker.py \
        --scale 0.01 --source DIR_OR_FILE --runs 3 --out RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import gen_dcp


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


class Peak:
    """The largest RssAnon of this process, sampled every ``interval`` seconds while running."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak = interval, rss_anon()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, rss_anon())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, rss_anon())


def check(built) -> bool:
    """Every tensor's local values are the generator's (each rank checks the rows it holds)."""
    import torch
    from torch.distributed.tensor import DTensor

    for index, (_, tensor) in enumerate(built.state_dict().items()):
        chunk = tensor.__create_chunk_list__()[0] if isinstance(tensor, DTensor) else None
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        offsets = tuple(chunk.offsets) if chunk is not None else (0,) * tensor.dim()
        if not torch.equal(local, gen_dcp.values(index, tuple(tensor.shape), offsets, tuple(local.shape))):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401 - imported before the floor is taken, as in any trainer
    import torch.distributed.tensor  # noqa: F401

    from ckpt_tools import load_checkpoint

    torch.set_num_threads(1)
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else None
    floor = rss_anon()
    peak = Peak()
    built = gen_dcp.sharded_model(args.scale) if sharded else gen_dcp.model(args.scale).to_empty(device="cpu")
    times, report = [], None
    for _ in range(args.runs):
        if sharded:
            dist.barrier()
        started = time.perf_counter()
        report = load_checkpoint(args.source, built)
        times.append(time.perf_counter() - started)
    top = peak.stop()
    mine = report.load["ranks"][rank] if sharded else {"bytes_read": report.load["bytes"]}
    result = {"rank": rank, "world": report.load.get("world_size", 1), "load_s": times, "floor_anon": floor,
              "peak_anon": top, "bytes_read": mine["bytes_read"], "state_bytes": gen_dcp.state_bytes(args.scale),
              "verified": report.load["verified"], "values_ok": check(built)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("single.json" if rank is None else f"rank-{rank}.json")).write_text(json.dumps(result))
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

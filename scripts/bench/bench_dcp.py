"""Checkpoints from many ranks (issue 18): converting a torch.distributed.checkpoint folder, and
loading into a model sharded over 2 ranks.

The folder is written by torch's own ``dcp.save`` from an FSDP2 model on 2 CPU ranks
(``gen_dcp.py``: a decoder-only layout, 4.0 GB of float32 at --scale 1).

1. ``ckpt convert DCP out.safetensors`` (verified) within 1.3x the wall time of a durable copy of
   the ``.distcp`` files (``cp`` + ``sync``), interleaved run by run; its RssAnon above
   ``python -c "import torch"`` under the largest tensor + 100 MB. Beside it: ``--no-verify``, and
   the anchor, ``dcp_to_torch_save`` + ``torch.load`` + ``save_file`` (one run), which holds the
   whole state. The output is checked against the generator's values.
2. ``load_checkpoint`` into the FSDP2 model on 2 ranks (``dcp_load_worker.py`` under
   ``torch.distributed.run``), from the converted safetensors file and from the DCP folder: each
   rank's peak RssAnon above its floor (torch imported, process group up) under 60% of the state,
   the bytes each rank read (about half), and the load's time (the slowest rank's median) under the
   single-process load of the same source into the unsharded model.

Example:
    .venv/bin/python scripts/bench/bench_dcp.py --scale 0.01 --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import gen_dcp
import harness

MAX_RATIO = 1.3
EXTRA_ANON_MB = 100
MAX_RANK_SHARE = 0.6
RANKS = 2
ANCHOR = (
    "import sys, torch\n"
    "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
    "from safetensors.torch import save_file\n"
    "dcp_to_torch_save(sys.argv[1], sys.argv[2])\n"
    "save_file({k: v.contiguous() for k, v in torch.load(sys.argv[2]).items()}, sys.argv[3], metadata={'format': 'pt'})\n"
)
CHECK_OUTPUT = (
    "import sys, gen_dcp\n"
    "from safetensors import safe_open\n"
    "shapes = gen_dcp.layout(float(sys.argv[2]))\n"
    "with safe_open(sys.argv[1], 'pt') as f:\n"
    "    assert list(f.keys()) == sorted(shapes), 'keys differ'\n"
    "    for i, (name, shape) in enumerate(shapes.items()):\n"
    "        want = gen_dcp.values(i, shape, (0,) * len(shape), shape)\n"
    "        assert f.get_tensor(name).equal(want), name\n"
    "print(len(shapes))\n"
)


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.HERE), str(harness.REPO)]),
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(script: str, *extra: str) -> list[str]:
    return [harness.PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
            str(harness.HERE / script), *extra]


def folder(args: argparse.Namespace) -> tuple[Path, bool]:
    """The DCP folder at this scale (generated unless already there); whether it was generated."""
    path = Path(args.workdir) / f"dcp-decoder-s{args.scale:g}"
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = torchrun("gen_dcp.py", "--scale", str(args.scale), "--out", str(path))
    print("generating:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env(), capture_output=True)
    return path, True


def check(out: Path, scale: float) -> str:
    proc = subprocess.run([harness.PYTHON, "-c", CHECK_OUTPUT, str(out), str(scale)], capture_output=True, text=True,
                          env=env())
    if proc.returncode != 0:
        raise SystemExit(f"output check failed: {proc.stderr[-2000:]}")
    return f"{proc.stdout.strip()} tensors equal to the generator's values"


def bench_convert(args: argparse.Namespace, dcp: Path, size: int, largest: int) -> Path:
    work = Path(args.workdir)
    out = work / f"dcp-convert-{os.getpid()}.safetensors"
    copy = work / f"dcp-copy-{os.getpid()}"
    anchor_pt, anchor_out = work / f"dcp-anchor-{os.getpid()}.pt", work / f"dcp-anchor-{os.getpid()}.safetensors"
    durable = ["sh", "-c", 'mkdir -p "$2" && cp "$1"/*.distcp "$2"/ && sync "$2"/*.distcp', "sh", str(dcp), str(copy)]
    ours = [harness.CKPT, "convert", str(dcp), str(out), "--force", "--format", "json"]
    try:
        torch_floor = harness.baseline_import_torch(args)
        timed = harness.measure_interleaved({"ours": ours, "cp + sync": durable}, args)
        checked = check(out, args.scale)
        fast = harness.measure([*ours, "--no-verify"], args)
        anchor = harness.measure([harness.PYTHON, "-c", ANCHOR, str(dcp), str(anchor_pt), str(anchor_out)], args,
                                 runs=1, warmup=False)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        anchor_pt.unlink(missing_ok=True)
        anchor_out.unlink(missing_ok=True)
    plot = harness.plot_memory({"ckpt convert": timed["ours"], "dcp_to_torch_save + save_file": anchor,
                                "import torch": torch_floor}, args, "convert-dcp-memory.png",
                               f"Converting a DCP folder of {human(size)} written by {RANKS} ranks: memory over time")
    label = f"DCP folder of {human(size)} written by {RANKS} ranks -> safetensors"
    bound = torch_floor.peak_anon_mb + largest / harness.MB + EXTRA_ANON_MB
    memory = {"memory_target": f"RssAnon <= import torch + largest tensor ({largest / harness.MB:.0f} MB) + "
                               f"{EXTRA_ANON_MB} MB", "memory_ok": timed["ours"].peak_anon_mb <= bound}
    entry = harness.result("dcp", f"ckpt convert (verified), {label}, vs cp + sync of the .distcp files",
                           timed["ours"], timed["cp + sync"], args=args, max_ratio=MAX_RATIO, size_bytes=size,
                           plot=plot, notes=f"{checked}; interleaved runs; RssAnon bound {bound:.0f} MB")
    entry.update(memory_target=memory["memory_target"], ok=bool(entry["ok"] and memory["memory_ok"]))
    harness.record(args, entry)
    harness.record(args, harness.result(
        "dcp", f"ckpt convert --no-verify, {label}, vs cp + sync", fast, timed["cp + sync"], args=args,
        size_bytes=size, plot=plot, notes="informational: the copy alone, kernel to kernel, no re-read"))
    harness.record(args, harness.result(
        "dcp", f"anchor: dcp_to_torch_save + torch.load + save_file, {label}, vs cp + sync", anchor,
        timed["cp + sync"], args=args, size_bytes=size, plot=plot,
        notes="one run; torch's own way, which holds the whole state in memory"))
    return out


def load_runs(args: argparse.Namespace, source: Path, name: str) -> tuple[list[dict], dict, list[list[str]]]:
    results = Path(args.out) / f"dcp-load-{name}"
    shutil.rmtree(results, ignore_errors=True)
    common = ["--scale", str(args.scale), "--source", str(source), "--runs", str(args.runs), "--out", str(results)]
    commands = [torchrun("dcp_load_worker.py", *common), [harness.PYTHON, str(harness.HERE / "dcp_load_worker.py"),
                                                           *common]]
    for cmd in commands:
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"load worker failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    ranks = [json.loads((results / f"rank-{r}.json").read_text()) for r in range(RANKS)]
    single = json.loads((results / "single.json").read_text())
    shutil.rmtree(results, ignore_errors=True)
    return ranks, single, commands


def stats(command: list[str], runs: list[float], anon: int) -> harness.Stats:
    """A Stats of the load call's times measured inside the worker (not the process's)."""
    return harness.Stats(command, [harness.Run(t, anon, anon, 0) for t in runs], "warm")


def bench_load(args: argparse.Namespace, source: Path, kind: str, size: int) -> None:
    ranks, single, (sharded, plain) = load_runs(args, source, kind)
    slowest = max(ranks, key=lambda r: sorted(r["load_s"])[len(r["load_s"]) // 2])
    worst = max(r["peak_anon"] - r["floor_anon"] for r in ranks)
    ours = stats(sharded, slowest["load_s"], worst)
    base = stats(plain, single["load_s"], single["peak_anon"] - single["floor_anon"])
    state = ranks[0]["state_bytes"]
    shares = [r["bytes_read"] / state for r in ranks]
    correct = all(r["verified"] and r["values_ok"] for r in [*ranks, single])
    entry = harness.result(
        "dcp", f"load_checkpoint into an FSDP2 model on {RANKS} ranks from {kind} ({human(state)} state), "
               "vs the single-process load", ours, base,
        baseline_name="load_checkpoint in one process, into the unsharded model (the same worker without "
                      "torch.distributed.run)", args=args,
        max_ratio=1.0, size_bytes=size,
        notes=(f"time of the load call (median of {args.runs}; the slowest rank); bytes read per rank "
               f"{', '.join(f'{s:.3f}' for s in shares)} of the state; RssAnon above each process's floor "
               f"(torch imported), model included; verified and equal to the generator's values: {correct}"))
    fits = worst <= MAX_RANK_SHARE * state and all(s <= 0.55 for s in shares) and correct
    entry.update(memory_target=f"each rank's RssAnon <= {MAX_RANK_SHARE:g} x state; bytes read <= 0.55 x state",
                 ok=bool(entry["ok"] and fits))
    harness.record(args, entry)


def bench(args: argparse.Namespace) -> None:
    dcp, generated = folder(args)
    try:
        size = sum(p.stat().st_size for p in dcp.glob("*.distcp"))
        largest = max(math.prod(s) * 4 for s in gen_dcp.layout(args.scale).values())
        converted = bench_convert(args, dcp, size, largest)
        try:
            bench_load(args, converted, "safetensors", size)
            bench_load(args, dcp, "DCP", size)
        finally:
            converted.unlink(missing_ok=True)
    finally:
        if generated and not args.keep:
            shutil.rmtree(dcp, ignore_errors=True)


if __name__ == "__main__":
    harness.run(bench, __doc__)

"""Training checkpoints: converting the weights of a checkpoint that also holds Adam's state.

A training checkpoint as most loops save it, `{"model": weights, "optimizer": {"state": {i:
{"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}, "epoch": 3}`, holds the weights twice
over in optimizer moments. `ckpt convert` picks the model by content and must read the weights
only: its time is compared with converting a file that holds the same weights alone, run
alternately in the same script (target: within 1.3x, "time proportional to the weights"), and its
anonymous memory must stay under 50 MB above the weights-only conversion's. Listing the training
checkpoint (`ckpt inspect`) is timed too (target: under 0.5 s).

The weights are a stack of 64 MiB float32 matrices, `--scale 1` = 1 GiB of weights (3 GiB file).

Example:
    .venv/bin/python scripts/bench/bench_training.py --scale 0.25 --runs 3
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import harness

MAX_RATIO, MAX_EXTRA_MB, MAX_INSPECT_S = 1.3, 50, 0.5
MAKE = """
import sys, torch
layers, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
weights = {f"layers.{i}.weight": torch.randn(4096, 4096) for i in range(layers)}
torch.save(weights, out + "/weights.pt")
state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
         for i, w in enumerate(weights.values())}
optimizer = {"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(state)}]}
torch.save({"model": weights, "optimizer": optimizer, "epoch": 3}, out + "/train.pt")
"""


def files(args) -> Path:
    folder = Path(args.workdir) / f"training-s{args.scale:g}"
    if not (folder / "train.pt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        layers = max(1, round(16 * args.scale))
        subprocess.run([harness.PYTHON, "-c", MAKE, str(layers), str(folder)], check=True)
    return folder


def main() -> int:
    args = harness.arg_parser(__doc__).parse_args()
    folder = files(args)
    train, weights = folder / "train.pt", folder / "weights.pt"
    try:
        convert = {"ours": [harness.CKPT, "convert", str(train), str(folder / "from-train.safetensors"), "--force",
                            "--format", "json"],
                   "baseline": [harness.CKPT, "convert", str(weights), str(folder / "from-weights.safetensors"),
                                "--force", "--format", "json"]}
        pair = harness.measure_interleaved(convert, args)
        ours, baseline = pair["ours"], pair["baseline"]
        report = json.loads(ours.stdout)
        if not report["verified"] or report["tensors"] != json.loads(baseline.stdout)["tensors"]:
            raise SystemExit("the training checkpoint's conversion is not the weights, verified")
        harness.record(args, harness.result(
            "training", f"ckpt convert of a training .pt with Adam state ({os.path.getsize(train) / 1e9:.2f} GB; "
            f"weights {os.path.getsize(weights) / 1e9:.2f} GB), vs the weights alone",
            ours, baseline, baseline_name="ckpt convert of a .pt holding the same weights alone",
            args=args, max_ratio=MAX_RATIO, max_extra_anon_mb=MAX_EXTRA_MB, size_bytes=os.path.getsize(train),
            notes=f"{report['tensors']} tensors written, verified; the optimizer moments are never read"))
        listing = harness.measure([harness.CKPT, "inspect", str(train), "--format", "json"], args)
        harness.record(args, harness.result(
            "training", f"ckpt inspect of the same training .pt ({os.path.getsize(train) / 1e9:.2f} GB)",
            listing, baseline=None, args=args, max_seconds=MAX_INSPECT_S, size_bytes=os.path.getsize(train),
            notes=f"RssAnon {listing.peak_anon_mb:.0f} MB (target < 50 MB)",
            ok=listing.wall_s < MAX_INSPECT_S and listing.peak_anon_mb < 50))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

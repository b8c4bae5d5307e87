"""`ckpt inspect` speed and memory against the baselines of issue 2.

1. The OpenFlamingo-3B layout `.pt` (4.19 GB at --scale 1): `ckpt inspect FILE --format json`
   within 1.3x the wall time of `python -c "import torch"` and within +100 MB of its peak RssAnon.
   For reference, the way people look inside today: `torch.load` of the whole file (one run).
2. The OpenFlamingo-9B layout `.safetensors` (5.54 GB at --scale 1): `ckpt inspect` under 0.5 s
   and without importing torch (checked in sys.modules after the command ran).
3. `ckpt --help`: well under a second (target 0.5 s), no heavy import.

Example:
    .venv/bin/python scripts/bench/bench_inspect.py --scale 0.01 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os

import harness

MAX_RATIO = 1.3
MAX_EXTRA_ANON_MB = 100
MAX_SAFETENSORS_S = 0.5
MAX_HELP_S = 0.5
# Commands and their baselines run alternately (A B A B ...) so both see the same machine load.
NAIVE_LOAD = "import sys, torch; state = torch.load(sys.argv[1], weights_only=True); print(len(state))"


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def check_report(stats: harness.Stats, expected_keys: int) -> str:
    """The JSON really describes the file: the right number of tensors and consistent totals."""
    report = json.loads(stats.stdout)
    tensors = report["tensors"]
    if len(tensors) != expected_keys:
        raise SystemExit(f"ckpt inspect listed {len(tensors)} tensors, expected {expected_keys}")
    if sum(t["nbytes"] for t in tensors.values()) != report["total_bytes"]:
        raise SystemExit("ckpt inspect: total_bytes is not the sum of the tensors' nbytes")
    return f"{len(tensors)} tensors, {report['total_params']:,} params"


def bench_pt(args: argparse.Namespace) -> None:
    path = harness.checkpoint(args, "3b", "pt")
    size = os.path.getsize(path)
    pair = harness.measure_interleaved(
        {"ours": [harness.CKPT, "inspect", str(path), "--format", "json"], "baseline": harness.IMPORT_TORCH}, args)
    ours, baseline = pair["ours"], pair["baseline"]
    listed = check_report(ours, 334)
    series = {"ckpt inspect": ours, "import torch": baseline}
    naive = None
    if args.naive:
        # The file was just written or read, so this single run is warm-cache too.
        naive = harness.measure([harness.PYTHON, "-c", NAIVE_LOAD, str(path)], args, runs=1, warmup=False)
        series["torch.load (whole file)"] = naive
    plot = harness.plot_memory(series, args, "inspect-pt-memory.png",
                               f"OpenFlamingo-3B layout .pt ({human(size)}): memory over time")
    harness.record(args, harness.result(
        "inspect", f"ckpt inspect, OpenFlamingo-3B layout .pt ({human(size)})", ours, baseline,
        baseline_name='python -c "import torch"', args=args, max_ratio=MAX_RATIO,
        max_extra_anon_mb=MAX_EXTRA_ANON_MB, size_bytes=size, plot=plot, notes=listed))
    if naive:
        harness.record(args, harness.result(
            "inspect", f"reference: torch.load of the whole 3B .pt ({human(size)}), what inspect replaces",
            naive, baseline, baseline_name='python -c "import torch"', args=args, size_bytes=size,
            plot=plot, notes="one run; informational, no target"))


def bench_safetensors(args: argparse.Namespace) -> None:
    path = harness.checkpoint(args, "9b", "safetensors")
    size = os.path.getsize(path)
    command = ["inspect", str(path), "--format", "json"]
    heavy = harness.heavy_imports(command)
    pair = harness.measure_interleaved({"ours": [harness.CKPT, *command], "baseline": harness.PYTHON_START}, args)
    ours, baseline = pair["ours"], pair["baseline"]
    listed = check_report(ours, 158)
    imported = f"heavy modules imported: {', '.join(heavy) or 'none'}"
    harness.record(args, harness.result(
        "inspect", f"ckpt inspect, OpenFlamingo-9B layout .safetensors ({human(size)})", ours, baseline,
        baseline_name="python -c pass", args=args, max_seconds=MAX_SAFETENSORS_S, size_bytes=size,
        notes=f"{listed}; {imported}",
        ok=ours.wall_s < MAX_SAFETENSORS_S and "torch" not in heavy))


def bench_help(args: argparse.Namespace) -> None:
    heavy = harness.heavy_imports(["--help"])
    pair = harness.measure_interleaved({"ours": [harness.CKPT, "--help"], "baseline": harness.PYTHON_START}, args)
    ours, baseline = pair["ours"], pair["baseline"]
    harness.record(args, harness.result(
        "inspect", "ckpt --help", ours, baseline, baseline_name="python -c pass", args=args,
        max_seconds=MAX_HELP_S, notes=f"heavy modules imported: {', '.join(heavy) or 'none'}",
        ok=ours.wall_s < MAX_HELP_S and not heavy))


def main() -> int:
    parser = harness.arg_parser(__doc__)
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.load of the whole .pt once (needs its size in RAM)")
    parser.add_argument("--only", choices=("pt", "safetensors", "help"), action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    parts = {"help": bench_help, "pt": bench_pt, "safetensors": bench_safetensors}
    try:
        for name, bench in parts.items():
            if not args.only or name in args.only:
                bench(args)
                harness.cleanup(args)  # one big file on disk at a time
    finally:
        harness.cleanup(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

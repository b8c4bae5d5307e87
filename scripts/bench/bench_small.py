"""`ckpt convert`, `ckpt remap` and `ckpt scan` on a small plain state dict, where no tensor is read.

The state dict of issue 12 (`{"a.weight": randn(10, 10), "a.bias": randn(10)}`, 10 KB as `.pt`)
saved as `.pt` and as `.safetensors`. Each command must finish in under 0.5 s without importing
torch (checked in sys.modules after the command ran), timed against `python -c "import torch"`
run alternately in the same script (A B A B ...), which is what the commands took while they
imported torch. Each command's JSON is checked: conversions and remaps verified, scans safe.

Example:
    .venv/bin/python scripts/bench/bench_small.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import harness

MAX_SECONDS = 0.5
MAKE_SMALL = """
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
state = {"a.weight": torch.randn(10, 10), "a.bias": torch.randn(10)}
torch.save(state, sys.argv[1])
save_file(state, sys.argv[2])
"""


def small_files(args: argparse.Namespace) -> dict[str, Path]:
    folder = Path(args.workdir) / "small"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"pt": folder / "small.pt", "safetensors": folder / "small.safetensors"}
    subprocess.run([harness.PYTHON, "-c", MAKE_SMALL, str(files["pt"]), str(files["safetensors"])], check=True)
    return files


def commands(src: Path, fmt: str) -> dict[str, list[str]]:
    out = src.parent / "out"
    return {
        "convert": ["convert", str(src), str(out / f"converted-from-{fmt}.safetensors"), "--force"],
        "remap": ["remap", str(src), str(out / f"remapped.{fmt}"), "--strip-prefix", "a.", "--force"],
        "scan": ["scan", str(src)],
    }


def check(name: str, stats: harness.Stats) -> str:
    """The command did its job: a verified output, or a scan's verdict."""
    report = json.loads(stats.stdout)
    if name == "scan":
        if report["verdict"] != "safe":
            raise SystemExit(f"ckpt scan: verdict {report['verdict']}")
        return f"verdict {report['verdict']}, {len(report['globals'])} globals"
    if report["verified"] is not True:
        raise SystemExit(f"ckpt {name}: the output was not verified")
    return f"{report['tensors']} tensors, {report['bytes_written']:,} bytes written, verified"


def bench_one(args: argparse.Namespace, name: str, fmt: str, src: Path, command: list[str]) -> None:
    command = [*command, "--format", "json"]
    heavy = harness.heavy_imports(command)
    pair = harness.measure_interleaved({"ours": [harness.CKPT, *command], "baseline": harness.IMPORT_TORCH}, args)
    ours, baseline = pair["ours"], pair["baseline"]
    done = check(name, ours)
    harness.record(args, harness.result(
        "small", f"ckpt {name}, small plain state dict .{fmt} ({os.path.getsize(src):,} B)", ours, baseline,
        baseline_name='python -c "import torch"', args=args, max_seconds=MAX_SECONDS,
        size_bytes=os.path.getsize(src),
        notes=f"{done}; heavy modules imported: {', '.join(heavy) or 'none'}",
        ok=ours.wall_s < MAX_SECONDS and "torch" not in heavy))


def main() -> int:
    parser = harness.arg_parser(__doc__)
    args = parser.parse_args()
    files = small_files(args)
    (files["pt"].parent / "out").mkdir(exist_ok=True)
    try:
        for fmt, src in files.items():
            for name, command in commands(src, fmt).items():
                bench_one(args, name, fmt, src, command)
    finally:
        if not args.keep:
            shutil.rmtree(files["pt"].parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

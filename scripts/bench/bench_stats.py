"""Value statistics and value diffs: speed and memory against reading the files (issue 19).

1. Statistics of every tensor of the OpenFlamingo-3B layout `.pt` (4.19 GB at --scale 1) within
   1.5x the time of `cat FILE > /dev/null` (warm cache, same run) and under 300 MB of RssAnon above
   `python -c "import torch"`.
2. The default health check of a load (no NaN/Inf: one summing pass per tensor) over the same file,
   against the same `cat` (informational: no target of its own).
3. A value diff between two such files (the second has every tensor changed by 1e-3 except the
   input embedding, as a fine-tune with a frozen embedding would) within 2x the time of
   `cat A B > /dev/null`, same memory bound.

The library is driven directly (``python -c``, this checkout's ``ckpt_tools`` first on the path)
until the CLI has ``inspect --stats`` and ``diff --values``. Each driver checks what it computed
(tensor count, no NaN, which tensors are identical), so a fast wrong answer fails the bench.
``--size 1GB`` picks the scale that gives a file of about that size (instead of ``--scale``).
Timings are medians of ``--runs`` (default 3), the commands alternating run by run.

Example:
    .venv/bin/python scripts/bench/bench_stats.py --size 1GB
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import harness
from gen_openflamingo import layout_specs, nbytes

MAX_STATS_RATIO = 1.5
MAX_DIFF_RATIO = 2.0
MAX_EXTRA_ANON_MB = 300
EMBEDDING = "lang_encoder.transformer.wte.weight"  # kept identical in the second file
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

STATS_DRIVER = """
import json, sys
from ckpt_tools import open_checkpoint
from ckpt_tools.stats import checkpoint_stats
with open_checkpoint(sys.argv[1]) as ckpt:
    report = checkpoint_stats(ckpt)
print(json.dumps({"tensors": len(report.tensors), "nonfinite": report.nonfinite, "chunks":
                  sum(t.chunks for t in report.tensors.values()), "modules": len(report.modules())}))
"""

FINITE_DRIVER = """
import json, sys
from ckpt_tools import open_checkpoint
from ckpt_tools.stats import FINITE, run_checks
with open_checkpoint(sys.argv[1]) as ckpt:
    problems = run_checks(ckpt, [FINITE])
print(json.dumps({"tensors": len(ckpt.keys()), "problems": problems}))
"""

DIFF_DRIVER = """
import json, sys
from ckpt_tools import open_checkpoint
from ckpt_tools.stats import value_diff
with open_checkpoint(sys.argv[1]) as a, open_checkpoint(sys.argv[2]) as b:
    report = value_diff(a, b)
print(json.dumps({"compared": len(report.tensors),
                  "identical": [n for n, t in report.tensors.items() if t.identical],
                  "max_change": max(t.acc.relative_change for t in report.tensors.values())}))
"""

# Writes B = A + 1e-3 (the embedding kept) the way gen_openflamingo.py writes A: tensors streamed
# into a raw file one at a time, then saved from memory-mapped views, so memory stays near one tensor.
VARIANT_WRITER = """
import os, sys
import numpy as np, torch
src, dst, keep = sys.argv[1], sys.argv[2], sys.argv[3]
state = torch.load(src, mmap=True, weights_only=True)
raw, tmp = dst + ".raw", dst + f".{os.getpid()}.tmp"
spans, position = {}, 0
with open(raw, "wb") as f:
    for name, tensor in state.items():
        out = tensor if name == keep or not tensor.is_floating_point() else tensor + 1e-3
        data = out.contiguous().view(torch.uint8).numpy()
        f.write(memoryview(data).cast("B"))
        spans[name] = (position, data.size, out.dtype, tuple(out.shape))
        position += data.size
        del out, data
views = {}
for name, (begin, size, dtype, shape) in spans.items():
    array = np.memmap(raw, dtype=np.uint8, mode="c", offset=begin, shape=(size,)) if size else np.empty(0, np.uint8)
    views[name] = torch.from_numpy(array).view(dtype).reshape(shape)
torch.save(views, tmp)
os.replace(tmp, dst)
os.unlink(raw)
"""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"a size such as 1GB, 500MB or 2GiB, not {text!r}")
    return int(float(match[1]) * UNITS[match[2].upper()])


def scale_for(size: int, layout: str = "3b") -> float:
    """The --scale that makes the layout's file about ``size`` bytes (shapes scale their first dimension)."""
    full = sum(nbytes(shape, dtype) for shape, dtype in layout_specs(layout, 1.0).values())
    return round(size / full, 4)


def variant(args: argparse.Namespace, source: Path) -> Path:
    """The second file for the value diff, next to ``source``; reused when already there."""
    path = source.with_name(source.stem + "-changed.pt")
    if not path.exists():
        print(f"generating: {path}", flush=True)
        subprocess.run([harness.PYTHON, "-c", VARIANT_WRITER, str(source), str(path), EMBEDDING], check=True)
        harness._generated.append(path)  # deleted by harness.cleanup with the file it came from
    return path


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def plot(series: dict, args: argparse.Namespace, name: str, title: str) -> str | None:
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra is optional
        return None
    return harness.plot_memory(series, args, name, title)


def compare(args: argparse.Namespace, operation: str, ours: list[str], baseline: list[str], baseline_name: str,
            max_ratio: float | None, size: int, check) -> dict:
    """Time ``ours`` against ``baseline`` and import torch (alternating); record the ratio and memory."""
    stats = harness.measure_interleaved({"ours": ours, "baseline": baseline, "import torch": harness.IMPORT_TORCH},
                                        args)
    mine, base, floor = stats["ours"], stats["baseline"], stats["import torch"]
    detail = check(json.loads(mine.stdout))
    extra = mine.peak_anon_mb - floor.peak_anon_mb
    ratio = mine.wall_s / base.wall_s
    work_ratio = (mine.wall_s - floor.wall_s) / base.wall_s
    entry = harness.result(
        "stats", operation, mine, base, baseline_name=baseline_name, args=args, size_bytes=size,
        plot=plot({"ours": mine, baseline_name: base, "import torch": floor}, args,
                  f"stats-{operation.split()[0].lower().replace('/', '')}-memory.png", operation),
        notes=(f"{detail}; without the {floor.wall_s:.2f} s of import torch: {work_ratio:.2f}x; "
               f"RssAnon {extra:.0f} MB above import torch ({floor.peak_anon_mb:.0f} MB)"),
        ok=extra <= MAX_EXTRA_ANON_MB and (max_ratio is None or ratio <= max_ratio))
    entry.update(target=None if max_ratio is None else f"ratio <= {max_ratio:g}",
                 memory_target=f"RssAnon <= import torch + {MAX_EXTRA_ANON_MB} MB",
                 import_torch_s=round(floor.wall_s, 4), import_torch_peak_anon_mb=round(floor.peak_anon_mb, 1),
                 extra_anon_mb=round(extra, 1), ratio_without_import=round(work_ratio, 3))
    return harness.record(args, entry)


def read_all(*paths: Path) -> tuple[list[str], str]:
    """The baseline: reading the files once with cat (the command, and how the table names it)."""
    names = " ".join(f'"${i}"' for i in range(1, len(paths) + 1))
    shown = "cat FILE > /dev/null" if len(paths) == 1 else "cat A B > /dev/null"
    return ["sh", "-c", f"cat {names} > /dev/null", "sh", *map(str, paths)], shown


def bench_stats(args: argparse.Namespace, path: Path, expected: int) -> None:
    size = os.path.getsize(path)

    def check(out: dict) -> str:
        if out["tensors"] != expected or out["nonfinite"]:
            raise SystemExit(f"stats: {out['tensors']} tensors (expected {expected}), nonfinite {out['nonfinite']}")
        return f"{out['tensors']} tensors, {out['chunks']} chunks, {out['modules']} modules"

    compare(args, f"stats of every tensor, OpenFlamingo-3B layout .pt ({human(size)})",
            [harness.PYTHON, "-c", STATS_DRIVER, str(path)],
            *read_all(path), MAX_STATS_RATIO, size, check)


def bench_finite(args: argparse.Namespace, path: Path, expected: int) -> None:
    size = os.path.getsize(path)

    def check(out: dict) -> str:
        if out["tensors"] != expected or out["problems"]:
            raise SystemExit(f"finite check: {out['tensors']} tensors (expected {expected}), {out['problems'][:3]}")
        return f"{out['tensors']} tensors scanned, no NaN/Inf"

    compare(args, f"NaN/Inf check of every tensor, OpenFlamingo-3B layout .pt ({human(size)})",
            [harness.PYTHON, "-c", FINITE_DRIVER, str(path)],
            *read_all(path), None, size, check)


def bench_diff(args: argparse.Namespace, path: Path, expected: int) -> None:
    other = variant(args, path)
    size = os.path.getsize(path) + os.path.getsize(other)

    def check(out: dict) -> str:
        if out["compared"] != expected or out["identical"] != [EMBEDDING]:
            raise SystemExit(f"value diff: compared {out['compared']} (expected {expected}), "
                             f"identical {out['identical']} (expected only {EMBEDDING})")
        return f"{out['compared']} tensor pairs, 1 identical, largest relative change {out['max_change']:.2e}"

    compare(args, f"value diff of two OpenFlamingo-3B layout .pt ({human(size)} together)",
            [harness.PYTHON, "-c", DIFF_DRIVER, str(other), str(path)],
            *read_all(path, other), MAX_DIFF_RATIO, size, check)


def main() -> int:
    parser = harness.arg_parser(__doc__)
    parser.set_defaults(runs=3)
    parser.add_argument("--size", type=parse_size, help="file size to generate, e.g. 1GB (overrides --scale)")
    parser.add_argument("--only", choices=("stats", "finite", "diff"), action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args()
    if args.size:
        args.scale = scale_for(args.size)
    # The drivers import this checkout's ckpt_tools, not whichever copy is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH")]))
    expected = len(layout_specs("3b", args.scale))
    try:
        path = harness.checkpoint(args, "3b", "pt")
        if not args.only or "stats" in args.only:
            bench_stats(args, path, expected)
        if not args.only or "finite" in args.only:
            bench_finite(args, path, expected)
        if not args.only or "diff" in args.only:
            bench_diff(args, path, expected)
    finally:
        harness.cleanup(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

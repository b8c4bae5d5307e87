"""`ckpt convert` speed and memory against the baselines of issue 3.

On the OpenFlamingo-3B layout `.pt` as a DDP training wrapper (`{"model_state_dict": {"module.…"}}`,
4.19 GB at --scale 1):

1. `ckpt convert FILE OUT.safetensors --preset ddp --no-verify` within 1.3x the wall time of
   `cp FILE` (same file, same folder, warm cache), and with peak RssAnon within +150 MB of
   `python -c "import torch"`. Also shown against `cp FILE X && sync X`: ours fsyncs its output
   before the rename (so a crash never leaves a half-written file under the final name), which
   plain `cp` does not.
2. Beside it, the plain way (one run): `torch.load` + `safetensors.torch.save_file`, and our
   conversion with verification on (one run, informational).
3. A PNG of memory over time for ours, the plain way and `import torch`.

The outputs are checked (tensor count, and every tensor's bytes for the small sizes) and deleted.

Example:
    .venv/bin/python scripts/bench/bench_convert.py --scale 0.01 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import harness

MAX_RATIO = 1.3
MAX_EXTRA_ANON_MB = 150
KEYS_3B = 334
PLAIN_WAY = (
    "import sys, torch\n"
    "from safetensors.torch import save_file\n"
    "state = torch.load(sys.argv[1], weights_only=True)['model_state_dict']\n"
    "save_file({k.removeprefix('module.'): v.contiguous() for k, v in state.items()}, sys.argv[2],"
    " metadata={'format': 'pt'})\n"
)
CHECK_OUTPUT = (
    "import sys, torch\n"
    "from safetensors import safe_open\n"
    "state = torch.load(sys.argv[1], weights_only=True, mmap=True)['model_state_dict']\n"
    "with safe_open(sys.argv[2], 'pt') as f:\n"
    "    assert sorted(f.keys()) == sorted(k.removeprefix('module.') for k in state), 'keys differ'\n"
    "    if sys.argv[3] == 'full':\n"
    "        for k in f.keys():\n"
    "            assert torch.equal(f.get_tensor(k), state['module.' + k]), k\n"
    "print(len(state))\n"
)


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def check(src: Path, out: Path, full: bool) -> str:
    import subprocess

    proc = subprocess.run([harness.PYTHON, "-c", CHECK_OUTPUT, str(src), str(out), "full" if full else "keys"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"output check failed: {proc.stderr[-2000:]}")
    count = int(proc.stdout.strip())
    if count != KEYS_3B:
        raise SystemExit(f"expected {KEYS_3B} tensors, the source holds {count}")
    return f"{count} tensors{', every tensor compared with the source' if full else ''}"


def baseline_cp_sync(src: Path, args: argparse.Namespace) -> harness.Stats:
    """``cp`` then ``sync FILE``: the copy made durable, as ours is (it fsyncs before the rename)."""
    dst = Path(args.workdir) / f"cp-sync-baseline-{os.getpid()}.pt"
    try:
        return harness.measure(["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(dst)], args)
    finally:
        dst.unlink(missing_ok=True)


def bench(args: argparse.Namespace) -> None:
    src = harness.checkpoint(args, "3b", "pt", "ddp")
    size = os.path.getsize(src)
    out = Path(args.workdir) / f"convert-out-{os.getpid()}.safetensors"
    plain_out = Path(args.workdir) / f"convert-plain-{os.getpid()}.safetensors"
    try:
        torch_floor = harness.baseline_import_torch(args)
        cp = harness.baseline_cp(src, args)
        cp_sync = baseline_cp_sync(src, args)
        ours = harness.measure([harness.CKPT, "convert", str(src), str(out), "--preset", "ddp", "--no-verify",
                                "--force", "--format", "json"], args)
        report = json.loads(ours.stdout)
        checked = check(src, out, full=size < 2e8)
        out.unlink(missing_ok=True)
        verified = harness.measure([harness.CKPT, "convert", str(src), str(out), "--preset", "ddp",
                                    "--format", "json"], args, runs=1, warmup=False)
        out.unlink(missing_ok=True)
        plain = harness.measure([harness.PYTHON, "-c", PLAIN_WAY, str(src), str(plain_out)], args,
                                runs=1, warmup=False)
        plain_out.unlink(missing_ok=True)
    finally:
        out.unlink(missing_ok=True)
        plain_out.unlink(missing_ok=True)
    plot = harness.plot_memory({"ckpt convert --no-verify": ours, "torch.load + save_file": plain,
                                "import torch": torch_floor}, args, "convert-pt-memory.png",
                               f"Converting the OpenFlamingo-3B layout .pt ({human(size)}): memory over time")
    label = f"OpenFlamingo-3B layout DDP .pt ({human(size)})"
    notes = f"{checked}; {report['bytes_written']} bytes written; RssAnon floor = import torch"
    harness.record(args, harness.result(
        "convert", f"ckpt convert --no-verify, {label}, vs cp", ours, cp, args=args, max_ratio=MAX_RATIO,
        size_bytes=size, plot=plot, notes=notes))
    harness.record(args, harness.result(
        "convert", f"ckpt convert --no-verify, {label}, vs cp + sync", ours, cp_sync, args=args,
        size_bytes=size, plot=plot, notes="the durable copy: ours fsyncs the output before renaming it"))
    harness.record(args, harness.result(
        "convert", f"ckpt convert --no-verify, {label}: memory vs import torch", ours, torch_floor,
        baseline_name='python -c "import torch"', args=args, max_extra_anon_mb=MAX_EXTRA_ANON_MB,
        size_bytes=size, plot=plot, notes="the time ratio here is against importing torch; see the cp row"))
    harness.record(args, harness.result(
        "convert", f"ckpt convert (verified), {label}, vs cp", verified, cp, args=args, size_bytes=size,
        plot=plot, notes="one run; informational: writes, then re-reads both files to compare every tensor"))
    harness.record(args, harness.result(
        "convert", f"reference: torch.load + save_file, {label}, vs cp", plain, cp, args=args, size_bytes=size,
        plot=plot, notes="one run; the plain way, informational"))


if __name__ == "__main__":
    harness.run(bench, __doc__)

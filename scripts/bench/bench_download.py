"""`ckpt download` and remote inspection against a `ckpt serve` mirror on loopback (issue 6).

1. Throughput: `ckpt download` of a 1 GiB file (x --scale) within 1.2x the wall time of
   `curl URL | sha256sum` against the same server (medians). For reference, also
   `curl URL -o /dev/null` (transfer only), `curl URL | openssl dgst -sha256` and
   `curl URL | tee FILE | sha256sum` (which also writes the file, as a download must).
2. Resume: the download is killed with SIGKILL at about 50%, then run again. Bytes the server sent in
   total must be at most 1.02x the file size; huggingface_hub's `hf_hub_download` in the same
   scenario beside it (it restarts from zero).
3. Remote inspect of the OpenFlamingo-3B layout `.pt` (4.19 GB at --scale 1): bytes fetched (under
   1% of the file) and wall time, beside `ckpt inspect` of the same file on local disk.

Example:
    .venv/bin/python scripts/bench/bench_download.py --scale 0.1 --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.REPO))
from ckpt_tools.server import HubServer, publish  # noqa: E402

MAX_RATIO = 1.2
MAX_RESUME_BYTES = 1.02
MAX_REMOTE_FRACTION = 0.01
REPO_ID = "bench/download"
FILENAME = "big.bin"
HF_DOWNLOAD = ("import sys; from huggingface_hub import hf_hub_download; "
               "print(hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3]))")


def make_file(path: Path, size: int) -> str:
    """Random bytes (incompressible), written once and reused; returns the sha256."""
    digest = hashlib.sha256()
    if path.exists() and path.stat().st_size == size:
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class ServeProcess:
    """`ckpt serve` in its own process, so its CPU never counts in a measured command."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([harness.CKPT, "serve", str(root), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        self.endpoint = line.split(" at ")[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def bench_throughput(args, endpoint: str, commit: str, sha: str, size: int) -> None:
    url = f"{endpoint}/{REPO_ID}/resolve/{commit}/{FILENAME}"
    curl = f"set -o pipefail; curl -sS {url} | sha256sum"
    baseline = harness.measure(["bash", "-c", curl], args)
    got = baseline.stdout.split()[0].decode()
    if got != sha:
        raise SystemExit(f"curl | sha256sum gave {got}, expected {sha}")
    transfer_only = harness.measure(["curl", "-sS", url, "-o", "/dev/null"], args)
    openssl = harness.measure(["bash", "-c", f"set -o pipefail; curl -sS {url} | openssl dgst -sha256"], args)
    copy = Path(args.workdir) / "download-tee.bin"
    tee = harness.measure(["bash", "-c", f"set -o pipefail; curl -sS {url} | tee {copy} | sha256sum"], args)
    copy.unlink(missing_ok=True)

    cache = Path(args.workdir) / "download-cache"
    cmd = [harness.CKPT, "download", REPO_ID, FILENAME, "--revision", commit, "--endpoint", endpoint,
           "--cache-dir", str(cache), "--format", "json"]
    runs = []
    for i in range(args.runs + 1):  # the first one is the warm-up
        shutil.rmtree(cache, ignore_errors=True)
        run = harness.run_once(cmd)
        if run.returncode != 0:
            raise SystemExit(f"ckpt download failed: {run.stderr.decode()[-2000:]}")
        if json.loads(run.stdout)["files"][0]["sha256"] != sha:
            raise SystemExit("ckpt download reported a wrong sha256")
        if i:
            runs.append(run)
    shutil.rmtree(cache, ignore_errors=True)
    ours = harness.Stats(cmd, runs, "warm")
    print(ours.summary(), flush=True)
    notes = (f"{size / 1e6:.0f} MB; reference: curl -o /dev/null {transfer_only.wall_s:.2f} s, "
             f"curl | openssl dgst -sha256 {openssl.wall_s:.2f} s "
             f"(ours / openssl pipe = {ours.wall_s / openssl.wall_s:.2f}), curl | tee FILE | sha256sum "
             f"{tee.wall_s:.2f} s (ours / tee pipe = {ours.wall_s / tee.wall_s:.2f}); ckpt download also writes "
             f"the file into the cache, the first two pipes write nothing")
    harness.record(args, harness.result("download", f"ckpt download {size / 1e6:.0f} MB (loopback)", ours,
                                        baseline, baseline_name="curl URL | sha256sum", args=args,
                                        max_ratio=MAX_RATIO, size_bytes=size, notes=notes))


def _kill_at_half(cmd: list[str], env: dict, partial_glob: Path, size: int) -> tuple[float, int]:
    """Start ``cmd``, SIGKILL it once its partial file(s) hold half the file; (seconds, bytes on disk)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    on_disk = 0
    while child.poll() is None:
        on_disk = sum(p.stat().st_size for p in partial_glob.parent.glob(partial_glob.name) if p.exists())
        if on_disk >= size // 2:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    child.wait()
    if child.returncode != -signal.SIGKILL:
        raise SystemExit(f"the download finished (or failed, rc {child.returncode}) before it reached 50%")
    return time.perf_counter() - start, on_disk


def _resume_scenario(server: HubServer, cache: Path, size: int, first: list[str], again: list[str],
                     partial_glob: Path, env: dict) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    time.sleep(0.2)
    sent_before = server.stats.bytes_sent
    killed_s, killed_at = _kill_at_half(first, env, partial_glob, size)
    time.sleep(0.3)  # let the server see the dead connection
    run = harness.run_once(again, env=env)
    if run.returncode != 0:
        raise SystemExit(f"resume run failed: {run.stderr.decode()[-2000:]}")
    sent = server.stats.bytes_sent - sent_before
    shutil.rmtree(cache, ignore_errors=True)
    return {"killed_at": killed_at, "bytes_sent": sent, "ratio": sent / size, "wall_s": killed_s + run.wall_s,
            "run": run}


def bench_resume(args, root: Path, commit: str, size: int) -> None:
    cache = Path(args.workdir) / "resume-cache"
    blobs = cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"
    with HubServer(root) as server:  # in-process: its byte counter is the ground truth
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        ours_cmd = [harness.CKPT, "download", REPO_ID, FILENAME, "--revision", commit, "--cache-dir", str(cache),
                    "--format", "json"]
        ours = _resume_scenario(server, cache, size, ours_cmd, ours_cmd, blobs / "*.incomplete", env)
        report = json.loads(ours["run"].stdout)["files"][0]
        hf_cmd = [harness.PYTHON, "-c", HF_DOWNLOAD, REPO_ID, FILENAME, str(cache)]
        hf = _resume_scenario(server, cache, size, hf_cmd, hf_cmd, blobs / "*.incomplete", env)
    stats = {name: harness.Stats(cmd, [r["run"]], "warm") for name, r, cmd in
             [("ours", ours, ours_cmd), ("hf", hf, hf_cmd)]}
    for stat, r in ((stats["ours"], ours), (stats["hf"], hf)):
        stat.runs[0].wall_s = r["wall_s"]
    notes = (f"killed at {ours['killed_at'] / size:.0%} ({ours['killed_at']:,} B on disk); ckpt download: "
             f"server sent {ours['bytes_sent']:,} B = {ours['ratio']:.3f}x the file (second run resumed_from "
             f"{report['resumed_from']:,}, transferred {report['bytes_transferred']:,}); hf_hub_download killed at "
             f"{hf['killed_at'] / size:.0%}: server sent {hf['bytes_sent']:,} B = {hf['ratio']:.3f}x (restarts "
             f"from zero); wall times are both runs together")
    entry = harness.result("download", f"resume after kill -9 at ~50% ({size / 1e6:.0f} MB)", stats["ours"],
                           stats["hf"], baseline_name="hf_hub_download (same scenario)", args=args,
                           size_bytes=size, notes=notes, ok=ours["ratio"] <= MAX_RESUME_BYTES)
    entry["target"] = f"bytes sent <= {MAX_RESUME_BYTES}x file size"
    entry["ours_bytes_ratio"], entry["baseline_bytes_ratio"] = round(ours["ratio"], 4), round(hf["ratio"], 4)
    harness.record(args, entry)


def bench_remote_inspect(args, root: Path, endpoint: str) -> None:
    path = harness.checkpoint(args, "3b", "pt")
    size = path.stat().st_size
    publish(root, "bench/openflamingo-3b", {"checkpoint.pt": path}, link=True)
    ref = "hf://bench/openflamingo-3b/checkpoint.pt"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    ours = harness.measure([harness.CKPT, "inspect", ref, "--format", "json"], args, env=env)
    local = harness.measure([harness.CKPT, "inspect", str(path), "--format", "json"], args)
    report = json.loads(ours.stdout)
    fetched = report["bytes_read"]
    if len(report["tensors"]) != len(json.loads(local.stdout)["tensors"]):
        raise SystemExit("remote and local inspect disagree on the tensors")
    notes = (f"fetched {fetched:,} B of {size:,} ({fetched / size:.4%}); {len(report['tensors'])} tensors; "
             f"baseline: ckpt inspect of the same file on local disk")
    entry = harness.result("download", f"remote inspect hf:// .pt ({size / 1e9:.2f} GB, 3B layout)", ours, local,
                           baseline_name="ckpt inspect LOCAL_FILE", args=args, size_bytes=size, notes=notes,
                           ok=fetched < MAX_REMOTE_FRACTION * size)
    entry["target"] = f"bytes fetched < {MAX_REMOTE_FRACTION:.0%} of the file"
    entry["bytes_fetched"] = fetched
    harness.record(args, entry)


def main() -> None:
    parser = harness.arg_parser(__doc__)
    parser.add_argument("--size-mb", type=float, default=None, help="download size in MiB (default 1024 x --scale)")
    parser.add_argument("--skip", action="append", default=[], choices=["throughput", "resume", "remote"])
    args: argparse.Namespace = parser.parse_args()
    size = int((args.size_mb if args.size_mb is not None else 1024 * args.scale) * 2**20)
    work = Path(args.workdir)
    source = work / f"download-{size}.bin"
    root = work / "hub-mirror"
    shutil.rmtree(root, ignore_errors=True)
    try:
        sha = make_file(source, size)
        commit = publish(root, REPO_ID, {FILENAME: source}, link=True)
        serve = ServeProcess(root)
        try:
            if "throughput" not in args.skip:
                bench_throughput(args, serve.endpoint, commit, sha, size)
            if "resume" not in args.skip:
                bench_resume(args, root, commit, size)
            if "remote" not in args.skip:
                bench_remote_inspect(args, root, serve.endpoint)
        finally:
            serve.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.keep:
            source.unlink(missing_ok=True)
        harness.cleanup(args)


if __name__ == "__main__":
    main()

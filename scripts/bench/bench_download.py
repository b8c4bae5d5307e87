"""`ckpt download` and remote inspection against a `ckpt serve` mirror on loopback (issues 6, 16).

1. Throughput: `ckpt download` of a 1 GiB file (x --scale) within 1.2x the wall time of
   `curl URL | sha256sum` against the same server (medians). For reference, also
   `curl URL -o /dev/null` (transfer only), `curl URL | openssl dgst -sha256` and
   `curl URL | tee FILE | sha256sum` (which also writes the file, as a download must). Without a
   rate limit, the ranged download (8 connections, the default) within 1.1x the time of one stream
   (`--connections 1`), runs alternating.
2. Ranges: the server started with `ckpt serve --rate-limit 20MB/s` (each connection capped, as a
   CDN does): `ckpt download` over 8 connections at least 6x faster than `--connections 1` and than
   `hf_hub_download` through the same server (medians, runs alternating), anonymous memory < 100 MB.
3. Resume: the download is killed with SIGKILL at about 50%, then run again. Bytes the server sent in
   total must be at most 1.02x the file size; huggingface_hub's `hf_hub_download` in the same
   scenario beside it (it restarts from zero). Again with every connection capped at 20 MB/s.
4. Remote inspect of the OpenFlamingo-3B layout `.pt` (4.19 GB at --scale 1): bytes fetched (under
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
from ckpt_tools.fs import sha256_file  # noqa: E402
from ckpt_tools.server import HubServer, publish  # noqa: E402

MAX_RATIO = 1.2
MAX_UNLIMITED_RATIO = 1.1  # ranges against one stream, no rate limit
RATE_LIMIT = "20MB/s"
MIN_SPEEDUP = 6.0  # ranges against one stream and against hf_hub_download, 20 MB/s per connection
MAX_ANON_MB = 100
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

    def __init__(self, root: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([harness.CKPT, "serve", str(root), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        self.endpoint = line.split(" at ")[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def download_cmd(endpoint: str | None, commit: str, cache: Path, *extra: str) -> list[str]:
    where = ["--endpoint", endpoint] if endpoint else []
    return [harness.CKPT, "download", REPO_ID, FILENAME, "--revision", commit, *where, "--cache-dir", str(cache),
            "--format", "json", *extra]


def on_disk(blobs: Path) -> int:
    """Bytes downloaded so far: what a ranged partial file's record holds, else a partial file's size."""
    total = 0
    for partial in blobs.glob("*.incomplete"):
        record = partial.with_name(partial.name + ".ranges")
        try:
            if record.exists():
                total += sum(upto - start for start, _, upto in json.loads(record.read_text())["ranges"])
            else:
                total += partial.stat().st_size
        except (FileNotFoundError, ValueError):
            pass  # replaced or renamed while looking
    return total


def alternate(commands: dict[str, list[str]], args, sha: str, *, env: dict | None = None,
              warmup: bool = True) -> dict[str, harness.Stats]:
    """Each command ``args.runs`` times, alternating (A B A B ...) so both see the same load, each
    run into an empty cache (the last argument naming it is removed first); checks the sha256."""
    runs: dict[str, list[harness.Run]] = {label: [] for label in commands}
    for i in range(args.runs + int(warmup)):
        for label, cmd in commands.items():
            cache = Path(cmd[cmd.index("--cache-dir") + 1]) if "--cache-dir" in cmd else Path(cmd[-1])
            shutil.rmtree(cache, ignore_errors=True)
            run = harness.run_once(cmd, env=env)
            if run.returncode != 0:
                raise SystemExit(f"{label} failed: {run.stderr.decode()[-2000:]}")
            _check_sha(label, run, sha, first=i == 0)
            shutil.rmtree(cache, ignore_errors=True)
            if i or not warmup:
                runs[label].append(run)
    stats = {label: harness.Stats(cmd, runs[label], "warm") for label, cmd in commands.items()}
    for item in stats.values():
        print(item.summary(), flush=True)
    return stats


def _check_sha(label: str, run: harness.Run, sha: str, first: bool) -> None:
    out = run.stdout.decode().strip()
    if out.startswith("{"):
        got = json.loads(out)["files"][0]["sha256"]
    elif first:  # hf_hub_download prints the path; hash it once (it never hashes itself)
        got = sha256_file(out.splitlines()[-1])
    else:
        return
    if got != sha:
        raise SystemExit(f"{label} gave sha256 {got}, expected {sha}")


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

    work = Path(args.workdir)
    stats = alternate({"ranges": download_cmd(endpoint, commit, work / "download-cache"),
                       "one": download_cmd(endpoint, commit, work / "download-cache-1", "--connections", "1")},
                      args, sha)
    ours, one = stats["ranges"], stats["one"]
    report = json.loads(ours.stdout)["files"][0]
    notes = (f"{size / 1e6:.0f} MB; reference: curl -o /dev/null {transfer_only.wall_s:.2f} s, "
             f"curl | openssl dgst -sha256 {openssl.wall_s:.2f} s "
             f"(ours / openssl pipe = {ours.wall_s / openssl.wall_s:.2f}), curl | tee FILE | sha256sum "
             f"{tee.wall_s:.2f} s (ours / tee pipe = {ours.wall_s / tee.wall_s:.2f}); ckpt download also writes "
             f"the file into the cache, the first two pipes write nothing")
    harness.record(args, harness.result("download", f"ckpt download {size / 1e6:.0f} MB (loopback)", ours,
                                        baseline, baseline_name="curl URL | sha256sum", args=args,
                                        max_ratio=MAX_RATIO, size_bytes=size, notes=notes))
    notes = (f"{size / 1e6:.0f} MB, no rate limit, runs alternating; {report['ranges']} ranges over "
             f"{report['connections']} connections; {'; '.join(report['notes'])}; one stream: "
             f"{', '.join(f'{r.wall_s:.2f}' for r in one.runs)} s, ranges: "
             f"{', '.join(f'{r.wall_s:.2f}' for r in ours.runs)} s")
    harness.record(args, harness.result(
        "download", f"ckpt download {size / 1e6:.0f} MB, 8 connections vs one stream (loopback, no rate limit)",
        ours, one, baseline_name="ckpt download --connections 1", args=args, max_ratio=MAX_UNLIMITED_RATIO,
        size_bytes=size, notes=notes))


def bench_ranges(args, root: Path, commit: str, sha: str, size: int) -> None:
    """8 connections against one stream and against hf_hub_download, each connection capped."""
    work = Path(args.workdir)
    serve = ServeProcess(root, "--rate-limit", RATE_LIMIT)
    try:
        env = {**os.environ, "HF_ENDPOINT": serve.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        stats = alternate({
            "ranges": download_cmd(serve.endpoint, commit, work / "ranged-cache"),
            "one": download_cmd(serve.endpoint, commit, work / "ranged-cache-1", "--connections", "1"),
            "hf": [harness.PYTHON, "-c", HF_DOWNLOAD, REPO_ID, FILENAME, str(work / "ranged-cache-hf")],
        }, args, sha, env=env, warmup=False)  # bound by the link, not by a cold start
    finally:
        serve.stop()
    ours = stats["ranges"]
    report = json.loads(ours.stdout)["files"][0]
    for label, name in (("one", "ckpt download --connections 1"), ("hf", "hf_hub_download (same server)")):
        base = stats[label]
        notes = (f"{size / 1e6:.0f} MB, `ckpt serve --rate-limit {RATE_LIMIT}` (per connection), runs alternating; "
                 f"{report['ranges']} ranges over {report['connections']} connections: "
                 f"{size / ours.wall_s / 1e6:.0f} MB/s; {'; '.join(report['notes'])}; baseline "
                 f"{size / base.wall_s / 1e6:.1f} MB/s; speed-up {base.wall_s / ours.wall_s:.1f}x")
        entry = harness.result("download", f"ckpt download {size / 1e6:.0f} MB, 8 connections at {RATE_LIMIT} each, "
                               f"vs {name.split(' (')[0]}", ours, base, baseline_name=name, args=args,
                               max_ratio=round(1 / MIN_SPEEDUP, 3), size_bytes=size, notes=notes)
        entry["target"] = f"ratio <= {1 / MIN_SPEEDUP:.3f} (>= {MIN_SPEEDUP:g}x faster)"
        entry["memory_target"] = f"RssAnon < {MAX_ANON_MB} MB"
        entry["ok"] = bool(entry["ok"]) and ours.peak_anon_mb < MAX_ANON_MB
        harness.record(args, entry)


def _kill_at_half(cmd: list[str], env: dict, blobs: Path, size: int) -> tuple[float, int]:
    """Start ``cmd``, SIGKILL it once its partial file(s) hold half the file; (seconds, bytes on disk)."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    downloaded = 0
    while child.poll() is None:
        downloaded = on_disk(blobs)
        if downloaded >= size // 2:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    child.wait()
    if child.returncode != -signal.SIGKILL:
        raise SystemExit(f"the download finished (or failed, rc {child.returncode}) before it reached 50%")
    return time.perf_counter() - start, on_disk(blobs)  # what the record says once the child is gone


def _resume_scenario(server: HubServer, cache: Path, size: int, first: list[str], again: list[str],
                     blobs: Path, env: dict) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    time.sleep(0.2)
    sent_before = server.stats.bytes_sent
    killed_s, killed_at = _kill_at_half(first, env, blobs, size)
    time.sleep(0.3)  # let the server see the dead connection
    run = harness.run_once(again, env=env)
    if run.returncode != 0:
        raise SystemExit(f"resume run failed: {run.stderr.decode()[-2000:]}")
    sent = server.stats.bytes_sent - sent_before
    shutil.rmtree(cache, ignore_errors=True)
    return {"killed_at": killed_at, "bytes_sent": sent, "ratio": sent / size, "wall_s": killed_s + run.wall_s,
            "killed_s": killed_s, "rerun_s": run.wall_s,
            "run": run}


def bench_resume(args, root: Path, commit: str, size: int, rate_limit: str | None = None) -> None:
    cache = Path(args.workdir) / "resume-cache"
    blobs = cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"
    with HubServer(root, rate_limit=rate_limit) as server:  # in-process: its byte counter is the ground truth
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        ours_cmd = download_cmd(None, commit, cache)
        ours = _resume_scenario(server, cache, size, ours_cmd, ours_cmd, blobs, env)
        hf_cmd = [harness.PYTHON, "-c", HF_DOWNLOAD, REPO_ID, FILENAME, str(cache)]
        hf = None if rate_limit else _resume_scenario(server, cache, size, hf_cmd, hf_cmd, blobs, env)
    report = json.loads(ours["run"].stdout)["files"][0]
    stats = {name: harness.Stats(cmd, [r["run"]], "warm") for name, r, cmd in
             [("ours", ours, ours_cmd), ("hf", hf, hf_cmd)] if r is not None}
    for name, r in (("ours", ours), ("hf", hf)):
        if r is not None:
            stats[name].runs[0].wall_s = r["wall_s"]
    link = f"`--rate-limit {rate_limit}` per connection" if rate_limit else "no rate limit"
    notes = (f"{link}; killed at {ours['killed_at'] / size:.0%} ({ours['killed_at']:,} B recorded); ckpt download "
             f"({report['ranges']} ranges over {report['connections']} connections): server sent "
             f"{ours['bytes_sent']:,} B = {ours['ratio']:.3f}x the file (second run resumed_from "
             f"{report['resumed_from']:,}, transferred {report['bytes_transferred']:,}, "
             f"{ours['rerun_s']:.2f} s after {ours['killed_s']:.2f} s to the kill; {'; '.join(report['notes'])})")
    if hf is not None:
        notes += (f"; hf_hub_download killed at {hf['killed_at'] / size:.0%}: server sent {hf['bytes_sent']:,} B "
                  f"= {hf['ratio']:.3f}x (restarts from zero)")
    notes += "; wall times are both runs together"
    operation = f"resume after kill -9 at ~50% ({size / 1e6:.0f} MB{', ' + rate_limit + ' per connection' if rate_limit else ''})"
    entry = harness.result("download", operation, stats["ours"], stats.get("hf"),
                           baseline_name="hf_hub_download (same scenario)" if hf else None, args=args,
                           size_bytes=size, notes=notes, ok=ours["ratio"] <= MAX_RESUME_BYTES)
    entry["target"] = f"bytes sent <= {MAX_RESUME_BYTES}x file size"
    entry["ours_bytes_ratio"] = round(ours["ratio"], 4)
    entry["baseline_bytes_ratio"] = round(hf["ratio"], 4) if hf else None
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
    parser.add_argument("--skip", action="append", default=[], choices=["throughput", "ranges", "resume", "remote"])
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
            if "ranges" not in args.skip:
                bench_ranges(args, root, commit, sha, size)
            if "resume" not in args.skip:
                bench_resume(args, root, commit, size)
                bench_resume(args, root, commit, size, rate_limit=RATE_LIMIT)
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

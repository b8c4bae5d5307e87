"""Shared helpers for the benchmarks in scripts/bench/.

Every benchmark is a plain script ``scripts/bench/bench_<area>.py`` run as
``.venv/bin/python scripts/bench/bench_<area>.py [--scale S] [--runs N] [--out DIR]``.
Running a script puts its folder first on ``sys.path``, so ``import harness`` just works.

The interface a benchmark follows (``run_all.py`` relies on it):

1. Build the argument parser with ``harness.arg_parser(__doc__)``: it adds ``--scale`` (1.0 = the
   sizes the issues quote; 0.01 for a quick run), ``--runs`` (timed runs per command, median
   reported), ``--out`` (results folder, default ``bench-out/``), ``--workdir`` (big scratch files,
   default ``/tmp/ckpt-bench``), ``--keep`` (keep generated files) and ``--cold`` (drop the page
   cache before every timed run; needs root).
2. Get synthetic OpenFlamingo checkpoints with ``harness.checkpoint(args, layout, fmt, wrapper)``:
   generated in a child process under ``--workdir`` and reused when already there. Call
   ``harness.cleanup(args)`` at the end: it deletes the files this process generated, unless ``--keep``.
3. Measure a command with ``harness.measure(cmd, args)``: it runs the command ``--runs`` times as a
   subprocess (after one untimed warm-up run unless ``--cold``), samples its memory every 20 ms
   from ``/proc/PID/status`` (summed over the process tree) and returns a ``Stats`` (median wall
   time, peak RssAnon, peak RSS, and one run's memory time series for a plot). Baselines in the
   same run: ``harness.baseline_import_torch(args)``, ``harness.baseline_cp(src, args)``, or any
   command through ``measure``. Better on a shared machine: ``harness.measure_interleaved({"ours":
   cmd, "baseline": cmd2}, args)`` alternates the commands run by run so both see the same load.
   ``harness.heavy_imports(["inspect", path])`` says which heavy modules a ``ckpt`` command imported.
4. Record each comparison with ``harness.record(args, harness.result(...))``: one dict appended to
   ``<out>/results.json`` (fields below). ``run_all.py`` turns the file into ``BENCHMARKS.md``.
5. Plots: ``harness.plot_memory({label: stats}, args, "name.png", title)`` writes a
   memory-over-time PNG into ``<out>/plots/``; pass its file name as ``plot=`` to ``result``.
6. Exit 0 when the script ran (a missed target is a recorded result, not a crash); exit non-zero
   only when something broke.

A result dict: ``bench``, ``operation``, ``ours_s``, ``baseline``, ``baseline_s``, ``ratio``
(ours / baseline wall time), ``target`` (text, e.g. "ratio <= 1.3"), ``ok`` (target met, or None),
``ours_peak_anon_mb``, ``baseline_peak_anon_mb``, ``ours_peak_rss_mb``, ``memory_target``,
``size_bytes``, ``scale``, ``runs``, ``cache`` ("warm" or "cold"), ``command``, ``plot``,
``notes``, ``machine`` (see ``machine()``), ``time``.

Memory: RssAnon is anonymous memory (heap, tensors that were read into RAM); file-backed pages of a
memory-mapped checkpoint count in RSS but not in RssAnon, which is why targets use RssAnon. The
peak is the largest 20 ms sample, so a spike shorter than that can be missed; ``ours_peak_rss_mb``
is the kernel's peak RSS (``VmHWM``, file pages included).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYTHON = sys.executable
CKPT = str(Path(sys.executable).parent / "ckpt")
DEFAULT_WORKDIR = "/tmp/ckpt-bench"
SAMPLE_INTERVAL_S = 0.02
MB = 1024 * 1024

_generated: list[Path] = []


# --- command line -------------------------------------------------------------------------------


def arg_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="size factor: 1.0 = the issue's sizes, 0.01 for a quick run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median reported)")
    parser.add_argument("--out", default=str(REPO / "bench-out"), help="results folder (results.json, plots/)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="scratch folder for generated checkpoints")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints after the run")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before every timed run (root only); default: warm cache")
    return parser


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_anon: int
    vm_rss: int
    hwm: int = 0


@dataclass
class Run:
    wall_s: float
    peak_anon: int
    peak_rss: int
    returncode: int
    samples: list[Sample] = field(default_factory=list)
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass
class Stats:
    """Median wall time and memory of several runs of one command."""

    command: list[str]
    runs: list[Run]
    cache: str

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_anon_mb(self) -> float:
        return statistics.median(r.peak_anon for r in self.runs) / MB

    @property
    def peak_rss_mb(self) -> float:
        return statistics.median(r.peak_rss for r in self.runs) / MB

    @property
    def samples(self) -> list[Sample]:
        return self.runs[-1].samples

    @property
    def stdout(self) -> bytes:
        return self.runs[-1].stdout

    def summary(self) -> str:
        walls = ", ".join(f"{r.wall_s:.3f}" for r in self.runs)
        return (f"{shlex.join(self.command)}\n  wall median {self.wall_s:.3f} s ({walls}); "
                f"peak RssAnon {self.peak_anon_mb:.1f} MB; peak RSS {self.peak_rss_mb:.1f} MB; {self.cache} cache")


def _status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "VmHWM"):
                    values[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


def _process_tree(pid: int) -> list[int]:
    """The process and its descendants (a shell or a launcher may sit in between)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return pids


def run_once(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
             interval: float = SAMPLE_INTERVAL_S, capture: bool = True) -> Run:
    """Run ``cmd`` once, sampling the process tree's memory every ``interval`` seconds.

    The wall time comes from waiting on the process itself, so sampling adds no rounding to it.
    """
    samples: list[Sample] = []
    done = threading.Event()
    # Output goes to temp files, not pipes, so a chatty command never blocks on a full pipe.
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        sink = (fo, fe) if capture else (subprocess.DEVNULL, subprocess.DEVNULL)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink[0], stderr=sink[1], env=env, cwd=cwd)
        sampler = threading.Thread(target=_sample_until, args=(proc.pid, start, interval, done, samples))
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
    peak_anon = max((s.rss_anon for s in samples), default=0)
    # VmHWM is the kernel's own peak RSS since exec; the last sample misses at most one interval.
    peak_rss = max((max(s.vm_rss, s.hwm) for s in samples), default=0)
    return Run(wall, peak_anon, peak_rss, proc.returncode, samples, stdout, stderr)


def _sample_until(pid: int, start: float, interval: float, done: threading.Event, samples: list) -> None:
    while not done.is_set():
        sample = _sample_tree(pid, time.perf_counter() - start)
        if sample is not None:
            samples.append(sample)
        done.wait(interval)


def _sample_tree(pid: int, now: float) -> Sample | None:
    """Memory summed over the process tree; None once the process is a zombie (no Vm fields left)."""
    anon = rss = hwm = 0
    for p in _process_tree(pid):
        status = _status_kb(p)
        if p == pid and "VmRSS" not in status:
            return None
        anon += status.get("RssAnon", 0)
        rss += status.get("VmRSS", 0)
        hwm += status.get("VmHWM", 0)
    return Sample(now, anon, rss, hwm)


def measure(cmd: list[str], args: argparse.Namespace | None = None, *, runs: int | None = None,
            warmup: bool | None = None, env: dict | None = None, check: bool = True) -> Stats:
    """Run ``cmd`` ``runs`` times (default ``args.runs``) and return the median statistics.

    Warm cache by default: one untimed warm-up run first. With ``--cold`` the page cache is dropped
    before each timed run instead (an error when that is not possible).
    """
    runs = runs if runs is not None else (args.runs if args else 5)
    cold = bool(args and args.cold)
    warmup = (not cold) if warmup is None else warmup
    if warmup:
        run_once(cmd, env=env, capture=False)
    results = []
    for _ in range(runs):
        if cold and not drop_caches():
            raise SystemExit("--cold needs a writable /proc/sys/vm/drop_caches (run as root)")
        result = run_once(cmd, env=env)
        if check and result.returncode != 0:
            raise SystemExit(f"benchmark command failed ({result.returncode}): {shlex.join(cmd)}\n"
                             f"{result.stderr.decode(errors='replace')[-2000:]}")
        results.append(result)
    stats = Stats(list(cmd), results, "cold" if cold else "warm")
    print(stats.summary(), flush=True)
    return stats


def measure_interleaved(commands: dict[str, list[str]], args: argparse.Namespace | None = None, *,
                        runs: int | None = None, check: bool = True) -> dict[str, Stats]:
    """Like ``measure`` for several commands, alternating them run by run (A B A B ...).

    On a shared machine the load drifts; alternating lets a command and its baseline see the same
    conditions, which keeps their ratio honest.
    """
    runs = runs if runs is not None else (args.runs if args else 5)
    cold = bool(args and args.cold)
    if not cold:
        for cmd in commands.values():
            run_once(cmd, capture=False)
    results: dict[str, list[Run]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, cmd in commands.items():
            if cold and not drop_caches():
                raise SystemExit("--cold needs a writable /proc/sys/vm/drop_caches (run as root)")
            result = run_once(cmd)
            if check and result.returncode != 0:
                raise SystemExit(f"benchmark command failed ({result.returncode}): {shlex.join(cmd)}\n"
                                 f"{result.stderr.decode(errors='replace')[-2000:]}")
            results[label].append(result)
    stats = {label: Stats(list(commands[label]), rs, "cold" if cold else "warm") for label, rs in results.items()}
    for item in stats.values():
        print(item.summary(), flush=True)
    return stats


def drop_caches() -> bool:
    """Drop the page cache; False when this container does not allow it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


IMPORT_TORCH = [PYTHON, "-c", "import torch"]
PYTHON_START = [PYTHON, "-c", "pass"]


def baseline_import_torch(args: argparse.Namespace) -> Stats:
    """``python -c "import torch"``: the floor for anything that reads a torch pickle."""
    return measure(IMPORT_TORCH, args)


def baseline_python(args: argparse.Namespace) -> Stats:
    """``python -c pass``: the interpreter's own start-up."""
    return measure(PYTHON_START, args)


def baseline_cp(src: Path, args: argparse.Namespace, dst: Path | None = None) -> Stats:
    """``cp SRC DST``: the floor for anything that rewrites a file (DST removed afterwards)."""
    dst = dst or Path(args.workdir) / f"cp-baseline-{os.getpid()}{''.join(Path(src).suffixes)}"
    try:
        return measure(["cp", str(src), str(dst)], args)
    finally:
        dst.unlink(missing_ok=True)


HEAVY_MODULES = ("torch", "numpy", "huggingface_hub", "transformers", "safetensors.torch", "open_clip")

_IMPORT_PROBE = """
import json, sys
from ckpt_tools.cli import main
code = 0
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code or 0
heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
sys.stderr.write("\\nIMPORTS " + json.dumps({"code": code, "heavy": heavy}) + "\\n")
"""


def heavy_imports(ckpt_args: list[str]) -> list[str]:
    """Which of HEAVY_MODULES ``ckpt <ckpt_args>`` imports, checked in sys.modules after it ran."""
    proc = subprocess.run([PYTHON, "-c", _IMPORT_PROBE, json.dumps(HEAVY_MODULES), *ckpt_args],
                          capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.startswith("IMPORTS ")), None)
    if line is None:
        raise SystemExit(f"import probe failed: ckpt {shlex.join(ckpt_args)}\n{proc.stderr[-2000:]}")
    report = json.loads(line.removeprefix("IMPORTS "))
    if report["code"] != 0:
        raise SystemExit(f"ckpt {shlex.join(ckpt_args)} exited {report['code']}\n{proc.stderr[-2000:]}")
    return report["heavy"]


# --- synthetic checkpoints ----------------------------------------------------------------------


def checkpoint_path(args: argparse.Namespace, layout: str = "3b", fmt: str = "pt", wrapper: str = "none") -> Path:
    from gen_openflamingo import default_name

    return Path(args.workdir) / default_name(layout, args.scale, fmt, wrapper)


def checkpoint(args: argparse.Namespace, layout: str = "3b", fmt: str = "pt", wrapper: str = "none") -> Path:
    """A synthetic OpenFlamingo checkpoint at ``args.scale`` under ``args.workdir``; reused if present.

    Generated in a child process so the generator's memory never shows in the caller.
    Files generated here are deleted by ``cleanup(args)`` unless ``--keep``.
    """
    path = checkpoint_path(args, layout, fmt, wrapper)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, str(HERE / "gen_openflamingo.py"), "--layout", layout, "--scale", str(args.scale),
           "--format", fmt, "--wrapper", wrapper, "--out", str(path)]
    print("generating:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    _generated.append(path)
    return path


def run(bench: Callable[[argparse.Namespace], None], doc: str | None) -> None:
    """A bench script's main: the common arguments, ``bench``, then what it generated removed."""
    args = arg_parser(doc).parse_args()
    try:
        bench(args)
    finally:
        cleanup(args)


def cleanup(args: argparse.Namespace) -> None:
    if args.keep:
        return
    while _generated:
        path = _generated.pop()
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# --- recording ----------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(workdir: str = DEFAULT_WORKDIR) -> dict:
    """CPU, cores, RAM, free disk and library versions (torch's version without importing torch)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    disk_path = workdir if Path(workdir).exists() else "/tmp"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_total / 1024**3, 1),
        "disk_free_gb": round(shutil.disk_usage(disk_path).free / 1024**3, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "huggingface_hub": _version("huggingface_hub"),
    }


def machine_short(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']:g} GB RAM, load {m['load_avg'][0]:g}"


def result(bench: str, operation: str, ours: Stats, baseline: Stats | None = None, *,
           baseline_name: str | None = None, args: argparse.Namespace | None = None,
           max_ratio: float | None = None, max_seconds: float | None = None,
           max_extra_anon_mb: float | None = None, size_bytes: int | None = None,
           plot: str | None = None, notes: str = "", ok: bool | None = None) -> dict:
    """One comparison as a result dict; ``ok`` is computed from the targets given."""
    ratio = ours.wall_s / baseline.wall_s if baseline and baseline.wall_s > 0 else None
    checks, targets = [], []
    if max_ratio is not None and ratio is not None:
        checks.append(ratio <= max_ratio)
        targets.append(f"ratio <= {max_ratio:g}")
    if max_seconds is not None:
        checks.append(ours.wall_s < max_seconds)
        targets.append(f"< {max_seconds:g} s")
    memory_target = None
    if max_extra_anon_mb is not None and baseline:
        checks.append(ours.peak_anon_mb - baseline.peak_anon_mb <= max_extra_anon_mb)
        memory_target = f"RssAnon <= baseline + {max_extra_anon_mb:g} MB"
    if ok is None and checks:
        ok = all(checks)
    return {
        "bench": bench,
        "operation": operation,
        "ours_s": round(ours.wall_s, 4),
        "baseline": baseline_name or (shlex.join(baseline.command) if baseline else None),
        "baseline_s": round(baseline.wall_s, 4) if baseline else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "target": ", ".join(targets) or None,
        "ok": ok,
        "ours_peak_anon_mb": round(ours.peak_anon_mb, 1),
        "baseline_peak_anon_mb": round(baseline.peak_anon_mb, 1) if baseline else None,
        "ours_peak_rss_mb": round(ours.peak_rss_mb, 1),
        "memory_target": memory_target,
        "size_bytes": size_bytes,
        "scale": args.scale if args else None,
        "runs": len(ours.runs),
        "cache": ours.cache,
        "command": shlex.join(ours.command),
        "plot": plot,
        "notes": notes,
    }


def record(args: argparse.Namespace, entry: dict) -> dict:
    """Append ``entry`` (plus machine and time) to ``<out>/results.json``; safe across processes."""
    entry = {**entry, "machine": machine(args.workdir),
             "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    update_results(args.out, lambda entries: [*entries, entry])
    verdict = {True: "OK", False: "MISSED", None: "-"}[entry.get("ok")]
    print(f"[{verdict}] {entry['operation']}: ours {entry['ours_s']} s, baseline {entry.get('baseline_s')} s, "
          f"ratio {entry.get('ratio')}, RssAnon {entry.get('ours_peak_anon_mb')} MB "
          f"(baseline {entry.get('baseline_peak_anon_mb')} MB)", flush=True)
    return entry


def update_results(out: str | Path, change) -> list[dict]:
    """Rewrite ``<out>/results.json`` as ``change(entries)`` under a file lock, atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = change(json.loads(path.read_text()) if path.exists() else [])
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        tmp.replace(path)
    return entries


def load_results(out: str | Path) -> list[dict]:
    path = Path(out) / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


# --- plots --------------------------------------------------------------------------------------


def plot_memory(series: dict[str, Stats], args: argparse.Namespace, name: str, title: str) -> str:
    """Memory over time (RssAnon solid, RSS dotted) of one run per label; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = Path(args.out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for i, (label, stats) in enumerate(series.items()):
        color = f"C{i}"
        t = [s.t for s in stats.samples]
        ax.plot(t, [s.rss_anon / MB for s in stats.samples], color=color, label=f"{label} (RssAnon)")
        ax.plot(t, [s.vm_rss / MB for s in stats.samples], color=color, linestyle=":", alpha=0.7,
                label=f"{label} (RSS)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / name)
    plt.close(fig)
    return name

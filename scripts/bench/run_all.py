"""Run every scripts/bench/bench_*.py at one size and write BENCHMARKS.md at the repository root.

Each benchmark runs as its own process with the common options of harness.arg_parser (--scale,
--runs, --out, --workdir, --cold) and appends its results to <out>/results.json. This script then
writes BENCHMARKS.md (one table: operation, ours, baseline, ratio, target, memory, machine), copies
the plots the results name into docs/bench/ (small PNGs, committed) together with results.json, and
lists any benchmark that failed with the end of its log. Logs stay in <out>/logs/ (not committed).

Example:
    .venv/bin/python scripts/bench/run_all.py --scale 0.01 --runs 3      # quick check, about a minute per bench
    .venv/bin/python scripts/bench/run_all.py                            # the issues' sizes
    .venv/bin/python scripts/bench/run_all.py --render-only              # rebuild BENCHMARKS.md from results.json
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import harness

DOCS = harness.REPO / "docs" / "bench"
MARKDOWN = harness.REPO / "BENCHMARKS.md"


@dataclass
class ScriptRun:
    name: str
    returncode: int
    seconds: float
    log: Path

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(harness.HERE.glob("bench_*.py"))
    if only:
        wanted = {name.removeprefix("bench_").removesuffix(".py") for name in only}
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    return scripts


def run_script(script: Path, args) -> ScriptRun:
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{script.stem}.log"
    cmd = [harness.PYTHON, str(script), "--scale", str(args.scale), "--runs", str(args.runs),
           "--out", args.out, "--workdir", args.workdir,
           *(["--cold"] if args.cold else []), *(["--keep"] if args.keep else [])]
    print(f"\n=== {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=harness.REPO)
        for line in proc.stdout:  # tee: progress on the terminal, everything in the log
            sys.stdout.write(line)
            f.write(line)
        proc.wait()
    return ScriptRun(script.stem, proc.returncode, time.perf_counter() - start, log)


# --- BENCHMARKS.md ------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _memory(entry: dict) -> str:
    ours, base = entry.get("ours_peak_anon_mb"), entry.get("baseline_peak_anon_mb")
    if ours is None:
        return "-"
    if base is None:
        return f"{ours:.0f} MB"
    return f"{ours:.0f} MB vs {base:.0f} MB ({ours - base:+.0f} MB)"


def _verdict(entry: dict) -> str:
    targets = "; ".join(t for t in (entry.get("target"), entry.get("memory_target")) if t)
    if not targets:
        return "-"
    return f"{'met' if entry.get('ok') else 'MISSED'}: {targets}"


def table(results: list[dict]) -> list[str]:
    lines = ["| Operation | Ours | Baseline | Ratio | Target | Peak RssAnon (ours vs baseline) | Machine |",
             "|---|---|---|---|---|---|---|"]
    for e in results:
        baseline = f"{_seconds(e.get('baseline_s'))} `{e['baseline']}`" if e.get("baseline") else "-"
        ratio = f"{e['ratio']:.2f}x" if e.get("ratio") is not None else "-"
        machine = harness.machine_short(e["machine"]) if "machine" in e else "-"
        lines.append(f"| {e['operation']} | {_seconds(e['ours_s'])} | {baseline} | {ratio} | {_verdict(e)} "
                     f"| {_memory(e)} | {machine} |")
    return lines


def details(results: list[dict]) -> list[str]:
    lines = []
    for e in results:
        command = e["command"].replace(f"{harness.REPO}/", "")
        runs = f"median of {e['runs']} runs" if e["runs"] > 1 else "1 run"
        lines.append(f"- **{e['operation']}**: `{command}` ({runs}; {e['cache']} cache"
                     f"{'; ' + e['notes'] if e.get('notes') else ''})")
    return lines


def render(results: list[dict], runs: list[ScriptRun], command: str, docs: str = "docs/bench") -> str:
    machine = next((e["machine"] for e in results if "machine" in e), None) or harness.machine()
    scales = sorted({e.get("scale") for e in results if e.get("scale") is not None})
    met = sum(1 for e in results if e.get("ok") is True)
    targeted = sum(1 for e in results if e.get("ok") is not None)
    out = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. "
        f"Scale {', '.join(f'{s:g}' for s in scales) or '-'} (1 = the sizes quoted in the issues). "
        f"Targets met: {met} of {targeted}.",
        "",
        "Every figure is the median of several runs of a subprocess, measured against a baseline run in "
        "the same script on the same machine; memory is the peak anonymous memory (RssAnon, sampled every "
        "20 ms over the process tree), which leaves out the page cache and memory-mapped file pages. "
        "Runs are warm-cache (one untimed warm-up run first) unless the cache column says cold.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']:g} GB RAM, "
        f"{machine['disk_free_gb']:g} GB disk free, {machine['os']}, Python {machine['python']}, "
        f"torch {machine['torch']}, safetensors {machine['safetensors']}, huggingface_hub "
        f"{machine['huggingface_hub']}; load average at the time {machine['load_avg']}.",
        "",
        *table(results),
        "",
        "## Commands and notes",
        "",
        *details(results),
    ]
    plots = sorted({e["plot"] for e in results if e.get("plot")})
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{p}]({docs}/{p})" for p in plots]
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        out += ["", "## Benchmarks that did not finish", ""]
        for r in failed:
            out += [f"- `{r.name}` exited {r.returncode} after {r.seconds:.0f} s; end of its log:", "",
                    "  ```", *(f"  {line}" for line in r.tail().splitlines()), "  ```"]
    return "\n".join(out) + "\n"


def publish(args, runs: list[ScriptRun], command: str) -> None:
    results = harness.load_results(args.out)
    docs, markdown = Path(args.docs).resolve(), Path(args.markdown).resolve()
    docs.mkdir(parents=True, exist_ok=True)
    for name in sorted({e["plot"] for e in results if e.get("plot")}):
        source = Path(args.out) / "plots" / name
        if source.exists():
            shutil.copy2(source, docs / name)
    if results:
        shutil.copy2(Path(args.out) / "results.json", docs / "results.json")
    relative = os.path.relpath(docs, markdown.parent)
    markdown.write_text(render(results, runs, command, relative))
    print(f"\nwrote {markdown} ({len(results)} results) and {docs}", flush=True)


def start_results(args, rerun: set[str]) -> None:
    """A full run starts from an empty results file; ``--only`` keeps the other scripts' rows."""
    path = Path(args.out) / "results.json"
    previous = harness.load_results(args.out)
    if path.exists():
        shutil.copy2(path, path.with_name("results.previous.json"))
    keep = [e for e in previous if args.only and e.get("script") and e["script"] not in rerun]
    harness.update_results(args.out, lambda _: keep)


def main() -> int:
    parser = harness.arg_parser(__doc__)
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only bench_NAME.py (repeatable), e.g. --only inspect; the report keeps "
                             "the other scripts' rows from the previous run")
    parser.add_argument("--markdown", default=str(MARKDOWN), help="where to write the report")
    parser.add_argument("--docs", default=str(DOCS), help="where the plots and results.json are copied")
    parser.add_argument("--render-only", action="store_true",
                        help="do not run anything: rebuild the report from <out>/results.json")
    args = parser.parse_args()
    command = shlex.join(["python", "scripts/bench/run_all.py", *sys.argv[1:]])
    runs: list[ScriptRun] = []
    if not args.render_only:
        scripts = discover(args.only)
        start_results(args, {s.stem for s in scripts})
        for script in scripts:
            before = len(harness.load_results(args.out))
            runs.append(run_script(script, args))
            tag = script.stem  # which script wrote which rows, so --only can replace just those
            harness.update_results(args.out, lambda entries, n=before, t=tag:
                                   entries[:n] + [{**e, "script": t} for e in entries[n:]])
    publish(args, runs, command)
    failed = [r.name for r in runs if r.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

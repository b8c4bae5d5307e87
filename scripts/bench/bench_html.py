"""Benchmark the HTML report: its size, and the time Chromium takes to open it from file://.

1. The OpenFlamingo-9B published layout (``data/openflamingo-released-keys.json``) diffed against
   the ``openflamingo-9b-vitl-mpt7b`` preset (its meta skeleton is built first, a few seconds):
   targets: the page under 300 KB, opened in under 1 s.
2. A synthetic diff of 1,000 target tensors (``--scale`` multiplies the count) with every status
   present: target: the page under 1 MB.

"Opened" is the wall time from ``Page.navigate`` on a ``file://`` URL to the page's load event
(its script has run by then) plus two animation frames (a frame with the DOM has been drawn), in
headless Chromium driven over the DevTools protocol (``tests/cdp_browser.py``); median of
``--runs`` loads after one warm-up load, each load preceded by ``about:blank``. Baseline: the same
measurement on a one-paragraph page in the same browser. The browser's own navigation timing
(``loadEventEnd``) and first contentful paint are in the notes. With ``--screenshot`` the 9B page
is also saved as a PNG (the README's ``docs/html-report-9b.png``), opened down to its first cross-attention layer.

Example:
    .venv/bin/python scripts/bench/bench_html.py --runs 5
    .venv/bin/python scripts/bench/bench_html.py --runs 5 --screenshot docs/html-report-9b.png
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.REPO / "tests"))  # the report dicts and the browser driver the tests use

from cdp_browser import Browser, find_chromium  # noqa: E402
from html_reports import openflamingo_9b, synthetic  # noqa: E402

from ckpt_tools.html import render_html  # noqa: E402

COMMAND_9B = ("ckpt diff hf://openflamingo/OpenFlamingo-9B-vitl-mpt7b/checkpoint.pt "
              "--model openflamingo-9b-vitl-mpt7b --format html --output report.html")
MAX_OPEN_S = 1.0
FRAME = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))"
TIMING = ("JSON.stringify({load: performance.getEntriesByType('navigation')[0].loadEventEnd, "
          "fcp: (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null})")


def render(data: dict, command: str, path: Path, runs: int) -> tuple[int, float]:
    """Write the page; return its size and the median time render_html took."""
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        page = render_html("diff", data, command_line=command, tool_version=harness._version("ckpt-tools"))
        times.append(time.perf_counter() - start)
    path.write_text(page, encoding="utf-8")
    return len(page.encode("utf-8")), statistics.median(times)


def open_once(browser: Browser, path: Path) -> tuple[float, dict]:
    browser.open_url("about:blank")
    start = time.perf_counter()
    browser.open(path)
    browser.evaluate(FRAME)
    wall = time.perf_counter() - start
    return wall, json.loads(browser.evaluate(TIMING))


def measure_open(browser: Browser, path: Path, runs: int) -> tuple[harness.Stats, dict]:
    open_once(browser, path)  # warm-up: the file is in the page cache and the renderer is up
    walls, timings = [], []
    for _ in range(runs):
        wall, timing = open_once(browser, path)
        walls.append(wall)
        timings.append(timing)
    stats = harness.Stats([f"chromium --headless {path}"], [harness.Run(w, 0, 0, 0) for w in walls], "warm")
    load = statistics.median(t["load"] for t in timings) / 1000
    fcps = [t["fcp"] for t in timings if t["fcp"] is not None]
    return stats, {"load_s": load, "fcp_s": statistics.median(fcps) / 1000 if fcps else None}


def entry(args, operation: str, ours: harness.Stats | None, baseline: harness.Stats | None, size: int,
          max_size: int, max_seconds: float | None, render_s: float, timing: dict | None, command: str,
          tensors: int) -> dict:
    size_ok = size < max_size
    notes = [f"{tensors:,} tensors; page {size:,} bytes (target < {max_size:,}): {'met' if size_ok else 'MISSED'}",
             f"render_html {render_s * 1000:.1f} ms"]
    if timing:
        notes.append(f"Chromium's own loadEventEnd {timing['load_s'] * 1000:.0f} ms")
        if timing["fcp_s"] is not None:
            notes.append(f"first contentful paint {timing['fcp_s'] * 1000:.0f} ms")
    if ours is None:
        notes.append("no chromium found: size only")
        ours = harness.Stats([command], [harness.Run(0.0, 0, 0, 0)], "warm")
    if baseline is None:
        max_seconds = None
    result = harness.result("html", operation, ours, baseline, baseline_name="one-paragraph page, same browser",
                            args=args, max_seconds=max_seconds, size_bytes=size, notes="; ".join(notes))
    result["ok"] = size_ok and (result["ok"] is not False)
    result["target"] = ", ".join(t for t in (result["target"], f"page < {max_size // 1000:,} KB") if t)
    result["ours_peak_anon_mb"] = result["ours_peak_rss_mb"] = result["baseline_peak_anon_mb"] = None
    result["command"] = command
    return result


def main() -> int:
    parser = harness.arg_parser(__doc__)
    parser.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the 9B page here")
    args = parser.parse_args()
    work = Path(args.workdir) / "html"
    work.mkdir(parents=True, exist_ok=True)
    tensors = max(100, int(1000 * args.scale))
    cases = [("HTML report: OpenFlamingo-9B layout vs its preset, opened in Chromium", openflamingo_9b(),
              COMMAND_9B, work / "report-9b.html", 300_000, MAX_OPEN_S),
             (f"HTML report: {tensors:,}-tensor synthetic diff, opened in Chromium", synthetic(tensors),
              "ckpt diff synthetic.safetensors --model ... --format html", work / "report-synthetic.html", 1_000_000,
              None)]
    baseline_page = work / "baseline.html"
    baseline_page.write_text("<!DOCTYPE html><title>baseline</title><p>One paragraph.</p>\n")
    chromium = find_chromium()
    browser = Browser(chromium) if chromium else None
    try:
        baseline = measure_open(browser, baseline_page, args.runs)[0] if browser else None
        for operation, data, command, path, max_size, max_seconds in cases:
            size, render_s = render(data, command, path, args.runs)
            ours, timing = measure_open(browser, path, args.runs) if browser else (None, None)
            count = len(data["entries"])
            command_line = f".venv/bin/python scripts/bench/bench_html.py --runs {args.runs} (opens {path})"
            harness.record(args, entry(args, operation, ours, baseline, size, max_size, max_seconds, render_s,
                                       timing, command_line, count))
        if args.screenshot and browser:
            screenshot(browser, work / "report-9b.html", Path(args.screenshot))
    finally:
        if browser:
            browser.close()
    return 0


def screenshot(browser: Browser, page: Path, png: Path) -> None:
    browser.open(page)
    # open the modules down to the first cross-attention layer: the collapsed layer groups show
    browser.evaluate("(() => { const row = Array.from(document.querySelectorAll('#tree tbody tr'))"
                     ".find(r => r.firstChild.textContent.includes('gated_cross_attn_layer'));"
                     " for (let d = row.closest('details'); d; d = d.parentElement.closest('details')) d.open = true; })()")
    png.parent.mkdir(parents=True, exist_ok=True)
    browser.screenshot(png, full_page=True)
    print(f"screenshot: {png}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

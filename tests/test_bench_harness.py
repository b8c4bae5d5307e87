"""The benchmark harness measures what it says and run_all renders its results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import harness

    return harness


def test_run_once_sees_anonymous_memory_and_exit_code(harness):
    grow = "import time; x = bytearray(200 * 2**20); time.sleep(0.3); raise SystemExit(3)"
    run = harness.run_once([sys.executable, "-c", grow])
    assert run.returncode == 3
    assert run.peak_anon >= 200 * 2**20
    assert run.wall_s >= 0.3
    assert [s.t for s in run.samples] == sorted(s.t for s in run.samples)


def test_record_appends_and_run_all_renders_a_table(harness, tmp_path):
    args = argparse.Namespace(out=str(tmp_path), workdir=str(tmp_path), scale=0.5, runs=1, cold=False)
    fast = harness.measure([sys.executable, "-c", "pass"], args, runs=1, warmup=False)
    entry = harness.result("demo", "op A", fast, fast, args=args, max_ratio=1.3)
    harness.record(args, entry)
    harness.record(args, {**entry, "operation": "op B"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["operation"] for r in results] == ["op A", "op B"]
    assert results[0]["ratio"] == 1.0 and results[0]["ok"] is True
    assert results[0]["machine"]["cores"] >= 1

    import run_all

    text = run_all.render(results, [], "python scripts/bench/run_all.py --scale 0.5")
    rows = [line for line in text.splitlines() if line.startswith("| op ")]
    assert len(rows) == 2
    assert "| 1.00x | met: ratio <= 1.3 |" in rows[0]


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_every_benchmark_script_imports_and_explains_itself(script):
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stderr) == (0, "")

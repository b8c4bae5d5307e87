"""Interruptions: SIGKILL and Ctrl-C at many random moments of ``ckpt convert``, and a full disk.
(``ckpt download`` has its own in ``test_interrupt_download.py``.)

After every interruption the destination is either absent or complete and bit-identical to the
source, nothing else is left in the folder, and running the command again finishes.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ckpt_tools.convert")

HERE = Path(__file__).parent
KILLS_SINGLE, KILLS_SHARDED, INTERRUPTS = 20, 20, 6


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupt")
    gen = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(256, 1024, generator=gen) for i in range(4)}  # 4 MiB
    state["layer.0.bias"] = torch.arange(7, dtype=torch.int64)
    path = folder / "model.pt"
    torch.save(state, path)
    return path, state


def _drive(tmp_path: Path, runs: list[dict]) -> list[dict]:
    plan = tmp_path / f"plan-{random.random():.6f}.json"
    plan.write_text(json.dumps({"runs": runs}))
    done = subprocess.run([sys.executable, str(HERE / "interrupt_driver.py"), str(plan)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["results"]


def _state_of(out: Path, sharded: bool, expected: dict) -> str:
    """'absent', 'complete' (bit-identical to the source) or a description of what is wrong."""
    from safetensors import safe_open

    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not names:
        return "absent"
    if sharded:
        if "model.safetensors.index.json" not in names:
            return f"partial: {names}"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        if names != sorted(files + ["model.safetensors.index.json"]):
            return f"unexpected files: {names}"
    else:
        if names != ["model.safetensors"]:
            return f"unexpected files: {names}"
        files = ["model.safetensors"]
    seen = {}
    for name in files:
        with safe_open(str(out / name), framework="pt") as handle:
            seen.update({key: handle.get_tensor(key) for key in handle.keys()})
    if sorted(seen) != sorted(expected) or not all(torch.equal(seen[k], expected[k]) for k in expected):
        return "corrupt"
    return "complete"


def _args(src: Path, out: Path, sharded: bool) -> list[str]:
    if sharded:
        return ["convert", str(src), str(out / "sharded"), "--max-shard-size", "1500KB"]
    return ["convert", str(src), str(out / "model.safetensors")]


def _target(out: Path, sharded: bool) -> Path:
    return out / "sharded" if sharded else out


# A sharded destination is committed shard by shard, index last: a kill between two commits
# leaves shards without an index, and the rerun then refuses "the folder already holds shards".
SHARDED_GAP = "a sharded conversion is not atomic as a whole (orphan shards without an index)"


@pytest.mark.parametrize("mode", ["single", "sharded"])
def test_kill_and_ctrl_c_at_random_points(tmp_path, source, mode):
    src, state = source
    sharded = mode == "sharded"
    rng = random.Random(8)
    points = ["KILL"] * (KILLS_SHARDED if sharded else KILLS_SINGLE) + ([] if sharded else ["INT"] * INTERRUPTS)
    outs = [tmp_path / f"p{number}" for number in range(len(points) + 1)]
    for out in outs:
        out.mkdir()
    # the first run is uninterrupted: it proves the command works and times it for the others
    runs = [{"args": _args(src, outs[0], sharded)}]
    runs += [{"args": _args(src, out, sharded), "fraction": rng.uniform(0.0, 1.1), "signal": sig}
             for out, sig in zip(outs[1:], points, strict=True)]
    timing, *results = _drive(tmp_path, runs)
    assert timing["exit"] == 0, timing
    assert _state_of(_target(outs[0], sharded), sharded, state) == "complete"
    outs = outs[1:]

    problems: dict[str, list[str]] = {}  # out folder -> what went wrong there
    reruns, orphans = [], set()
    for sig, out, result in zip(points, outs, results, strict=True):
        where, found = f"{sig} after {result['delay']:.3f}s", _state_of(_target(out, sharded), sharded, state)
        if found.startswith("partial: "):
            orphans.add(out.name)
        if found not in ("absent", "complete"):
            problems.setdefault(out.name, []).append(f"{where}: {found}")
        if sig == "INT" and result["exit"] not in (0, 130):
            problems.setdefault(out.name, []).append(f"{where}: exit {result['exit']}: {result['stderr'][-300:]}")
        if sig == "INT" and result["exit"] == 130 and result["stderr"].strip().splitlines()[-1:] != ["interrupted"]:
            problems.setdefault(out.name, []).append(f"{where}: stderr {result['stderr'][-300:]!r}")
        reruns.append(_args(src, out, sharded) + (["--force"] if found == "complete" else []))
    assert sum(r["signal"] == signal.SIGKILL for r in results) >= len(points) // 3  # most landed mid-run
    again = _drive(tmp_path, [{"args": args} for args in reruns])
    for out, result in zip(outs, again, strict=True):
        if result["exit"] != 0:
            problems.setdefault(out.name, []).append(f"rerun: exit {result['exit']}: {result['stderr'][-300:]}")
        found = _state_of(_target(out, sharded), sharded, state)
        if found != "complete":
            problems.setdefault(out.name, []).append(f"after the rerun: {found}")
    lines = [f"{name}: {line}" for name, found in problems.items() for line in found]
    if sharded and problems and set(problems) <= orphans:
        pytest.xfail(f"{SHARDED_GAP}: {lines[:3]}")
    assert problems == {}, "\n".join(lines)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, like a full disk's ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("sharded", [False, True])
def test_full_disk_gives_one_clear_line_and_no_partial_file(tmp_path, source, sharded):
    src, _ = source
    out = tmp_path / "out"
    out.mkdir()
    args = _args(src, out, sharded)
    done = subprocess.run([sys.executable, "-m", "ckpt_tools", *args], capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_file_size(512 * 1024),
                          env={**os.environ, "CKPT_DEBUG": "0"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "too large" in lines[0].lower() or "space" in lines[0].lower()
    assert sorted(p.name for p in out.rglob("*")) == []


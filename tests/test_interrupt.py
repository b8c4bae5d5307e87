"""Interruptions: SIGKILL and Ctrl-C at many random moments of ``ckpt convert``, and a full disk.
(``ckpt download`` has its own in ``test_interrupt_download.py``.)

After every interruption the destination is either absent or complete and bit-identical to the
source, nothing else is left in the folder, and running the command again finishes. A sharded
output is written into a hidden sibling folder that a later run cleans up if the writer died.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ckpt_tools.convert")

HERE = Path(__file__).parent
KILLS_SINGLE, KILLS_SHARDED, INTERRUPTS = 20, 20, 6
SOURCE_BYTES = 4 * 256 * 1024 * 4 + 7 * 8  # the tensor bytes of ``source``


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


def _hidden_temporary(name: str) -> bool:
    return name.startswith(".model.safetensors.") and name.endswith(".tmp")


def _state_of(out: Path, sharded: bool, expected: dict) -> str:
    """'absent', 'complete' (bit-identical to the source) or a description of what is wrong."""
    from safetensors import safe_open

    # a writer killed between naming its finished temporary and renaming it leaves a hidden
    # ".NAME.*.tmp", never the destination's own name; the next run removes it (checked after reruns)
    names = sorted(p.name for p in out.iterdir() if not _hidden_temporary(p.name)) if out.exists() else []
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
    reruns = []
    for sig, out, result in zip(points, outs, results, strict=True):
        where, found = f"{sig} after {result['delay']:.3f}s", _state_of(_target(out, sharded), sharded, state)
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
        if sorted(p.name for p in out.iterdir()) != [_target(out, sharded).name if sharded else "model.safetensors"]:
            problems.setdefault(out.name, []).append(f"left behind: {sorted(p.name for p in out.iterdir())}")
    lines = [f"{name}: {line}" for name, found in problems.items() for line in found]
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
    assert done.stderr.strip().splitlines() == [
        f"error: {args[2]}: no room to write the output (File too large); nothing was kept; "
        f"fix: free disk space (need about {SOURCE_BYTES} bytes) and run the command again"]
    assert sorted(p.name for p in out.rglob("*")) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("sharded", [False, True])
def test_no_space_and_quota_are_disk_full_errors(tmp_path, source, monkeypatch, code, sharded):
    import ckpt_tools.safetensors_writer as writer
    from ckpt_tools.convert import convert_to_safetensors
    from ckpt_tools.errors import DiskFullError

    def refuse(self, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writer.AtomicFile, "write", refuse)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / ("sharded" if sharded else "model.safetensors")
    with pytest.raises(DiskFullError, match=f"need about {SOURCE_BYTES} bytes") as info:
        convert_to_safetensors(source[0], dst, max_shard_size="1500KB" if sharded else None)
    assert info.value.path == str(dst) and info.value.exit_code == 2 and os.strerror(code) in str(info.value)
    assert list(out.iterdir()) == []


def _convert_sharded(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools", "convert", str(src), str(dst), "--max-shard-size",
                           "1500KB", *extra], capture_output=True, text=True, timeout=120)


def test_stale_staging_folders_are_removed_but_not_one_in_use(tmp_path, source):
    src, state = source
    stale = tmp_path / ".sharded.ckpt-tmp-0badc0de"  # what a killed run leaves
    stale.mkdir()
    (stale / "model-00001-of-00004.safetensors").write_bytes(b"half")
    busy = tmp_path / ".sharded.ckpt-tmp-0000beef"  # another run still writing: it holds the lock
    busy.mkdir()
    other = tmp_path / ".other.ckpt-tmp-00000000"  # another destination's: not ours to touch
    other.mkdir()
    lock = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = _convert_sharded(src, tmp_path / "sharded")
    finally:
        os.close(lock)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _state_of(tmp_path / "sharded", True, state) == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name, "sharded"])


def test_force_replaces_a_sharded_folder_whole_and_keeps_other_files(tmp_path, source):
    src, state = source
    dst = tmp_path / "sharded"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    (dst / "model-00001-of-00009.safetensors").write_bytes(b"old shard")
    (dst / "model.safetensors.index.json").write_text("{}")
    assert "--force" in _convert_sharded(src, dst).stderr
    done = _convert_sharded(src, dst, "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model-00001-of-00004.safetensors",
                                                    "model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors",
                                                    "model-00004-of-00004.safetensors", "model.safetensors.index.json"]
    assert (dst / "config.json").read_text() == "{}"
    (dst / "config.json").unlink()
    assert _state_of(dst, True, state) == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]



def test_replacing_a_folder_where_names_cannot_be_exchanged(tmp_path, source, monkeypatch):
    import ckpt_tools.fs as fs
    from ckpt_tools.convert import convert_to_safetensors

    src, state = source
    dst = tmp_path / "sharded"
    convert_to_safetensors(src, dst, max_shard_size="3MB")
    (dst / "notes" / "deep").mkdir(parents=True)
    (dst / "notes" / "deep" / "a.txt").write_text("kept")
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)  # e.g. not Linux: old folder moved aside
    convert_to_safetensors(src, dst, max_shard_size="1500KB", force=True)
    assert (dst / "notes" / "deep" / "a.txt").read_text() == "kept"
    assert len(list(dst.glob("model-*-of-00004.safetensors"))) == 4 and not list(dst.glob("*-of-00002.*"))
    shutil.rmtree(dst / "notes")
    assert _state_of(dst, True, state) == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]

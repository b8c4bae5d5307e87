"""Interrupting ``ckpt download``: SIGKILL at many random points, Ctrl-C, and a full disk.

Each run is a real ``python -m ckpt_tools download`` process against the local mirror, which sends
the file slowly so that a few MiB take about 3 s and a kill can land anywhere in the transfer.
Every test runs in two modes: over one stream (the mirror's ``slow`` fault), and in ranges over
four connections (the mirror's per-connection rate limit, 1/8 of the rate each: the record of the
ranges is rewritten every ``RECORD_SECONDS``, and a kill needs a record that moved). The kills run one
after another against one cache, so every run resumes the partial file the previous one left;
after each kill the cache must hold nothing a later step could trust wrongly: the snapshot entry
is absent or points to a verified blob, and the only unfinished files are the resumable
``blobs/<sha256>.incomplete``, which holds a prefix of the file, or (in ranges) the partial file
and its ``.ranges`` record, every recorded byte of which is the file's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import wait_for

from ckpt_tools.hub.ranges import RECORD_SECONDS, split
from ckpt_tools.server import Fault, HubServer, TokenBucket, publish

REPO, NAME = "org/big", "model.bin"
SIZE = 3 * 1024 * 1024
RATE = 1_000_000  # bytes/s: the whole file in about 3 s, in 63 writes
CHUNK = RATE // 20  # what the slow mirror writes between two sleeps
PAYLOAD = random.Random(8).randbytes(SIZE)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
STORAGE = "models--org--big"
TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # a symlink or ref being replaced atomically
RECORD_TMP = re.compile(rf"^\.{SHA}\.incomplete\.ranges\.[a-z0-9_]{{8}}\.tmp$")  # the record, replaced atomically
EARLY_KILLS, TRANSFER_KILLS, LATE_KILLS = 2, 20, 2
WAIT = 30.0  # seconds a child may take to reach a kill point on a busy machine
CONNECTIONS, RANGE_CHUNK = 4, 256 * 1024


@dataclass(frozen=True)
class Mode:
    """One stream, or ranges over several connections; ``waste`` is what one kill may cost on the
    wire: the bytes in flight, and (in ranges) those not recorded yet."""

    name: str
    args: tuple[str, ...]
    waste: int


SINGLE = Mode("single", (), 4 * CHUNK)
RANGE_RATE = RATE / 8  # per connection
BURST = TokenBucket(RANGE_RATE).burst  # what the rate-limited mirror sends at once
RANGED = Mode("ranged", ("--connections", str(CONNECTIONS), "--chunk-size", str(RANGE_CHUNK)),
              CONNECTIONS * 2 * BURST + int(2 * RECORD_SECONDS * CONNECTIONS * RANGE_RATE))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    commit = publish(root, REPO, {NAME: PAYLOAD})
    with HubServer(root, faults=[Fault("slow", times=None, path=NAME, rate=RATE)]) as single, \
            HubServer(root, rate_limit=RANGE_RATE) as ranged:
        single.commit = ranged.commit = commit
        yield {"single": single, "ranged": ranged}


@pytest.fixture(params=[SINGLE, RANGED], ids=lambda mode: mode.name)
def mode(request) -> Mode:
    return request.param


@pytest.fixture
def hub(servers, mode):
    return servers[mode.name]


def _command(hub, cache: Path, mode: Mode) -> list[str]:
    return [sys.executable, "-m", "ckpt_tools", "download", REPO, NAME, "--endpoint", hub.endpoint,
            "--cache-dir", str(cache), "--format", "json", *mode.args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CKPT_DEBUG"}


def _start(hub, cache: Path, mode: Mode) -> subprocess.Popen:
    return subprocess.Popen(_command(hub, cache, mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())


def _partial(cache: Path) -> Path:
    return cache / STORAGE / "blobs" / f"{SHA}.incomplete"


def _blob(cache: Path) -> Path:
    return cache / STORAGE / "blobs" / SHA


def _pointer(cache: Path, commit: str) -> Path:
    return cache / STORAGE / "snapshots" / commit / NAME


def _record(cache: Path) -> Path:
    return _partial(cache).with_name(f"{SHA}.incomplete.ranges")


def _recorded(cache: Path) -> list[list[int]] | None:
    """The ranges ``[start, end, upto]`` the partial file's record holds, None without one."""
    try:
        return json.loads(_record(cache).read_text())["ranges"]
    except FileNotFoundError:
        return None


def _received(cache: Path) -> int:
    """Bytes on disk so far: what the record of a ranged partial file holds, else the partial file's
    size, or the whole file once it is a blob."""
    ranges = _recorded(cache)
    if ranges is not None:
        return sum(upto - start for start, _, upto in ranges)
    try:
        return _partial(cache).stat().st_size
    except FileNotFoundError:
        return SIZE if _blob(cache).exists() else 0


def _expected_gets(cache: Path, mode: Mode) -> list[str | None]:
    """The Range header of every GET a run from this state makes: one stream resumes where the
    partial file ends; ranges each resume where the record says (all of them, on a fresh start)."""
    before = _received(cache)
    if before >= SIZE:
        return []
    if mode is SINGLE:
        return [f"bytes={before}-" if before else None]
    ranges = _recorded(cache) if _partial(cache).exists() else None
    ranges = ranges or [[start, end, start] for start, end in split(SIZE, RANGE_CHUNK, CONNECTIONS)]
    return sorted(f"bytes={upto}-{end - 1}" for _, end, upto in ranges if upto < end)


def _wait_for(child: subprocess.Popen, ready) -> bool:
    """Poll until ``ready()``; False when the child exits first."""
    deadline = time.monotonic() + WAIT
    while not ready():
        if child.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the download made no progress"
        time.sleep(0.003)
    return True


def _problems(cache: Path, commit: str) -> list[str]:
    """What in the cache is half-written or wrong (empty when the invariant holds)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(cache):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            rel = path.relative_to(cache).as_posix()
            if rel == f".locks/{STORAGE}/{SHA}.lock":
                continue
            if rel == f"{STORAGE}/blobs/{SHA}":
                data = path.read_bytes()
                if len(data) != SIZE or hashlib.sha256(data).hexdigest() != SHA:
                    found.append(f"{rel}: the final blob holds {len(data)} wrong bytes")
            elif rel == f"{STORAGE}/blobs/{SHA}.incomplete":
                found += _partial_problems(rel, path.read_bytes(), _recorded(cache))
            elif rel == f"{STORAGE}/blobs/{SHA}.incomplete.ranges" or RECORD_TMP.match(name):
                continue  # its content is checked with the partial file
            elif rel == f"{STORAGE}/snapshots/{commit}/{NAME}":
                if not path.is_symlink() or path.resolve() != _blob(cache).resolve() or not _blob(cache).is_file():
                    found.append(f"{rel}: does not point to the verified blob")
            elif rel == f"{STORAGE}/refs/main":
                if path.read_text() != commit:
                    found.append(f"{rel}: holds {path.read_text()!r}")
            elif not TMP_NAME.match(name) or "/blobs/" in rel:
                found.append(f"{rel}: unexpected file")
    return found


def _partial_problems(rel: str, data: bytes, ranges: list[list[int]] | None) -> list[str]:
    if ranges is None:
        return [] if PAYLOAD.startswith(data) else [f"{rel}: {len(data)} bytes that are not a prefix of the file"]
    return [f"{rel}: bytes {start}-{upto} are recorded but not the file's" for start, _, upto in ranges
            if data[start:upto] != PAYLOAD[start:upto]]


def _gets(hub, since: int) -> list[str | None]:
    """The Range header of every GET of the file since request number ``since``."""
    return [rng for method, path, rng in hub.stats.requests[since:] if method == "GET" and NAME in path]


def _settle(hub) -> int:
    """Bytes the mirror sent, once its threads for killed connections have noticed."""
    wait_for(lambda: hub.stats.active == 0)
    return hub.stats.bytes_sent


def _kill_plan(rng: random.Random) -> list[tuple[str, float]]:
    """(phase, where): a delay after start, a byte offset to reach, or a delay after the last byte."""
    early = [("early", rng.uniform(0.0, 0.25)) for _ in range(EARLY_KILLS)]  # starting up, asking HEAD
    # short of the end, so the late kills still find bytes to wait for
    offsets = sorted(rng.uniform(0, SIZE - 16 * CHUNK) for _ in range(TRANSFER_KILLS))
    transfer = [("transfer", offset) for offset in offsets]
    late = [("late", rng.uniform(0.0, 0.03)) for _ in range(LATE_KILLS)]
    return early + transfer + late


def _kill_at(child: subprocess.Popen, cache: Path, phase: str, where: float, before: int,
             rng: random.Random) -> bool:
    """SIGKILL ``child`` at the planned point; False when it finished first."""
    if phase == "early":
        time.sleep(where)
    elif phase == "transfer":
        # at least one new byte, so every one of these kills lands while bytes are moving
        if not _wait_for(child, lambda: _received(cache) >= max(where, before + 1)):
            return False
        time.sleep(rng.uniform(0, CHUNK / RATE))  # anywhere between two writes, not right after one
    else:
        if not _wait_for(child, lambda: _received(cache) >= SIZE):
            return False
        time.sleep(where)  # around the verification, the rename and the snapshot symlink
    if child.poll() is not None:
        return False
    child.send_signal(signal.SIGKILL)
    return True


def test_sigkill_at_random_points_then_resume(hub, mode, tmp_path):
    cache, commit = tmp_path / "cache", hub.commit
    rng = random.Random(20)
    sent_before, problems, log = _settle(hub), [], []
    for number, (phase, where) in enumerate(_kill_plan(rng)):
        before, since, expected = _received(cache), len(hub.stats.requests), _expected_gets(cache, mode)
        child = _start(hub, cache, mode)
        killed = _kill_at(child, cache, phase, where, before, rng)
        _, err = child.communicate(timeout=WAIT)
        after = _received(cache)
        label = f"kill {number} ({phase} {where:.3f}, {before} -> {after} bytes)"
        log.append((phase, killed, before, after))
        if not killed and child.returncode != 0:
            problems.append(f"{label}: exit {child.returncode}: {err.decode()[-300:]}")
        if killed and child.returncode != -signal.SIGKILL:
            problems.append(f"{label}: exit {child.returncode}, not killed")
        problems += [f"{label}: {p}" for p in _problems(cache, commit)]
        # a run resumes exactly where the partial file (or each recorded range) ends, each once, and a
        # complete one needs no GET
        asked = Counter(_gets(hub, since))
        problems += [f"{label}: GET with Range {r!r} ({n} times)" for r, n in asked.items() if r not in expected or n > 1]
        assert after >= before, f"{label}: the partial file shrank"

    since, expected = len(hub.stats.requests), _expected_gets(cache, mode)
    done = subprocess.run(_command(hub, cache, mode), capture_output=True, text=True, timeout=WAIT, env=_env())
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["files"][0]
    assert (result["sha256"], result["size"]) == (SHA, SIZE)
    assert Path(result["local_path"]) == _pointer(cache, commit)
    assert hashlib.sha256(_pointer(cache, commit).read_bytes()).hexdigest() == SHA
    assert not _partial(cache).exists() and _problems(cache, commit) == []
    assert problems == []

    transfer_kills = [entry for entry in log if entry[0] == "transfer"]
    assert sum(killed for _, killed, _, _ in transfer_kills) >= TRANSFER_KILLS - 1, log  # the last may finish first
    assert [(before, after) for _, killed, before, after in transfer_kills if killed and after <= before] == []
    # every byte crossed the wire about once: each kill wastes at most what was in flight
    kills = sum(killed for _, killed, _, _ in log)
    sent = _settle(hub) - sent_before
    assert SIZE <= sent <= SIZE + kills * mode.waste, (sent, kills)
    assert sorted(_gets(hub, since), key=str) == expected


def test_ctrl_c_exits_130_and_the_rerun_resumes(hub, mode, tmp_path):
    cache, commit = tmp_path / "cache", hub.commit
    child = _start(hub, cache, mode)
    assert _wait_for(child, lambda: _received(cache) >= SIZE // 4), child.communicate()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=WAIT)
    assert child.returncode == 130, err
    assert err.decode().splitlines() == ["interrupted"]
    left = _received(cache)
    # it stopped mid-transfer: the resumable partial stays, no blob and no snapshot entry
    assert SIZE // 4 <= left < SIZE and _partial(cache).is_file()
    assert not _blob(cache).exists() and not os.path.lexists(_pointer(cache, commit))
    assert _problems(cache, commit) == []
    assert _record(cache).is_file() == (mode is RANGED)  # what each range got, written on the way out

    since, expected = len(hub.stats.requests), _expected_gets(cache, mode)
    done = subprocess.run(_command(hub, cache, mode), capture_output=True, text=True, timeout=WAIT, env=_env())
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["files"][0]
    assert (result["sha256"], result["resumed_from"], result["bytes_transferred"]) == (SHA, left, SIZE - left)
    assert sorted(_gets(hub, since)) == expected
    assert _blob(cache).read_bytes() == PAYLOAD and not _partial(cache).exists()


# A file size limit makes write() fail with EFBIG as a full disk fails with ENOSPC. The limit and
# SIGXFSZ's disposition are set in the child before it runs the CLI (both survive exec), which is
# safer than preexec_fn with the mirror's threads running in this process.
LIMITED = ("import resource, runpy, signal, sys; "
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
           "sys.argv[0] = 'ckpt'; runpy.run_module('ckpt_tools', run_name='__main__')")


def test_full_disk_is_one_clear_line_and_no_final_file(hub, mode, tmp_path):
    cache, commit = tmp_path / "cache", hub.commit
    limit = 1024 * 1024
    command = [sys.executable, "-c", LIMITED, str(limit), *_command(hub, cache, mode)[3:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT, env=_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"error: {_partial(cache)}: key '{NAME}': no room to write the download (File too large); "
        "fix: free disk space (or raise the file size limit) and run the command again: "
        "the download resumes from this partial file\n")
    assert not _blob(cache).exists() and not os.path.lexists(_pointer(cache, commit))
    assert not (cache / STORAGE / "refs").exists()
    # one stream wrote up to the limit; ranges could not even make the sparse partial file its full size
    kept = limit if mode is SINGLE else 0
    assert _received(cache) == kept and _problems(cache, commit) == []

    again = subprocess.run(_command(hub, cache, mode), capture_output=True, text=True, timeout=WAIT, env=_env())
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)["files"][0]
    assert (result["sha256"], result["resumed_from"]) == (SHA, kept)
    assert _blob(cache).read_bytes() == PAYLOAD

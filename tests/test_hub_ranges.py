"""`ckpt download` of one file in ranges over several connections, against the local mirror."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from ckpt_tools.errors import HubError, IntegrityError
from ckpt_tools.http import RetryPolicy
from ckpt_tools.hub import download, plan_download
from ckpt_tools.hub.ranges import RangeRecord, split
from ckpt_tools.hub.transfer import Expect
from ckpt_tools.server import Fault, HubServer, publish

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, timeout=10)
SIZE = 3 * 2**20
BIG = random.Random(16).randbytes(SIZE)
BIG_SHA = hashlib.sha256(BIG).hexdigest()
REPO, NAME = "org/model", "model.bin"
CHUNK, CONNECTIONS = 256 * 1024, 4
SPANS = split(SIZE, CHUNK, CONNECTIONS)
EXPECT = Expect(BIG_SHA, SIZE, BIG_SHA, None)


@pytest.fixture
def commit(root):
    return publish(root, REPO, {NAME: BIG})


@pytest.fixture
def hub(root, commit):
    with HubServer(root) as server:
        yield server


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def fetch(hub, cache, **kw):
    kw = {"connections": CONNECTIONS, "chunk_size": CHUNK, "retry": FAST, **kw}
    return download(REPO, [NAME], endpoint=hub.endpoint, cache_dir=cache, **kw)


def blobs(cache) -> Path:
    return cache / "models--org--model" / "blobs"


def partial(cache) -> Path:
    return blobs(cache) / f"{BIG_SHA}.incomplete"


def record(cache) -> Path:
    return blobs(cache) / f"{BIG_SHA}.incomplete.ranges"


def ranges_asked(hub) -> list[str | None]:
    return [rng for method, path, rng in hub.stats.requests if method == "GET" and NAME in path]


def asked_for(spans) -> list[str]:
    return sorted(f"bytes={start}-{end - 1}" for start, end in spans)


def test_split_rounds_of_one_range_per_connection_the_last_one_finer():
    assert split(12 * 2**20, 2**20, 4) == (
        [(i * 2**20, (i + 1) * 2**20) for i in range(8)]  # two rounds of 4 ranges of the chunk size
        + [(8 * 2**20 + i * 128 * 1024, 8 * 2**20 + (i + 1) * 128 * 1024) for i in range(32)])  # one in 8ths


def test_split_one_range_when_one_stream_does():
    assert split(2**20, 2**20, 8) == [(0, 2**20)]  # not above the chunk size
    assert split(10 * 2**20, 2**20, 1) == [(0, 10 * 2**20)]  # one connection
    assert split(None, 2**20, 8) == [(0, 0)]  # size unknown


def test_ranges_give_the_same_bytes_and_sha256(hub, cache):
    result = fetch(hub, cache)
    got = result.files[0]
    assert (got.sha256, got.size, got.bytes_transferred, got.resumed_from) == (BIG_SHA, SIZE, SIZE, 0)
    assert (got.ranges, got.connections) == (len(SPANS), CONNECTIONS)
    assert Path(got.local_path).read_bytes() == BIG
    assert sorted(ranges_asked(hub)) == asked_for(SPANS)  # each range once, nothing twice
    assert hub.stats.bytes_sent == SIZE
    assert sorted(p.name for p in blobs(cache).iterdir()) == [BIG_SHA]  # no partial file, no record left


def test_dry_run_counts_the_planned_ranges(hub, cache, run_cli):
    result = run_cli("download", REPO, NAME, "--endpoint", hub.endpoint, "--cache-dir", cache, "--dry-run",
                     "--connections", CONNECTIONS, "--chunk-size", "256KiB", "--format", "json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["connections"], plan["chunk_size"]) == (CONNECTIONS, CHUNK)
    assert [(f["ranges"], f["connections"]) for f in plan["files"]] == [(len(SPANS), CONNECTIONS)]


def test_one_connection_is_one_stream(hub, cache):
    got = fetch(hub, cache, connections=1).files[0]
    assert (got.sha256, got.ranges, got.connections) == (BIG_SHA, 1, 1)
    assert ranges_asked(hub) == [None]


def test_bad_connections_is_a_usage_error(hub, cache, run_cli):
    result = run_cli("download", REPO, NAME, "--endpoint", hub.endpoint, "--connections", "0")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --connections must be at least 1, not 0;")


def test_bad_chunk_size_is_a_usage_error(hub, cache, run_cli):
    result = run_cli("download", REPO, NAME, "--endpoint", hub.endpoint, "--chunk-size", "big")
    assert result.exit_code == 2 and result.stderr.startswith("error: invalid size 'big';")


def test_resume_from_a_record_fetches_only_what_it_lacks(hub, cache):
    # an earlier run wrote parts of three ranges and recorded them
    done = {0: SPANS[0][1], 3: SPANS[3][0] + 5000, len(SPANS) - 1: SPANS[-1][0] + 30000}
    ranges = [[start, end, done.get(i, start)] for i, (start, end) in enumerate(SPANS)]
    partial(cache).parent.mkdir(parents=True)
    data = bytearray(SIZE)
    for start, _, upto in ranges:
        data[start:upto] = BIG[start:upto]
    partial(cache).write_bytes(data)
    RangeRecord(BIG_SHA, SIZE, ranges).write(record(cache))
    kept = sum(upto - start for start, _, upto in ranges)

    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.resumed_from, got.bytes_transferred) == (BIG_SHA, kept, SIZE - kept)
    assert hub.stats.bytes_sent == SIZE - kept
    assert sorted(ranges_asked(hub)) == sorted(f"bytes={upto}-{end - 1}" for start, end, upto in ranges if upto < end)
    assert got.notes[-1] == "resumed: 290.18 KiB an earlier run wrote were read back from disk to hash them"
    assert Path(got.local_path).read_bytes() == BIG and not record(cache).exists()


def test_dry_run_shows_what_a_record_keeps(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    partial(cache).write_bytes(bytes(SIZE))
    RangeRecord.fresh(EXPECT, SPANS, prefix=CHUNK + 10).write(record(cache))
    planned = plan_download(REPO, [NAME], endpoint=hub.endpoint, cache_dir=cache, retry=FAST,
                            connections=CONNECTIONS, chunk_size=CHUNK).files[0]
    assert (planned.action, planned.partial_bytes, planned.to_fetch) == ("resume", CHUNK + 10, SIZE - CHUNK - 10)
    assert (planned.ranges, planned.connections) == (len(SPANS), CONNECTIONS)


def test_a_record_that_does_not_fit_its_partial_file_is_not_trusted(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    partial(cache).write_bytes(bytes(SIZE))  # zeros, which the record below claims are the file
    ranges = [[start, end, end] for start, end in SPANS]
    ranges[1][0] += 1  # the ranges no longer tile the file
    RangeRecord(BIG_SHA, SIZE, ranges).write(record(cache))
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.resumed_from, got.bytes_transferred) == (BIG_SHA, 0, SIZE)
    assert got.notes[0] == "the partial file's range record did not fit it: started over"


def test_a_partial_prefix_without_a_record_is_kept(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    partial(cache).write_bytes(BIG[:CHUNK + 100])  # what one stream leaves
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.resumed_from, got.bytes_transferred) == (BIG_SHA, CHUNK + 100, SIZE - CHUNK - 100)
    assert f"bytes={CHUNK + 100}-{2 * CHUNK - 1}" in ranges_asked(hub)


def test_a_record_is_resumed_whatever_the_new_settings(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    data = bytearray(SIZE)
    data[:CHUNK + 10] = BIG[:CHUNK + 10]
    data[3 * CHUNK:4 * CHUNK] = BIG[3 * CHUNK:4 * CHUNK]
    partial(cache).write_bytes(data)
    ranges = [[start, end, min(end, max(start, CHUNK + 10))] for start, end in SPANS]
    ranges[3][2] = ranges[3][1]
    RangeRecord(BIG_SHA, SIZE, ranges).write(record(cache))
    got = fetch(hub, cache, connections=1, chunk_size=SIZE).files[0]  # one stream now: its ranges still count
    assert (got.sha256, got.ranges, got.connections) == (BIG_SHA, len(SPANS), 1)
    assert (got.resumed_from, hub.stats.bytes_sent) == (2 * CHUNK + 10, SIZE - 2 * CHUNK - 10)


def test_server_ignoring_range_falls_back_to_one_stream(hub, cache, capsys):
    hub.faults.append(Fault("ignore_range", times=None, path=NAME))
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.ranges, got.connections) == (BIG_SHA, 1, 1)
    assert got.notes == ["the server ignored Range (it sent the whole file): fetched over one stream"]
    assert capsys.readouterr().err == f"{NAME}: the server ignored Range (it sent the whole file): fetched over one stream\n"
    assert Path(got.local_path).read_bytes() == BIG and not record(cache).exists()
    assert ranges_asked(hub)[-1] is None  # the one stream asked for the whole file


def test_range_ignored_mid_way_resumes_the_prefix_over_one_stream(hub, cache):
    hub.faults.append(Fault("ignore_range", skip=CONNECTIONS, times=1, path=NAME))
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.ranges) == (BIG_SHA, 1)
    assert ranges_asked(hub)[-1] == (f"bytes={got.resumed_from}-" if got.resumed_from else None)
    assert Path(got.local_path).read_bytes() == BIG and not record(cache).exists()


def test_etag_change_mid_way_deletes_the_partial_file(hub, cache):
    hub.faults.append(Fault("etag", skip=2, times=None, path=NAME))
    with pytest.raises(HubError, match="the file changed on the server during the download"):
        fetch(hub, cache)
    assert list(blobs(cache).iterdir()) == []  # its bytes are another file's: neither partial nor record
    hub.faults.clear()
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA


def test_429_on_one_connection_is_waited_out_there(hub, cache):
    hub.faults.append(Fault("throttle", skip=2, times=1, retry_after=0.2, path=NAME))
    got = fetch(hub, cache).files[0]
    assert got.sha256 == BIG_SHA
    asked = Counter(ranges_asked(hub))
    assert sorted(asked) == asked_for(SPANS)
    assert sorted(asked.values()) == [1] * (len(SPANS) - 1) + [2]  # the throttled range asked again, alone
    assert hub.stats.bytes_sent == SIZE


def test_corrupted_byte_in_one_range_is_caught_and_nothing_is_kept(hub, cache):
    hub.faults.append(Fault("corrupt", offset=SPANS[5][0] + 17, times=None, path=NAME))
    with pytest.raises(IntegrityError, match="sha256") as info:
        fetch(hub, cache)
    assert info.value.key == NAME
    assert list(blobs(cache).iterdir()) == []  # neither the partial file nor its record to resume from
    hub.faults.clear()
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA


def test_a_bad_byte_in_a_recorded_range_is_caught(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    data = bytearray(BIG)
    data[SPANS[2][0] + 3] ^= 0xFF  # on disk, in a range the record says is written
    partial(cache).write_bytes(data)
    RangeRecord(BIG_SHA, SIZE, [[start, end, end] for start, end in SPANS]).write(record(cache))
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(hub, cache)
    assert list(blobs(cache).iterdir()) == []
    assert ranges_asked(hub) == []  # a complete record needs no request


def test_a_connection_dropped_mid_range_resumes_that_range(hub, cache):
    hub.faults.append(Fault("drop", skip=1, after=100_000, path=NAME))
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.bytes_transferred) == (BIG_SHA, SIZE)  # nothing twice
    second = ranges_asked(hub)[1]
    start, end = (int(n) for n in second.removeprefix("bytes=").split("-"))
    assert f"bytes={start + 100_000}-{end}" in ranges_asked(hub)


# -- a child process killed with ranges in flight ------------------------------------------------

def _child(hub, cache) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ckpt_tools", "download", REPO, NAME, "--endpoint", hub.endpoint,
           "--cache-dir", str(cache), "--connections", str(CONNECTIONS), "--chunk-size", str(CHUNK),
           "--format", "json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recorded(cache) -> list[list[int]] | None:
    try:
        return json.loads(record(cache).read_text())["ranges"]
    except (FileNotFoundError, ValueError):
        return None


def test_kill_9_with_ranges_in_flight_then_resume(root, commit, cache):
    with HubServer(root, rate_limit=400_000) as slow:
        child = _child(slow, cache)
        deadline = time.monotonic() + 60
        while sum(upto - start for start, _, upto in _recorded(cache) or []) < SIZE // 3:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = _recorded(cache)
    kept = sum(upto - start for start, _, upto in left)
    assert SIZE // 3 <= kept < SIZE and not (blobs(cache) / BIG_SHA).exists()
    with HubServer(root) as hub:
        got = fetch(hub, cache).files[0]
        assert (got.sha256, got.resumed_from, got.bytes_transferred) == (BIG_SHA, kept, SIZE - kept)
        assert hub.stats.bytes_sent == SIZE - kept  # exactly what the record lacked
        assert sorted(ranges_asked(hub)) == sorted(f"bytes={upto}-{end - 1}" for _, end, upto in left if upto < end)
    assert Path(got.local_path).read_bytes() == BIG

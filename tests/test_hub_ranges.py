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
from ckpt_tools.render import human_bytes
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


def test_split_staggers_the_first_round_and_cuts_the_last_one_finer():
    mib, kib = 2**20, 2**10
    assert split(12 * mib, mib, 4) == (
        [(0, 256 * kib), (256 * kib, 768 * kib), (768 * kib, 1536 * kib), (1536 * kib, 2560 * kib)]  # 1/4 .. 4/4
        + [(2560 * kib + i * mib, 2560 * kib + (i + 1) * mib) for i in range(5)] + [(7680 * kib, 8 * mib)]
        + [(8 * mib + i * 128 * kib, 8 * mib + (i + 1) * 128 * kib) for i in range(32)])  # the last 4 MiB in 8ths


@pytest.mark.parametrize("size", [CHUNK + 1, SIZE, 10**7 + 12345, 3 * 10**8])
def test_split_tiles_the_file_with_ranges_no_larger_than_the_chunk(size):
    spans = split(size, CHUNK, CONNECTIONS)
    assert [start for start, _ in spans] == [0] + [end for _, end in spans[:-1]]
    assert spans[-1][1] == size
    assert max(end - start for start, end in spans) <= CHUNK
    assert len(spans) >= CONNECTIONS


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


def test_a_chunk_size_below_the_range_alignment_is_a_usage_error(hub, cache, run_cli):
    result = run_cli("download", REPO, NAME, "--endpoint", hub.endpoint, "--chunk-size", "1KB", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --chunk-size must be at least 64.00 KiB, not 1000 B;")


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
    assert got.notes[-1] == f"resumed: {human_bytes(kept)} an earlier run wrote were read back from disk to hash them"
    assert Path(got.local_path).read_bytes() == BIG and not record(cache).exists()


def test_dry_run_shows_what_a_record_keeps(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    partial(cache).write_bytes(bytes(SIZE))
    RangeRecord.fresh(EXPECT, SPANS, prefix=SPANS[2][0] + 10).write(record(cache))
    planned = plan_download(REPO, [NAME], endpoint=hub.endpoint, cache_dir=cache, retry=FAST,
                            connections=CONNECTIONS, chunk_size=CHUNK).files[0]
    kept = SPANS[2][0] + 10
    assert (planned.action, planned.partial_bytes, planned.to_fetch) == ("resume", kept, SIZE - kept)
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
    kept = SPANS[2][0] + 100  # inside the third range
    partial(cache).write_bytes(BIG[:kept])  # what one stream leaves
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.resumed_from, got.bytes_transferred) == (BIG_SHA, kept, SIZE - kept)
    assert f"bytes={kept}-{SPANS[2][1] - 1}" in ranges_asked(hub)


def test_a_record_is_resumed_whatever_the_new_settings(hub, cache):
    partial(cache).parent.mkdir(parents=True)
    ranges = [[start, end, start] for start, end in SPANS]
    ranges[0][2] = SPANS[0][1]  # the first range complete, the fourth one too, the sixth one half
    ranges[3][2] = SPANS[3][1]
    ranges[5][2] = (SPANS[5][0] + SPANS[5][1]) // 2
    data = bytearray(SIZE)
    for start, _, upto in ranges:
        data[start:upto] = BIG[start:upto]
    partial(cache).write_bytes(data)
    RangeRecord(BIG_SHA, SIZE, ranges).write(record(cache))
    kept = sum(upto - start for start, _, upto in ranges)
    got = fetch(hub, cache, connections=1, chunk_size=SIZE).files[0]  # one stream now: its ranges still count
    assert (got.sha256, got.ranges, got.connections) == (BIG_SHA, len(SPANS), 1)
    assert (got.resumed_from, hub.stats.bytes_sent) == (kept, SIZE - kept)


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
    hub.faults.append(Fault("drop", skip=1, after=30_000, path=NAME))  # the smallest range is 64 KiB
    got = fetch(hub, cache).files[0]
    assert (got.sha256, got.bytes_transferred) == (BIG_SHA, SIZE)  # nothing twice
    dropped = ranges_asked(hub)[1]
    start, end = (int(n) for n in dropped.removeprefix("bytes=").split("-"))
    assert f"bytes={start + 30_000}-{end}" in ranges_asked(hub)


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


def test_connections_are_capped_across_files(root, cache):
    other = random.Random(17).randbytes(SIZE)
    publish(root, REPO, {NAME: BIG, "other.bin": other})
    with HubServer(root, rate_limit=2_000_000) as hub:  # slow enough that the two files overlap
        result = download(REPO, [NAME, "other.bin"], endpoint=hub.endpoint, cache_dir=cache, connections=3,
                          chunk_size=CHUNK, retry=FAST, max_workers=2)
    assert [f.sha256 for f in result.files] == [BIG_SHA, hashlib.sha256(other).hexdigest()]
    assert [(f.ranges, f.connections) for f in result.files] == [(len(split(SIZE, CHUNK, 3)), 3)] * 2
    assert hub.stats.peak_active == 3  # six range workers, three connections at once

"""`ckpt download` against the local mirror, healthy and with injected faults."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_for

from ckpt_tools.errors import HubError, IntegrityError, UsageError
from ckpt_tools.http import RetryPolicy
from ckpt_tools.hub import DownloadResult, download
from ckpt_tools.server import Fault, HubServer, publish

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, timeout=10)
CONFIG = b'{"hidden_size": 8}'
BIG = hashlib.sha256(b"seed").digest() * (3 * 2 ** 20 // 32)  # 3 MiB, deterministic
BIG_SHA = hashlib.sha256(BIG).hexdigest()
REPO = "org/model"


@pytest.fixture
def commit(root):
    return publish(root, REPO, {"config.json": CONFIG, "weights/model.bin": BIG})


def fetch(hub, cache, files=("weights/model.bin",), **kw) -> DownloadResult:
    return download(REPO, list(files), endpoint=hub.endpoint, cache_dir=cache, retry=kw.pop("retry", FAST), **kw)


def blob(cache, sha=BIG_SHA) -> Path:
    return cache / "models--org--model" / "blobs" / sha


def gets(hub, needle="model.bin"):
    return [(path, rng) for method, path, rng in hub.stats.requests if method == "GET" and needle in path]


def test_download_writes_the_standard_cache_layout(hub, commit, cache):
    from huggingface_hub import hf_hub_download

    result = fetch(hub, cache, files=("config.json", "weights/model.bin"))
    assert result.to_dict() == {
        "repo_id": REPO, "revision": "main", "commit": commit,
        "files": [
            {"path": "config.json", "local_path": str(cache / f"models--org--model/snapshots/{commit}/config.json"),
             "size": len(CONFIG), "sha256": hashlib.sha256(CONFIG).hexdigest(), "bytes_transferred": len(CONFIG),
             "resumed_from": 0, "ranges": 1, "connections": 1, "notes": []},
            {"path": "weights/model.bin",
             "local_path": str(cache / f"models--org--model/snapshots/{commit}/weights/model.bin"),
             "size": len(BIG), "sha256": BIG_SHA, "bytes_transferred": len(BIG), "resumed_from": 0,
             "ranges": 1, "connections": 1, "notes": []},
        ]}
    pointer = Path(result.files[1].local_path)
    assert os.readlink(pointer) == f"../../../blobs/{BIG_SHA}"
    assert (cache / "models--org--model" / "refs" / "main").read_text() == commit
    offline = hf_hub_download(REPO, "weights/model.bin", cache_dir=cache, local_files_only=True)
    assert offline == str(pointer) and Path(offline).read_bytes() == BIG
    assert not list((cache / "models--org--model" / "blobs").glob("*.incomplete"))


def test_all_files_of_the_revision_when_none_named(hub, cache):
    result = fetch(hub, cache, files=())
    assert [f.path for f in result.files] == ["config.json", "weights/model.bin"]


def test_second_call_transfers_nothing(hub, cache):
    fetch(hub, cache)
    again = fetch(hub, cache)
    assert (again.files[0].bytes_transferred, again.files[0].sha256) == (0, BIG_SHA)
    assert len(gets(hub)) == 1


def test_connection_dropped_mid_body_resumes_with_range(hub, cache):
    hub.faults.append(Fault("drop", after=1_000_000, path="model.bin"))
    result = fetch(hub, cache)
    assert result.files[0].sha256 == BIG_SHA and blob(cache).read_bytes() == BIG
    assert gets(hub) == [(f"/org/model/resolve/{result.commit}/weights/model.bin", None),
                         (f"/org/model/resolve/{result.commit}/weights/model.bin", "bytes=1000000-")]
    assert result.files[0].bytes_transferred == len(BIG)  # 1 MB + the rest, nothing twice


def test_5xx_then_success(hub, cache):
    hub.faults.append(Fault("status", status=503, times=2, path="model.bin"))
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA
    assert len(gets(hub)) == 3


def test_5xx_on_head_is_retried_too(hub, cache):
    hub.faults.append(Fault("status", status=500, times=2, methods=("HEAD",), path="model.bin"))
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA


def test_429_honours_retry_after(hub, cache, monkeypatch):
    waits = []
    real = RetryPolicy.delay

    def delay(self, attempt, retry_after=None):
        waits.append(real(self, attempt, retry_after))
        return waits[-1]

    monkeypatch.setattr(RetryPolicy, "delay", delay)
    hub.faults.append(Fault("throttle", retry_after=0.4, path="model.bin"))
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA
    assert waits == [0.4]  # FAST's own backoff is 0.01 s: the wait is the server's Retry-After


def test_retries_are_bounded(hub, cache):
    hub.faults.append(Fault("status", status=502, times=None, path="model.bin"))
    with pytest.raises(HubError, match="after 4 attempts"):
        fetch(hub, cache)
    assert len(gets(hub)) == 4
    assert not blob(cache).exists()


def test_resume_from_a_partial_file_left_by_an_earlier_run(hub, cache):
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[:1234567])
    result = fetch(hub, cache)
    assert (result.files[0].resumed_from, result.files[0].bytes_transferred) == (1234567, len(BIG) - 1234567)
    assert gets(hub)[0][1] == "bytes=1234567-"
    assert blob(cache).read_bytes() == BIG and not partial.exists()


def test_a_resume_answered_at_the_wrong_offset_is_refused_at_once(hub, commit, cache):
    """A 206 whose Content-Range does not start where the partial file ends is refused on its
    header: none of its body is written, and the retry starts over cleanly (a server that
    mislabels one range may mislabel every one)."""
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[:1234567])
    hub.faults.append(Fault("bad_range", path="model.bin"))
    result = fetch(hub, cache)
    url = f"/org/model/resolve/{commit}/weights/model.bin"
    assert gets(hub) == [(url, "bytes=1234567-"), (url, None)]
    assert (result.files[0].resumed_from, result.files[0].bytes_transferred) == (0, len(BIG))
    assert blob(cache).read_bytes() == BIG


def test_range_ignored_restarts_cleanly(hub, cache):
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[:1000])
    hub.faults.append(Fault("ignore_range", path="model.bin"))
    result = fetch(hub, cache)
    assert (result.files[0].resumed_from, result.files[0].bytes_transferred) == (0, len(BIG))
    assert blob(cache).read_bytes() == BIG


def test_corrupted_byte_is_an_integrity_error_and_never_a_blob(hub, cache):
    hub.faults.append(Fault("corrupt", offset=2_000_000, path="model.bin"))
    with pytest.raises(IntegrityError, match="sha256") as info:
        fetch(hub, cache)
    assert info.value.exit_code == 1 and info.value.key == "weights/model.bin"
    blobs = cache / "models--org--model" / "blobs"
    assert list(blobs.iterdir()) == []  # neither the blob nor a partial to resume from
    assert not (cache / "models--org--model" / "snapshots").exists()
    assert fetch(hub, cache).files[0].sha256 == BIG_SHA  # the next run starts over and succeeds


def test_a_small_file_is_checked_against_its_git_blob_sha1():
    """The hub's ETag of a small non-LFS file is its git blob sha1 (no sha256 is promised)."""
    from ckpt_tools.hub.transfer import Expect, Hashers

    sha1 = hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()
    good, bad = Hashers(Expect(sha1, len(CONFIG), None, sha1)), Hashers(Expect(sha1, len(CONFIG), None, sha1))
    good.update(CONFIG)
    bad.update(CONFIG.replace(b"8", b"9"))
    assert good.problems(len(CONFIG)) == []
    assert [p.split(" ")[:2] for p in bad.problems(len(CONFIG))] == [["git", "sha1"]]


def test_bad_partial_prefix_is_caught_by_the_hash(hub, cache):
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 5000)
    with pytest.raises(IntegrityError):
        fetch(hub, cache)
    assert not partial.exists() and not blob(cache).exists()


def test_corrupt_download_via_cli_exits_1(hub, cache, run_cli):
    hub.faults.append(Fault("corrupt", offset=10, path="model.bin"))
    result = run_cli("download", REPO, "weights/model.bin", "--endpoint", hub.endpoint, "--cache-dir", cache)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: org/model@") and "weights/model.bin" in result.stderr


def test_missing_file_is_a_one_line_error(hub, cache, run_cli):
    result = run_cli("download", REPO, "nope.bin", "--endpoint", hub.endpoint, "--cache-dir", cache)
    assert result.exit_code == 2
    assert result.stderr == ("error: org/model: key 'nope.bin': no file 'nope.bin' at revision 'main'; "
                             "fix: list the repo's files (ckpt download org/model --dry-run), or check the revision\n")


def test_cli_json_output(hub, commit, cache, run_cli):
    result = run_cli("download", REPO, "config.json", "--endpoint", hub.endpoint, "--cache-dir", cache,
                     "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["repo_id"], data["revision"], data["commit"]) == (REPO, "main", commit)
    assert data["files"][0]["sha256"] == hashlib.sha256(CONFIG).hexdigest()
    assert sorted(data["files"][0]) == ["bytes_transferred", "connections", "local_path", "notes", "path", "ranges",
                                        "resumed_from", "sha256", "size"]


def test_branch_moving_between_calls_and_the_lock(root, hub, commit, cache, tmp_path, run_cli):
    lock = tmp_path / "model.lock"
    first = fetch(hub, cache, lock=lock)
    assert json.loads(lock.read_text()) == {
        "repo": REPO, "revision": "main", "commit": commit,
        "files": [{"path": "weights/model.bin", "size": len(BIG), "sha256": BIG_SHA}]}
    moved = publish(root, REPO, {"config.json": CONFIG, "weights/model.bin": BIG[::-1]})
    second = fetch(hub, cache)
    assert (first.commit, second.commit) == (commit, moved)
    assert Path(second.files[0].local_path).read_bytes() == BIG[::-1]
    assert (cache / "models--org--model" / "refs" / "main").read_text() == moved
    # --locked fetches the locked commit although main has moved (into a fresh cache: over the wire)
    fresh = tmp_path / "fresh"
    result = run_cli("download", REPO, "--lock", lock, "--locked", "--endpoint", hub.endpoint,
                     "--cache-dir", fresh, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["commit"] == commit and data["files"][0]["sha256"] == BIG_SHA
    assert Path(data["files"][0]["local_path"]).read_bytes() == BIG


def test_locked_and_cached_needs_no_network(hub, cache, tmp_path):
    lock = tmp_path / "model.lock"
    fetch(hub, cache, lock=lock)
    hub.stop()
    result = download(REPO, lock=lock, locked=True, cache_dir=cache, endpoint="http://127.0.0.1:9", retry=FAST)
    assert (result.files[0].sha256, result.files[0].bytes_transferred) == (BIG_SHA, 0)


def test_locked_fails_when_the_server_bytes_differ(hub, cache, tmp_path, run_cli):
    lock = tmp_path / "model.lock"
    fetch(hub, cache, lock=lock)
    data = json.loads(lock.read_text())
    data["files"][0]["sha256"] = "0" * 64
    lock.write_text(json.dumps(data))
    result = run_cli("download", REPO, "--lock", lock, "--locked", "--endpoint", hub.endpoint,
                     "--cache-dir", tmp_path / "fresh")
    assert result.exit_code == 1
    assert "differs from the lock" in result.stderr
    assert not list((tmp_path / "fresh").rglob("model.bin"))


def test_locked_needs_a_lock_file(run_cli):
    result = run_cli("download", REPO, "--locked")
    assert result.exit_code == 2 and "--locked needs --lock FILE" in result.stderr


def test_lock_for_another_repo_is_refused(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"repo": "a/b", "revision": "main", "commit": "c" * 40, "files": []}))
    with pytest.raises(UsageError, match="for a/b, not org/model"):
        download(REPO, lock=lock, locked=True)


def test_the_branch_is_resolved_once_per_call(root, hub, commit, cache):
    moved = []

    def move_branch(method, path):
        moved.append(publish(root, REPO, {"config.json": b"{}", "weights/model.bin": b"new"}))

    hub.faults.append(Fault("call", methods=("GET",), callback=move_branch))
    result = fetch(hub, cache, files=("weights/model.bin", "config.json"), max_workers=1)
    assert moved and result.commit == commit
    assert [Path(f.local_path).read_bytes() for f in result.files] == [BIG, CONFIG]
    later = [(method, path) for method, path, _ in hub.stats.requests[1:]]
    assert later == [("HEAD", f"/org/model/resolve/{commit}/config.json"),  # the first HEAD pinned the commit
                     ("GET", f"/org/model/resolve/{commit}/weights/model.bin"),
                     ("GET", f"/org/model/resolve/{commit}/config.json")]


def test_local_dir_is_recognised_by_huggingface_hub(hub, commit, tmp_path):
    from huggingface_hub import hf_hub_download

    local = tmp_path / "local"
    result = download(REPO, ["weights/model.bin"], local_dir=local, endpoint=hub.endpoint, retry=FAST)
    assert result.files[0].local_path == str(local / "weights" / "model.bin")
    assert (local / "weights" / "model.bin").read_bytes() == BIG
    before = len(gets(hub))
    path = hf_hub_download(REPO, "weights/model.bin", revision=commit, local_dir=local, endpoint=hub.endpoint)
    assert path == str(local / "weights" / "model.bin") and len(gets(hub)) == before


TOKEN = "hf_secret_test_token"


@pytest.fixture
def cdn(root, commit):
    """The same files served from another host (127.0.0.2 is loopback, but not the hub's host)."""
    with HubServer(root, host="127.0.0.2") as server:
        yield server


def auth(server, method="GET", needle="model.bin") -> list[str | None]:
    """The Authorization header of each matching request, in order (None: not sent)."""
    with server.stats.lock:
        seen = list(zip(server.stats.requests, server.stats.headers, strict=True))
    return [headers.get("authorization") for (m, path, _), headers in seen if m == method and needle in path]


def test_a_download_redirected_to_another_host_never_carries_the_token(hub, cdn, cache):
    hub.faults.append(Fault("redirect", times=None, methods=("HEAD",), path="model.bin", location=cdn.endpoint))
    result = fetch(hub, cache, token=TOKEN)
    assert result.files[0].sha256 == BIG_SHA
    assert auth(hub, "HEAD") == [f"Bearer {TOKEN}"]  # the hub itself gets the token
    assert auth(cdn) == [None]


def test_a_redirect_met_during_the_get_drops_the_token_too(hub, cdn, cache):
    hub.faults.append(Fault("redirect", methods=("GET",), path="model.bin", location=cdn.endpoint))
    assert fetch(hub, cache, token=TOKEN).files[0].sha256 == BIG_SHA
    assert auth(hub) == [f"Bearer {TOKEN}"]
    assert auth(cdn) == [None]


def test_a_download_redirected_to_the_same_host_keeps_the_token(hub, cache):
    hub.faults.append(Fault("redirect", methods=("HEAD",), path="model.bin", location=hub.endpoint))
    hub.faults.append(Fault("redirect", methods=("GET",), path="model.bin", location=hub.endpoint))
    assert fetch(hub, cache, token=TOKEN).files[0].sha256 == BIG_SHA
    assert auth(hub, "HEAD") == [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]  # the redirect, then its target
    assert auth(hub) == [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


def _cli_child(hub, cache, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ckpt_tools", "download", REPO, "weights/model.bin", "--endpoint", hub.endpoint,
           "--cache-dir", str(cache), "--format", "json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_download_then_resume(hub, cache):
    hub.faults.append(Fault("slow", rate=1_500_000, times=None, path="model.bin"))
    child = _cli_child(hub, cache)
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")
    deadline = time.monotonic() + 60
    while (not partial.exists() or partial.stat().st_size < 1_000_000) and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    left = partial.stat().st_size
    assert 0 < left < len(BIG) and not blob(cache).exists()
    hub.faults.clear()
    wait_for(lambda: hub.stats.active == 0)  # the server gave up the dead connection: its count is final
    sent_before = hub.stats.bytes_sent
    result = fetch(hub, cache)
    assert result.files[0].resumed_from == left
    assert result.files[0].bytes_transferred == len(BIG) - left
    assert hub.stats.bytes_sent - sent_before == len(BIG) - left
    assert blob(cache).read_bytes() == BIG


def test_two_processes_download_the_same_file(hub, cache):
    hub.faults.append(Fault("slow", rate=1_500_000, times=None, path="model.bin"))
    children = [_cli_child(hub, cache) for _ in range(2)]
    outputs = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out)["files"][0] for out, _ in outputs]
    assert [r["sha256"] for r in results] == [BIG_SHA, BIG_SHA]
    assert sorted(r["bytes_transferred"] for r in results) == [0, len(BIG)]
    assert hub.stats.bytes_sent == len(BIG)
    assert blob(cache).read_bytes() == BIG


def test_a_call_that_forgets_the_mirror_is_refused_on_loopback(cache):
    """tests/conftest.py points HF_ENDPOINT at a closed loopback port: nothing reaches the real hub."""
    with pytest.raises(HubError, match="Connection refused") as info:
        download(REPO, ["config.json"], cache_dir=cache, retry=RetryPolicy(attempts=1))
    assert str(info.value).startswith("HEAD http://127.0.0.1:9/org/model/resolve/main/config.json failed")


def test_download_help_has_example(run_cli):
    result = run_cli("download", "--help")
    assert result.exit_code == 0 and "Example:" in result.stdout and "--locked" in result.stdout


def test_retry_policy_delays():
    policy = RetryPolicy(base_delay=1, max_delay=8, jitter=0)
    assert [policy.delay(n) for n in range(5)] == [1, 2, 4, 8, 8]
    assert policy.delay(0, retry_after=5) == 5
    assert RetryPolicy(base_delay=1, jitter=0.5).delay(0) <= 1.5


def test_complete_partial_is_verified_and_placed_without_a_get(hub, cache):
    partial = blob(cache).with_name(f"{BIG_SHA}.incomplete")  # killed between the last write and the rename
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG)
    result = fetch(hub, cache)
    assert (result.files[0].resumed_from, result.files[0].bytes_transferred) == (len(BIG), 0)
    assert gets(hub) == [] and blob(cache).read_bytes() == BIG


def test_cache_dir_and_local_dir_together_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("download", REPO, "--cache-dir", tmp_path / "a", "--local-dir", tmp_path / "b")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_dry_run_pins_and_plans_without_writing(hub, commit, cache, run_cli):
    result = run_cli("download", REPO, "config.json", "weights/model.bin", "--endpoint", hub.endpoint,
                     "--cache-dir", cache, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["commit"], plan["bytes_to_fetch"]) == (commit, len(CONFIG) + len(BIG))
    assert [(f["path"], f["action"], f["size"]) for f in plan["files"]] == [
        ("config.json", "fetch", len(CONFIG)), ("weights/model.bin", "fetch", len(BIG))]
    assert not cache.exists()
    assert gets(hub, "") == []


def test_dry_run_shows_what_is_cached_and_what_resumes(hub, commit, cache):
    from ckpt_tools.hub import plan_download

    fetch(hub, cache, files=("config.json",))
    partial = cache / "models--org--model" / "blobs" / f"{BIG_SHA}.incomplete"
    partial.write_bytes(BIG[:1000])
    plan = plan_download(REPO, ["config.json", "weights/model.bin"], endpoint=hub.endpoint, cache_dir=cache,
                         retry=FAST)
    assert [(f.path, f.action, f.to_fetch) for f in plan.files] == [
        ("config.json", "cached", 0), ("weights/model.bin", "resume", len(BIG) - 1000)]
    assert plan.bytes_to_fetch == len(BIG) - 1000

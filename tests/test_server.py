"""`ckpt serve`: the unmodified huggingface_hub client and transformers against the local mirror."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from ckpt_tools.errors import UsageError
from ckpt_tools.server import HubServer, TokenBucket, parse_rate, publish

CONFIG = b'{"model_type": "gpt2", "n_layer": 1}'
WEIGHTS = bytes(range(256)) * 40  # 10240 bytes, a ".bin" so served as an LFS file


@pytest.fixture
def repo(root):
    commit = publish(root, "org/tiny", {"config.json": CONFIG, "sub/weights.bin": WEIGHTS}, tag="v1.0")
    return commit


@pytest.fixture
def hub(root, repo):
    with HubServer(root) as server:
        yield server


def test_hf_hub_download_by_branch_tag_and_commit(hub, repo, tmp_path):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "cache"
    for revision in ("main", "v1.0", repo):
        path = hf_hub_download("org/tiny", "sub/weights.bin", revision=revision, endpoint=hub.endpoint,
                               cache_dir=cache)
        assert Path(path).read_bytes() == WEIGHTS
        assert os.readlink(path) == f"../../../blobs/{hashlib.sha256(WEIGHTS).hexdigest()}"
        assert f"snapshots/{repo}/sub/weights.bin" in path
    assert (cache / "models--org--tiny" / "refs" / "v1.0").read_text() == repo


def test_percent_encoded_revision_with_slash(root, tmp_path):
    from huggingface_hub import hf_hub_download

    commit = publish(root, "org/pr", {"config.json": CONFIG}, branch="refs/pr/1")
    with HubServer(root) as server:
        path = hf_hub_download("org/pr", "config.json", revision="refs/pr/1", endpoint=server.endpoint,
                               cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == CONFIG
        assert ("HEAD", "/org/pr/resolve/refs%2Fpr%2F1/config.json", None) in server.stats.requests
    assert commit in path


def test_snapshot_download_and_list_repo_files(hub, repo, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    folder = Path(snapshot_download("org/tiny", endpoint=hub.endpoint, cache_dir=tmp_path / "cache"))
    assert folder.name == repo
    assert (folder / "config.json").read_bytes() == CONFIG
    assert (folder / "sub" / "weights.bin").read_bytes() == WEIGHTS
    api = HfApi(endpoint=hub.endpoint)
    assert api.list_repo_files("org/tiny") == ["config.json", "sub/weights.bin"]
    assert api.repo_info("org/tiny", revision="v1.0").sha == repo


def test_tree_api_entries_sizes_oids_and_lfs(hub, repo):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint)
    top = {e.path: e for e in api.list_repo_tree("org/tiny")}
    assert sorted(top) == ["config.json", "sub"]
    config = top["config.json"]
    assert config.size == len(CONFIG) and config.lfs is None
    assert config.blob_id == hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()  # git hash-object
    (weights,) = api.list_repo_tree("org/tiny", path_in_repo="sub", revision=repo)
    assert weights.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest() and weights.lfs.size == len(WEIGHTS)
    deep = sorted(e.path for e in api.list_repo_tree("org/tiny", recursive=True))
    assert deep == ["config.json", "sub", "sub/weights.bin"]


def test_missing_folder_in_tree_is_a_clean_404(hub):
    resp = requests.get(f"{hub.endpoint}/api/models/org/tiny/tree/main/additional_chat_templates")
    assert resp.status_code == 404
    assert resp.headers["X-Error-Code"] == "EntryNotFound"


@pytest.mark.parametrize(("url", "code"), [
    ("/org/nope/resolve/main/config.json", "RepoNotFound"),
    ("/org/tiny/resolve/nope/config.json", "RevisionNotFound"),
    ("/org/tiny/resolve/main/nope.json", "EntryNotFound"),
    ("/api/models/org/nope/revision/main", "RepoNotFound"),
    ("/api/models/org/tiny/revision/nope", "RevisionNotFound"),
])
def test_404s_carry_the_error_code(hub, url, code):
    for method in ("HEAD", "GET"):
        resp = requests.request(method, hub.endpoint + url)
        assert (resp.status_code, resp.headers.get("X-Error-Code")) == (404, code)


def test_client_errors_are_the_hub_client_exceptions(hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    for repo_id, revision, filename, error in [("org/nope", "main", "config.json", RepositoryNotFoundError),
                                               ("org/tiny", "nope", "config.json", RevisionNotFoundError),
                                               ("org/tiny", "main", "nope.json", EntryNotFoundError)]:
        with pytest.raises(error):
            hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path)


def test_head_headers(hub, repo):
    resp = requests.head(f"{hub.endpoint}/org/tiny/resolve/main/sub/weights.bin")
    assert resp.status_code == 200
    assert resp.headers["ETag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert resp.headers["X-Repo-Commit"] == repo
    assert resp.headers["Content-Length"] == str(len(WEIGHTS))
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert not [h for h in resp.headers if h.lower().startswith("x-xet")]


@pytest.mark.parametrize(("header", "status", "content_range", "body"), [
    ("bytes=10-19", 206, f"bytes 10-19/{len(WEIGHTS)}", WEIGHTS[10:20]),
    ("bytes=10240-", 416, f"bytes */{len(WEIGHTS)}", b""),
    ("bytes=-5", 206, f"bytes {len(WEIGHTS) - 5}-{len(WEIGHTS) - 1}/{len(WEIGHTS)}", WEIGHTS[-5:]),
    ("bytes=10000-99999", 206, f"bytes 10000-10239/{len(WEIGHTS)}", WEIGHTS[10000:]),
])
def test_range_requests(hub, header, status, content_range, body):
    resp = requests.get(f"{hub.endpoint}/org/tiny/resolve/main/sub/weights.bin", headers={"Range": header})
    assert (resp.status_code, resp.headers["Content-Range"], resp.content) == (status, content_range, body)


def test_if_range_with_another_etag_sends_the_whole_file(hub):
    resp = requests.get(f"{hub.endpoint}/org/tiny/resolve/main/sub/weights.bin",
                        headers={"Range": "bytes=10-", "If-Range": '"0000"'})
    assert resp.status_code == 200 and resp.content == WEIGHTS


@pytest.mark.parametrize("path", [
    "/org/tiny/resolve/main/../../../etc/passwd",
    "/org/tiny/resolve/main/sub/..%2F..%2F..%2Fetc%2Fpasswd",
    "/org/tiny/resolve/..%2F..%2F/config.json",
    "/api/models/org/tiny/tree/main/..%2F..",
])
def test_path_traversal_is_rejected(hub, path):
    conn = http.client.HTTPConnection(hub.host, hub.port, timeout=5)
    conn.request("GET", path)  # sent verbatim: no client-side dot-segment removal
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status in (400, 404), body
    assert b"root:" not in body


def test_symlink_out_of_the_repo_is_refused(root, repo, hub, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, root / "models--org--tiny" / "snapshots" / repo / "leak.txt")
    resp = requests.get(f"{hub.endpoint}/org/tiny/resolve/main/leak.txt")
    assert resp.status_code == 403 and b"secret" not in resp.content


def test_blob_named_by_git_sha1_gets_a_sha256_etag(root):
    """A cache filled by huggingface_hub names small non-LFS blobs by their git sha1."""
    folder = root / "models--org--gitblob"
    sha1 = hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / sha1).write_bytes(CONFIG)
    commit = "a" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    os.symlink(f"../../blobs/{sha1}", folder / "snapshots" / commit / "config.json")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    with HubServer(root) as server:
        resp = requests.head(f"{server.endpoint}/org/gitblob/resolve/main/config.json")
        assert resp.headers["ETag"] == f'"{hashlib.sha256(CONFIG).hexdigest()}"'
        assert resp.headers["X-Repo-Commit"] == commit


def test_concurrent_clients(hub):
    results: list[bytes] = []

    def fetch(i: int) -> None:
        resp = requests.get(f"{hub.endpoint}/org/tiny/resolve/main/sub/weights.bin",
                            headers={"Range": f"bytes={i * 1000}-{i * 1000 + 999}"})
        results.append((i, resp.content))

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(i, WEIGHTS[i * 1000:i * 1000 + 1000]) for i in range(8)]


def test_binds_loopback_by_default(root):
    server = HubServer(root)
    try:
        assert server.host == "127.0.0.1" and server.endpoint.startswith("http://127.0.0.1:")
    finally:
        server._server.server_close()


def test_transformers_from_pretrained_through_hf_endpoint(root, tmp_path):
    """transformers reads HF_ENDPOINT at import, hence the child process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    saved = tmp_path / "saved"
    GPT2LMHeadModel(config).save_pretrained(saved)
    publish(root, "org/gpt", {p.name: p for p in saved.iterdir()})
    script = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "c = AutoConfig.from_pretrained('org/gpt')\n"
        "m = AutoModelForCausalLM.from_pretrained('org/gpt')\n"
        "print(c.n_embd, sum(p.numel() for p in m.parameters()))\n"
    )
    with HubServer(root) as server:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "home")}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = sum(p.numel() for p in GPT2LMHeadModel(config).parameters())
    assert proc.stdout.split() == ["16", str(params)]


def test_ckpt_serve_command(root, repo):
    proc = subprocess.Popen([sys.executable, "-m", "ckpt_tools", "serve", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        endpoint = line.split(" at ")[1].split()[0]
        assert endpoint.startswith("http://127.0.0.1:")
        info = requests.get(f"{endpoint}/api/models/org/tiny/revision/main", timeout=10).json()
        assert info["sha"] == repo
        assert [s["rfilename"] for s in info["siblings"]] == ["config.json", "sub/weights.bin"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ckpt_serve_help_has_example(run_cli):
    result = run_cli("serve", "--help")
    assert result.exit_code == 0 and "Example:" in result.stdout and "127.0.0.1" in result.stdout


def test_publish_writes_the_cache_layout(root, repo):
    folder = root / "models--org--tiny"
    assert (folder / "refs" / "main").read_text() == repo
    assert (folder / "refs" / "v1.0").read_text() == repo
    link = folder / "snapshots" / repo / "sub" / "weights.bin"
    assert os.readlink(link) == f"../../../blobs/{hashlib.sha256(WEIGHTS).hexdigest()}"
    assert json.loads(link.with_name("x").parent.parent.joinpath("config.json").read_bytes()) == json.loads(CONFIG)


def test_the_same_files_on_the_same_parent_are_the_same_commit(tmp_path):
    first = publish(tmp_path / "a", "org/m", {"config.json": b"{}", "w.bin": b"weights"})
    again = publish(tmp_path / "b", "org/m", {"config.json": b"{}", "w.bin": b"weights"})
    assert first == again


def test_a_commit_on_top_of_another_is_new_even_with_old_content(tmp_path):
    first = publish(tmp_path, "org/m", {"w.bin": b"one"})
    publish(tmp_path, "org/m", {"w.bin": b"two"})
    back = publish(tmp_path, "org/m", {"w.bin": b"one"})
    assert back != first


@pytest.mark.parametrize(("text", "rate"), [("20MB/s", 20e6), ("1.5MiB/s", 1.5 * 2**20), ("500 KB / s", 500e3),
                                            ("1000", 1000.0), (250_000, 250_000.0), (None, None)])
def test_rate_limit_is_a_size_per_second(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "20MB/min", "-1MB/s", 0])
def test_bad_rate_limit_is_a_usage_error(text):
    with pytest.raises(UsageError, match="invalid rate"):
        parse_rate(text)


def test_token_bucket_lets_a_burst_through_then_paces():
    now, slept = [100.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(1_000_000, clock=lambda: now[0], sleep=sleep)
    assert bucket.burst == 10_000  # a send every 10 ms
    bucket.take(10_000)
    assert slept == []  # a full bucket: at once
    bucket.take(10_000)
    assert slept == [0.01]  # then 10 ms for 10 kB at 1 MB/s
    now[0] += 1.0  # idle a second: the bucket refills to one burst, no more
    bucket.take(10_000)
    bucket.take(5_000)
    assert slept == [0.01, 0.005]


def test_rate_limited_server_sends_the_same_bytes(root, repo):
    with HubServer(root, rate_limit="2MB/s") as hub:
        url = f"{hub.endpoint}/org/tiny/resolve/main/sub/weights.bin"
        assert requests.get(url, timeout=10).content == WEIGHTS
        ranged = requests.get(url, headers={"Range": "bytes=100-4099"}, timeout=10)
        assert (ranged.status_code, ranged.content) == (206, WEIGHTS[100:4100])
        assert hub.rate_limit == 2e6


def test_ckpt_serve_rate_limit_is_announced(root, repo):
    proc = subprocess.Popen([sys.executable, "-m", "ckpt_tools", "serve", str(root), "--port", "0",
                             "--rate-limit", "20MB/s"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.endswith("; 20 MB/s per connection\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ckpt_serve_bad_rate_limit_exits_2(root, run_cli):
    result = run_cli("serve", root, "--rate-limit", "fast")
    assert result.exit_code == 2
    assert result.stderr == "error: invalid rate 'fast'; fix: write e.g. 20MB/s, 500KiB/s or bytes per second\n"


def test_a_port_in_use_is_one_usage_error(hub, root):
    with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
        HubServer(root, port=hub.port)


def test_a_port_out_of_range_is_a_usage_error(root):
    with pytest.raises(UsageError, match="is not a TCP port"):
        HubServer(root, port=70000)


def test_the_served_repos_are_listed(hub):
    assert hub.repos() == ["org/tiny"]


def test_serving_a_folder_without_repos_warns(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ckpt_tools.cli", "serve", str(tmp_path), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stderr.readline()
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert first.startswith(f"warning: {tmp_path.resolve()} holds no models--ORG--NAME folder")

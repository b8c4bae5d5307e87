"""Remote inspection: hf:// references read by HTTP ranges from the local mirror."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ckpt_tools.errors import UsageError
from ckpt_tools.formats import open_checkpoint
from ckpt_tools.http import RangeFile, RetryPolicy
from ckpt_tools.server import Fault, HubServer, publish
from ckpt_tools.sources import HfReference, open_remote_file, parse_hf_reference

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, timeout=10)
SHAPES = {f"blocks.{i}.weight": (512, 512) for i in range(12)} | {"embed.weight": (64, 32)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A ~12 MiB .pt (zip) and .safetensors of the same tensors, served by the mirror."""
    folder = tmp_path_factory.mktemp("remote")
    state = {name: torch.full(shape, float(i)) for i, (name, shape) in enumerate(SHAPES.items())}
    torch.save(state, folder / "model.pt")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    root = folder / "served"
    commit = publish(root, "org/big", {"model.pt": folder / "model.pt",
                                       "model.safetensors": folder / "model.safetensors"}, tag="v1")
    with HubServer(root) as server:
        yield server, commit, folder


@pytest.mark.parametrize(("ref", "expected"), [
    ("hf://org/name/checkpoint.pt", HfReference("org/name", "main", "checkpoint.pt")),
    ("hf://org/name@v1.0/sub/model.safetensors", HfReference("org/name", "v1.0", "sub/model.safetensors")),
    ("hf://org/name@refs%2Fpr%2F3/model.bin", HfReference("org/name", "refs/pr/3", "model.bin")),
])
def test_parse_hf_reference(ref, expected):
    assert parse_hf_reference(ref) == expected


@pytest.mark.parametrize("ref", ["hf://org/checkpoint.pt", "org/name/x.pt", "hf://org/name/../x.pt", "hf://org/name@v1"])
def test_parse_hf_reference_rejects(ref):
    with pytest.raises(UsageError, match="hf://ORG/NAME|'..'"):
        parse_hf_reference(ref)


@pytest.mark.parametrize("filename", ["model.pt", "model.safetensors"])
def test_open_remote_reads_under_one_percent(served, filename):
    server, commit, folder = served
    size = (folder / filename).stat().st_size
    with open_checkpoint(f"hf://org/big@v1/{filename}", endpoint=server.endpoint, retry=FAST) as ckpt:
        assert {k: tuple(ckpt.meta(k).shape) for k in ckpt.keys()} == SHAPES
        assert {ckpt.meta(k).dtype for k in ckpt.keys()} == {"F32"}
        assert 0 < ckpt.bytes_read < size / 100
        assert any(commit in note for note in ckpt.notes)


def test_range_file_reads_exact_bytes_and_counts_them(served):
    server, _, folder = served
    data = (folder / "model.safetensors").read_bytes()
    fileobj, _ = open_remote_file(parse_hf_reference("hf://org/big/model.safetensors"), endpoint=server.endpoint, retry=FAST,
                                 block_size=4096)
    assert isinstance(fileobj, RangeFile) and fileobj.seekable()
    assert fileobj.seek(-100, 2) == len(data) - 100 and fileobj.read() == data[-100:]
    fileobj.seek(5000)
    assert fileobj.read(10000) == data[5000:15000]
    fetched = (len(data) % 4096 or 4096) + 3 * 4096  # the last block, then blocks 1..3
    assert (fileobj.bytes_fetched, fileobj.requests) == (fetched, 2)
    fileobj.seek(6000)
    assert fileobj.read(100) == data[6000:6100]  # cached: nothing fetched
    assert (fileobj.bytes_fetched, fileobj.requests) == (fetched, 2)


def test_range_file_survives_faults(served):
    server, _, folder = served
    data = (folder / "model.safetensors").read_bytes()
    fileobj, _ = open_remote_file(parse_hf_reference("hf://org/big/model.safetensors"), endpoint=server.endpoint, retry=FAST)
    server.faults.extend([Fault("status", status=503, path="model.safetensors"),
                          Fault("ignore_range", path="model.safetensors")])
    try:
        assert fileobj.read(64) == data[:64]
        assert fileobj.read(64) == data[64:128]
    finally:
        server.faults.clear()


def test_ckpt_inspect_hf_reference(served, run_cli, monkeypatch):
    server, _, folder = served
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    result = run_cli("inspect", "hf://org/big/model.pt", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert 0 < report["bytes_read"] < (folder / "model.pt").stat().st_size / 100


def test_open_remote_sharded_index(served):
    server, _, folder = served
    shards = {"model-00001-of-00002.safetensors": {"a.weight": torch.ones(4, 4)},
              "model-00002-of-00002.safetensors": {"b.weight": torch.zeros(2, 8, dtype=torch.bfloat16)}}
    files = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        files[f"sharded/{name}"] = folder / name
    index = {"metadata": {"total_size": 96}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                            "b.weight": "model-00002-of-00002.safetensors"}}
    files["sharded/model.safetensors.index.json"] = json.dumps(index).encode()
    publish(folder / "served", "org/sharded", files)
    with open_checkpoint("hf://org/sharded/sharded/model.safetensors.index.json", endpoint=server.endpoint,
                     retry=FAST) as ckpt:
        assert ckpt.format == "sharded-safetensors"
        assert {k: (tuple(ckpt.meta(k).shape), ckpt.meta(k).dtype) for k in ckpt.keys()} == {
            "a.weight": ((4, 4), "F32"), "b.weight": ((2, 8), "BF16")}
        assert ckpt.metadata == {"total_size": "96"}
        assert torch.equal(ckpt.tensor("a.weight"), torch.ones(4, 4))
        assert ckpt.bytes_read > 0

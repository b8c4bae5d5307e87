"""`ckpt validate` on a hub source and `ckpt demo`: the main job end to end against our own mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_tools.server import HubServer, publish
from ckpt_tools.validation import validate


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny OpenFlamingo checkpoint.pt (and one with DDP-prefixed keys) on a local hub folder."""
    from model.demo import TinyDemo

    kit = TinyDemo()
    root = tmp_path_factory.mktemp("published")
    assets = kit.write_base_weights(root / "assets")
    kit.write_checkpoint(assets, root / "checkpoint.pt")
    state = torch.load(root / "checkpoint.pt", weights_only=True)
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 1}, root / "ddp.pt")
    hub = root / "hub"
    commit = publish(hub, "org/tiny", {"checkpoint.pt": root / "checkpoint.pt", "ddp.pt": root / "ddp.pt"})
    return {"hub": hub, "commit": commit, "size": (root / "checkpoint.pt").stat().st_size}


def test_hub_source_is_pinned_diffed_remotely_downloaded_and_loaded(published, tmp_path):
    with HubServer(published["hub"]) as server:
        report = validate("hf://org/tiny@main/checkpoint.pt", model="openflamingo-tiny", endpoint=server.endpoint,
                          cache_dir=tmp_path / "cache", lock=tmp_path / "tiny.lock", load=True,
                          convert=tmp_path / "tiny.safetensors")
    assert report.verdict == "ok", report.verdict_line()
    assert report.remote.commit == published["commit"]
    assert report.remote.pinned == f"hf://org/tiny@{published['commit']}/checkpoint.pt"
    assert report.remote.bytes_fetched < published["size"] / 2
    assert report.download.commit == published["commit"]
    assert report.download.files[0].size == published["size"]
    assert report.conversion.verified and (tmp_path / "tiny.safetensors").is_file()
    assert report.keys.load["loaded"] == 92 and report.keys.load["verified"] is True
    lock = json.loads((tmp_path / "tiny.lock").read_text())
    assert lock["commit"] == published["commit"]
    data = report.to_dict()
    assert data["remote"]["verdict"] == "ok" and data["download"]["commit"] == published["commit"]


def test_a_wrong_layout_shows_before_the_weights_are_downloaded(published, tmp_path):
    with HubServer(published["hub"]) as server:
        report = validate("hf://org/tiny/ddp.pt", model="openflamingo-tiny", endpoint=server.endpoint,
                          cache_dir=tmp_path / "cache", load=True)
        sent = server.stats.bytes_sent
    assert report.verdict == "fail"
    assert report.stopped.startswith("the key check failed before download")
    assert report.download is None
    assert {p.fix for p in report.keys.problems} == {"--strip-prefix module."}
    assert sent < published["size"] / 2
    assert not list((tmp_path / "cache").rglob("ddp.pt"))


def test_revision_contradicting_the_reference_is_a_usage_error(published):
    from ckpt_tools.errors import UsageError

    with pytest.raises(UsageError, match="contradicts"):
        validate("hf://org/tiny@main/checkpoint.pt", model="openflamingo-tiny", revision="v2")


def test_repo_id_without_a_file_name_says_how(published):
    from ckpt_tools.errors import UsageError

    with pytest.raises(UsageError, match=r"write hf://org/tiny\[@REVISION\]/FILE"):
        validate("org/tiny", model="openflamingo-tiny", revision="main")


def test_cli_exit_codes_for_hub_validation(published, tmp_path, run_cli):
    with HubServer(published["hub"]) as server:
        ok = run_cli("validate", "hf://org/tiny/checkpoint.pt", "--model", "openflamingo-tiny", "--endpoint",
                     server.endpoint, "--cache-dir", tmp_path / "c", "--format", "json")
        bad = run_cli("validate", "hf://org/tiny/ddp.pt", "--model", "openflamingo-tiny", "--endpoint",
                      server.endpoint, "--cache-dir", tmp_path / "c", "--format", "json")
        fixed = run_cli("validate", "hf://org/tiny/ddp.pt", "--model", "openflamingo-tiny", "--preset", "ddp",
                        "--endpoint", server.endpoint, "--cache-dir", tmp_path / "c", "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["verdict"] == "ok"
    assert bad.exit_code == 1 and json.loads(bad.stdout)["verdict"] == "fail"
    assert fixed.exit_code == 0, fixed.stdout[-2000:]


def test_demo_runs_end_to_end_offline_and_cleans_up(tmp_path):
    # HF_HUB_OFFLINE=1, the usual offline setting, must not stop the demo: it reaches only its own mirror
    env = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    kept = tmp_path / "kept"
    out = subprocess.run([sys.executable, "-m", "ckpt_tools", "demo", "--format", "json", "--keep", str(kept)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert data["verdict"] == "ok"
    assert [s["name"] for s in data["steps"]] == ["make", "publish", "serve", "fetch LM", "validate", "generate"]
    assert data["steps"][2]["detail"].endswith("(HF_HUB_OFFLINE lifted for this mirror only)")
    assert data["validation"]["load"]["verified"] is True
    assert data["validation"]["provenance"]["random_params"] == 0
    assert data["validation"]["remote"]["bytes_fetched"] < data["validation"]["download"]["files"][0]["size"]
    assert data["generation"].startswith("<image> a photo of")
    assert "[validate] ok" in out.stderr
    assert not list(Path(tmp_path).glob("ckpt-demo-*")), "the demo must clean up after itself"
    assert data["report_html"] == str(kept / "report.html")
    assert json.loads((kept / "model.json").read_text())["clip_vision_encoder_path"] == "./build/tiny-vit.json"
    assert "the checkpoint fits the model" in (kept / "report.html").read_text()


def test_demo_refuses_to_work_in_a_folder_that_is_not_empty(tmp_path):
    from ckpt_tools.demo import run_demo
    from ckpt_tools.errors import UsageError

    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(UsageError, match="the folder is not empty"):
        run_demo(keep=tmp_path)
    assert os.listdir(tmp_path) == ["old.txt"]


def test_repo_id_with_revision_uses_the_presets_file_and_stops_before_download(published, tmp_path):
    # the tiny checkpoint published as a 3B checkpoint.pt: the preset's skeleton shows the misfit remotely
    with HubServer(published["hub"]) as server:
        report = validate("org/tiny", model="openflamingo-3b-vitl-mpt1b", revision="main", endpoint=server.endpoint,
                          cache_dir=tmp_path / "cache")
    assert report.remote.pinned == f"hf://org/tiny@{published['commit']}/checkpoint.pt"
    assert report.verdict == "fail" and report.download is None
    assert report.keys.counts["shape_mismatch"] > 0
    hints = {h["kind"]: h for h in report.keys.to_dict()["hints"]}
    assert hints["cross_attn_every_n_layers"]["fix"] == "build the model with cross_attn_every_n_layers=2"
    assert hints["language_model"]["detail"] == ("lang_encoder.transformer.wte.weight is 32 wide in the "
                                                 "checkpoint and 2048 in the model")


def test_a_validated_hub_file_leaves_a_cache_huggingface_hub_reads_by_branch(published, tmp_path):
    from huggingface_hub import hf_hub_download

    with HubServer(published["hub"]) as server:
        validate("hf://org/tiny@main/checkpoint.pt", model="openflamingo-tiny", endpoint=server.endpoint,
                 cache_dir=tmp_path / "cache", lock=tmp_path / "tiny.lock")
    assert (tmp_path / "cache" / "models--org--tiny" / "refs" / "main").read_text() == published["commit"]
    assert json.loads((tmp_path / "tiny.lock").read_text())["revision"] == "main"
    assert hf_hub_download("org/tiny", "checkpoint.pt", cache_dir=tmp_path / "cache", local_files_only=True)


def test_a_sharded_hub_checkpoint_is_validated_with_all_its_shards(tmp_path):
    from safetensors.torch import save_file

    state = {f"layer.{i}.weight": torch.full((4, 4), float(i)) for i in range(4)}
    index = {"weight_map": {}}
    files = {}
    for i in range(2):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        part = {k: v for k, v in state.items() if int(k.split(".")[1]) % 2 == i}
        save_file(part, str(tmp_path / name))
        files[name] = tmp_path / name
        index["weight_map"].update(dict.fromkeys(part, name))
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    publish(tmp_path / "hub", "org/sharded", files)
    save_file(state, str(tmp_path / "whole.safetensors"))  # the target: the same keys in one file
    with HubServer(tmp_path / "hub") as server:
        report = validate("hf://org/sharded/model.safetensors.index.json", model=str(tmp_path / "whole.safetensors"),
                          endpoint=server.endpoint, cache_dir=tmp_path / "cache")
    assert report.verdict == "ok", report.verdict_line()
    assert [f.path for f in report.download.files] == ["model.safetensors.index.json",
                                                       "model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    assert report.inspect.format == "sharded-safetensors"

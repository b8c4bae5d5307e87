"""A diff against a preset, and validate's check of a hub checkpoint before download, import neither
torch, transformers nor open_clip: run in a child process where importing them raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_tools.server import HubServer, publish

pytest.importorskip("model.registry")
SKELETONS = Path(__file__).resolve().parents[1] / "model" / "data" / "skeletons"
BLOCKED = ("torch", "transformers", "open_clip")
# The child: a finder first on sys.meta_path that refuses the heavy packages, then the ckpt CLI.
BLOCKER = f'''
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked in this test: " + name)
        return None

sys.meta_path.insert(0, Refuse())
from ckpt_tools.cli import main
main(sys.argv[1:])
'''


def ckpt_blocked(tmp_path: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "blocked_ckpt.py"
    script.write_text(BLOCKER)
    environ = dict(os.environ, CKPT_CACHE=str(tmp_path / "empty-cache"))
    environ.update(env or {})
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=120)


def trained(preset: str) -> dict[str, torch.Tensor]:
    """Zeros for every trained tensor of the preset's shipped listing (one name per tied group)."""
    listing = json.loads((SKELETONS / f"{preset}.json").read_text())
    aliases = {name for group in listing["groups"] for name in group[1:]}
    return {name: torch.zeros(shape) for name, (shape, _) in listing["tensors"].items()
            if name in listing["trainable"] and name not in aliases}


def test_the_blocker_blocks(tmp_path):
    result = ckpt_blocked(tmp_path, "diff", tmp_path / "x.pt", "--model", "openflamingo-tiny")
    assert result.returncode == 2  # the file is missing: the run got that far without torch
    probe = subprocess.run([sys.executable, "-c", BLOCKER.replace("from ckpt_tools.cli import main\nmain(sys.argv[1:])",
                                                                  "import torch")],
                           capture_output=True, text=True)
    assert "blocked in this test: torch" in probe.stderr


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_diff_against_the_tiny_preset_without_torch(tmp_path, suffix):
    state = trained("openflamingo-tiny")
    path = tmp_path / f"checkpoint{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    result = ckpt_blocked(tmp_path, "diff", path, "--model", "openflamingo-tiny", "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert (data["verdict"], data["target"]) == ("ok", "openflamingo-tiny")
    assert data["counts"]["matched"] == len(state)


def test_diff_against_a_big_preset_without_torch(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({"perceiver.latents": torch.zeros(64, 1024)}, path)
    result = ckpt_blocked(tmp_path, "diff", path, "--model", "openflamingo-9b-vitl-mpt7b", "--format", "json")
    assert result.returncode == 1, result.stderr[-2000:]  # a verdict, not a crash
    data = json.loads(result.stdout)
    assert data["counts"]["matched"] == 1
    assert data["counts"]["missing_unexpected"] == len(trained("openflamingo-9b-vitl-mpt7b")) - 1


def test_validate_checks_a_hub_checkpoint_before_download_without_torch(tmp_path, root):
    state = trained("openflamingo-tiny")
    torch.save(state, tmp_path / "checkpoint.pt")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    publish(root, "org/tiny", {"checkpoint.pt": tmp_path / "checkpoint.pt", "ddp.pt": tmp_path / "ddp.pt"})
    with HubServer(root) as server:
        args = ("--model", "openflamingo-tiny", "--endpoint", server.endpoint, "--cache-dir", tmp_path / "hub",
                "--format", "json")
        stopped = ckpt_blocked(tmp_path, "validate", "hf://org/tiny/ddp.pt", *args)
        whole = ckpt_blocked(tmp_path, "validate", "hf://org/tiny/checkpoint.pt", *args)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert json.loads(stopped.stdout)["stopped"].startswith("the key check failed before download")
    assert whole.returncode == 0, whole.stderr[-2000:]
    data = json.loads(whole.stdout)
    assert (data["remote"]["verdict"], data["verdict"]) == ("ok", "ok")
    assert data["download"]["files"][0]["size"] == (tmp_path / "checkpoint.pt").stat().st_size


def test_a_cached_transformers_listing_needs_no_torch(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "vocab_size": 50}))
    save_file({"model.embed_tokens.weight": torch.zeros(50, 16)}, tmp_path / "embed.safetensors")
    cache = {"CKPT_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-m", "ckpt_tools", "diff", str(tmp_path / "embed.safetensors"),
                            "--model", str(folder), "--format", "json"], capture_output=True, text=True,
                           env=dict(os.environ, **cache), timeout=300)
    second = ckpt_blocked(tmp_path, "diff", tmp_path / "embed.safetensors", "--model", folder, "--format", "json",
                          env=cache)
    assert first.returncode == 1 and second.returncode == 1, second.stderr[-2000:]
    assert json.loads(second.stdout)["counts"] == json.loads(first.stdout)["counts"]

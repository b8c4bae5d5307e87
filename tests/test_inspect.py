"""`ckpt inspect`: the report, its three renderings, the CLI's exit codes and error lines."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from ckpt_tools.inspect import inspect_checkpoint
from ckpt_tools.naming import collapse, format_numbers, module_prefix


def flamingo_like() -> dict[str, torch.Tensor]:
    state = {f"lang.blocks.{i}.xattn.attn_gate": torch.zeros(1) for i in range(0, 8)}
    state.update({f"lang.blocks.{i}.xattn.to_q.weight": torch.zeros(4, 4) for i in range(0, 8)})
    state["perceiver.latents"] = torch.zeros(3, 4)
    state["lang.wte.weight"] = torch.zeros(10, 4, dtype=torch.bfloat16)
    return state


def test_naming_helpers():
    assert format_numbers([0, 1, 2, 3, 7, 9, 10]) == "0..3,7,9,10"
    assert module_prefix("lang.blocks.3.xattn.to_q.weight", 2) == "lang.blocks.3"
    assert module_prefix("lang.blocks.3.xattn.to_q.weight", 3) == "lang.blocks.3.xattn"
    assert collapse(["a.3.w", "a.7.w", "b"]) == {"a.{3,7}.w": ["a.3.w", "a.7.w"], "b": ["b"]}


def test_report_groups_and_totals(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(flamingo_like(), str(path))
    report = inspect_checkpoint(path, depth=3)
    groups = {g.name: (g.keys, g.params, g.nbytes, g.dtypes) for g in report.groups()}
    assert groups == {
        "lang.blocks.{0..7}.xattn": (16, 8 * 17, 8 * 17 * 4, ["F32"]),
        "perceiver": (1, 12, 48, ["F32"]),
        "lang.wte": (1, 40, 80, ["BF16"]),
    }
    assert report.total_params == 8 * 17 + 12 + 40


def test_json_schema_names(tmp_path, run_cli):
    path = tmp_path / "w.pt"
    state = flamingo_like()
    state["tied"] = state["perceiver.latents"]
    torch.save({"model_state_dict": state, "epoch": 2}, path)
    result = run_cli("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for name in ("source", "format", "wrapper", "tensors", "aliases", "extras", "metadata", "total_params",
                 "total_bytes"):
        assert name in data
    assert data["format"] == "torch-zip"
    assert data["wrapper"] == "model_state_dict"
    assert data["tensors"]["lang.wte.weight"] == {"shape": [10, 4], "dtype": "BF16", "nbytes": 80}
    assert data["aliases"] == [["perceiver.latents", "tied"]]
    assert data["extras"] == {"epoch": "int"}
    assert data["total_params"] == 8 * 17 + 12 + 40  # the alias is counted once


def test_filter_and_markdown(tmp_path, run_cli):
    path = tmp_path / "f.safetensors"
    save_file(flamingo_like(), str(path))
    result = run_cli("inspect", path, "--filter", "perceiver.*", "--format", "markdown", "--modules")
    assert result.exit_code == 0
    assert "| perceiver | 1 | 12 | 48 B | F32 |" in result.stdout
    assert "lang.blocks" not in result.stdout


def test_table_output(tmp_path, run_cli):
    path = tmp_path / "f.safetensors"
    save_file(flamingo_like(), str(path))
    result = run_cli("inspect", path, "--modules")
    assert result.exit_code == 0
    assert "lang.blocks.{0..7}.xattn" in result.stdout
    assert "format: safetensors" in result.stdout


def test_cli_error_is_one_line_exit_2(tmp_path, run_cli):
    (tmp_path / "e.safetensors").write_bytes(b"")
    result = run_cli("inspect", tmp_path / "e.safetensors")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and "the file is empty" in result.stderr


def test_debug_env_shows_traceback(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    env = {"CKPT_DEBUG": "1", "PATH": "", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ckpt_tools", "inspect", str(tmp_path / "e.safetensors")],
                         capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "InvalidCheckpointError" in out.stderr


def test_help_imports_nothing_heavy():
    # what keeps `ckpt --help` fast; its time is measured by scripts/bench/bench_inspect.py
    code = "import sys; from ckpt_tools.cli import cli; print(sorted(m for m in ('torch', 'huggingface_hub', 'transformers', 'safetensors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_short_listing_shows_every_key_with_its_shape(tmp_path, run_cli):
    path = tmp_path / "f.safetensors"
    save_file(flamingo_like(), str(path))
    result = run_cli("inspect", path, "--filter", "perceiver.*", "--format", "markdown")
    assert "| perceiver.latents | 3x4 | F32 | 48 B |" in result.stdout


def test_a_filter_that_matches_nothing_is_an_error(tmp_path, run_cli):
    path = tmp_path / "f.safetensors"
    save_file(flamingo_like(), str(path))
    result = run_cli("inspect", path, "--filter", "nothing.*")
    assert result.exit_code == 2
    assert "--filter 'nothing.*' matches none of the 18 keys" in result.stderr


def test_groups_count_a_tied_tensor_once_like_the_totals(tmp_path, run_cli):
    shared = torch.ones(4, 2)
    torch.save({"enc.emb.weight": shared, "dec.head.weight": shared}, tmp_path / "tied.pt")
    data = json.loads(run_cli("inspect", tmp_path / "tied.pt", "--format", "json").stdout)
    assert sum(g["params"] for g in data["groups"]) == data["total_params"]

"""`ckpt convert` and `ckpt remap`: exit codes, JSON, flags reaching the library."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _train_pt(path) -> None:
    torch.save({"model_state_dict": {"module.enc.w": torch.arange(6.0).reshape(2, 3), "module.b": torch.ones(2)},
                "optimizer_state_dict": {"state": {}}, "epoch": 3}, path)


def test_convert_json(tmp_path, run_cli):
    _train_pt(tmp_path / "t.pt")
    out = tmp_path / "t.safetensors"
    result = run_cli("convert", tmp_path / "t.pt", out, "--preset", "ddp", "--drop", "b",
                     "--extras", tmp_path / "e.json", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == str(tmp_path / "t.pt") and data["destination"] == str(out)
    assert data["files"] == [str(out)] and data["tensors"] == 1
    assert data["renamed"] == {"module.enc.w": "enc.w"} and data["dropped"] == ["module.b"]
    assert data["aliases_removed"] == {} and data["verified"] is True
    assert data["bytes_written"] == os.path.getsize(out)
    assert json.loads((tmp_path / "e.json").read_text()) == {"epoch": 3, "optimizer_state_dict": {"state": {}}}
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["enc.w"]


def test_convert_dtype_shards_and_no_verify(tmp_path, run_cli):
    save_file({f"w{i}": torch.full((10,), float(i)) for i in range(3)}, tmp_path / "s.safetensors")
    result = run_cli("convert", tmp_path / "s.safetensors", tmp_path / "out", "--dtype", "fp16",
                     "--max-shard-size", "20B", "--no-verify", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] is False and data["dtype"] == "F16" and len(data["files"]) == 4
    with safe_open(str(tmp_path / "out" / "model-00002-of-00003.safetensors"), "pt") as f:
        assert f.get_tensor("w1").dtype == torch.float16


def test_convert_refuses_overwrite_with_exit_2(tmp_path, run_cli):
    save_file({"a": torch.ones(1)}, tmp_path / "s.safetensors")
    (tmp_path / "o.safetensors").write_text("x")
    result = run_cli("convert", tmp_path / "s.safetensors", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("convert", tmp_path / "s.safetensors", tmp_path / "o.safetensors", "--force").exit_code == 0


def test_convert_collision_and_bad_size_exit_2(tmp_path, run_cli):
    torch.save({"module.x": torch.ones(1), "x": torch.ones(1)}, tmp_path / "c.pt")
    result = run_cli("convert", tmp_path / "c.pt", tmp_path / "o.safetensors", "--strip-prefix", "module.")
    assert result.exit_code == 2 and "'module.x'" in result.stderr
    result = run_cli("convert", tmp_path / "c.pt", tmp_path / "out", "--max-shard-size", "lots")
    assert result.exit_code == 2 and "invalid size" in result.stderr
    result = run_cli("convert", tmp_path / "missing.pt", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_convert_table_and_markdown(tmp_path, run_cli):
    shared = torch.ones(2)
    torch.save({"a": shared, "b": shared}, tmp_path / "t.pt")
    table = run_cli("convert", tmp_path / "t.pt", tmp_path / "o.safetensors")
    assert table.exit_code == 0
    assert "1 written (1 more name of the same tensors stored once" in table.stdout
    assert "bit for bit" in table.stdout
    markdown = run_cli("convert", tmp_path / "t.pt", tmp_path / "o.safetensors", "--force", "--format", "markdown")
    assert "| b | a |" in markdown.stdout


def test_remap_cli_rules_file(tmp_path, run_cli):
    _train_pt(tmp_path / "t.pt")
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\npreset = "ddp"\n\n[[rule]]\nrename = ["^enc\\\\.", "encoder."]\n')
    result = run_cli("remap", tmp_path / "t.pt", tmp_path / "o.pt", "--rules", rules, "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["renamed"] == {"module.enc.w": "encoder.w", "module.b": "b"}
    assert data["format"] == "torch-zip" and data["unmatched_rules"] == []
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    assert sorted(loaded["model_state_dict"]) == ["b", "encoder.w"] and loaded["epoch"] == 3


def test_remap_cli_reports_unmatched_rules(tmp_path, run_cli):
    save_file({"a": torch.ones(1)}, tmp_path / "s.safetensors")
    result = run_cli("remap", tmp_path / "s.safetensors", tmp_path / "o.safetensors", "--preset", "ddp")
    assert result.exit_code == 0
    assert 'warning: rule matched nothing: {"strip_prefix": "module."}' in result.stderr


def test_remap_unknown_preset_exit_2(tmp_path, run_cli):
    save_file({"a": torch.ones(1)}, tmp_path / "s.safetensors")
    result = run_cli("remap", tmp_path / "s.safetensors", tmp_path / "o.safetensors", "--preset", "nope")
    assert result.exit_code == 2 and "unknown remap preset" in result.stderr


def test_help_has_examples(run_cli):
    for command in ("convert", "remap"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout


def test_remap_of_a_pickle_is_verified_bit_for_bit_with_slices(tmp_path, run_cli):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    src = tmp_path / "slices.pt"
    torch.save({"module.cols": base[:, 2:4], "module.t": base.t(), "module.flag": torch.tensor([True, False])}, src)
    result = run_cli("remap", src, tmp_path / "out.pt", "--preset", "ddp", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(written["cols"], base[:, 2:4]) and torch.equal(written["t"], base.t())


def test_a_training_file_converts_its_model_with_the_scalars_listed(tmp_path, run_cli):
    weights = {"_orig_mod.wte.weight": torch.randn(8, 4), "_orig_mod.lm_head.bias": torch.randn(8)}
    torch.save({"model": weights, "best_val_loss": torch.tensor(1.5), "iter_num": 3}, tmp_path / "ckpt.pt")
    result = run_cli("convert", tmp_path / "ckpt.pt", tmp_path / "out.safetensors", "--remap-preset", "compile",
                     "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 2
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("wte.weight"), weights["_orig_mod.wte.weight"])


def test_convert_refuses_a_choice_that_leaves_most_tensor_bytes_behind(tmp_path, run_cli):
    three = {"model": {"w": torch.zeros(40)}, "teacher": {"w": torch.zeros(30)}, "student": {"w": torch.zeros(31)}}
    torch.save(three, tmp_path / "t.pt")
    refused = run_cli("convert", tmp_path / "t.pt", tmp_path / "o.safetensors")
    assert refused.exit_code == 2
    assert "--select" in refused.stderr
    assert not (tmp_path / "o.safetensors").exists()
    named = run_cli("convert", tmp_path / "t.pt", tmp_path / "o.safetensors", "--select", "teacher")
    assert named.exit_code == 0, named.stderr


def test_inspect_names_the_selection_and_what_was_not_executed(tmp_path, run_cli):
    import argparse

    torch.save({"state_dict": {"w": torch.ones(2)}, "state_dict_ema": {"w": torch.ones(2)},
                "args": argparse.Namespace(lr=0.1)}, tmp_path / "t.pt")
    result = run_cli("inspect", tmp_path / "t.pt", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["wrapper"] == "state_dict"
    assert [a["select"] for a in data["selection"]["alternatives"]] == ["state_dict_ema"]
    assert data["not_executed"] == ["argparse.Namespace"]
    ema = run_cli("inspect", tmp_path / "t.pt", "--select", "state_dict_ema", "--format", "json")
    assert json.loads(ema.stdout)["wrapper"] == "state_dict_ema"


@pytest.mark.parametrize(("command", "src", "dst", "right"), [
    ("remap", "train.pt", "clean.safetensors", "clean.pt"),
    ("convert", "train.pt", "out.bin", "out.safetensors"),
    ("remap", "model.safetensors", "x.pt", "x.safetensors"),
])
def test_an_output_name_never_lies_about_its_bytes(tmp_path, run_cli, command, src, dst, right):
    torch.save({"module.a": torch.ones(2)}, tmp_path / "train.pt")
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    result = run_cli(command, tmp_path / src, tmp_path / dst, "--add-prefix", "m.")
    assert result.exit_code == 2
    assert f"fix: name it {right}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / dst).exists()


def test_a_report_file_is_named_for_its_format(tmp_path, run_cli):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    result = run_cli("inspect", tmp_path / "model.safetensors", "--format", "json", "--output", tmp_path / "r.html")
    assert result.exit_code == 2
    assert "fix: name it r.json" in result.stderr


def test_a_rule_that_matched_nothing_is_a_warning_on_stderr(tmp_path, run_cli):
    save_file({"module.a": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    result = run_cli("remap", tmp_path / "m.safetensors", tmp_path / "o.safetensors", "--drop", "zzz*")
    assert result.exit_code == 0
    assert 'warning: rule matched nothing: {"drop": "zzz*"}' in result.stderr
    assert "matched nothing" not in result.stdout

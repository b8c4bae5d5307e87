"""`ckpt diff` and `ckpt validate`: exit codes 0/1/2, JSON names, the tiny OpenFlamingo end to end."""

from __future__ import annotations

import json

import pytest
import torch
from diffload_models import build_tiny, trained_state
from safetensors.torch import save_file


@pytest.fixture
def files(tmp_path):
    state = {k: v.clone().contiguous() for k, v in trained_state(build_tiny(seed=1)).items()}
    full, partial = tmp_path / "full.safetensors", tmp_path / "partial.safetensors"
    save_file(state, full)
    save_file({k: v for k, v in state.items() if k != "blocks.0.x.gate"}, partial)
    return full, partial


def test_diff_against_itself_is_ok(run_cli, files):
    full, _ = files
    result = run_cli("diff", full, "--against", full, "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["verdict"] == "ok"
    assert list(data["counts"]) == ["matched", "dtype_mismatch", "shape_mismatch", "unexpected",
                                    "missing_expected", "missing_unexpected"]
    assert data["counts"]["matched"] == 14


def test_diff_with_problems_exits_1_and_flags_change_the_verdict(run_cli, files):
    full, partial = files
    result = run_cli("diff", partial, "--against", full, "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["problems"] == [{"kind": "missing_unexpected", "key": "blocks.0.x.gate",
                                 "detail": "not in the checkpoint (the target holds it)",
                                 "fix": None}]
    assert run_cli("diff", partial, "--against", full, "--expect-missing", "*.gate").exit_code == 0
    assert run_cli("diff", full, "--against", partial, "--drop", "blocks.0.x.gate").exit_code == 0
    assert run_cli("diff", full, "--against", full, "--require", "nothing.*").exit_code == 1


@pytest.mark.parametrize("args", [
    ["diff", "{missing}", "--against", "{full}"],
    ["diff", "{full}"],
    ["diff", "{full}", "--model", "x", "--against", "{full}"],
    ["diff", "{full}", "--model", "no-such-preset"],
    ["diff", "{full}", "--against", "{full}", "--rename", "no-equals-sign"],
    ["validate", "{full}"],
])
def test_bad_input_exits_2_with_one_line(run_cli, files, tmp_path, args):
    full, _ = files
    args = [a.format(full=full, missing=tmp_path / "nope.pt") for a in args]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_markdown_and_table_formats(run_cli, files):
    full, partial = files
    markdown = run_cli("diff", partial, "--against", full, "--format", "markdown").stdout
    assert markdown.startswith("### ❌ Key report: **fail**")
    assert "| missing_unexpected | `blocks.0.x.gate` | 1 |" in markdown
    table = run_cli("diff", partial, "--against", full).stdout
    assert "verdict: FAIL" in table


@pytest.mark.parametrize("command", ["diff", "validate"])
def test_help_has_an_example(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "Example:" in result.stdout


# -- the tiny OpenFlamingo preset and a model config built through the factory --

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    registry = pytest.importorskip("model.registry")
    folder = tmp_path_factory.mktemp("tiny")
    model = registry.TINY.build(device="cpu")
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if v.requires_grad}
    for key in state:
        if key.endswith(("attn_gate", "ff_gate")):
            state[key] = torch.full_like(state[key], 0.25)
        else:
            state[key] += 0.01  # differ from the preset's seeded init, so a load shows
    paths = {"trained": folder / "checkpoint.pt", "closed": folder / "closed.pt", "ddp": folder / "ddp.pt",
             "wrong": folder / "wrong.pt"}
    torch.save(state, paths["trained"])
    torch.save({k: (torch.zeros_like(v) if k.endswith("_gate") else v) for k, v in state.items()}, paths["closed"])
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, paths["ddp"])
    wte = "lang_encoder.transformer.wte.weight"
    torch.save(dict(state, **{wte: torch.zeros(state[wte].shape[0] - 3, state[wte].shape[1])}), paths["wrong"])
    assets = registry.save_tiny_assets(folder / "assets")
    config = folder / "assets" / "flamingo.json"
    config.write_text(json.dumps({
        "factory": "model.factory:create_model_and_transforms",
        "clip_vision_encoder_path": "tiny-vit.json", "clip_vision_encoder_pretrained": assets["clip_pretrained"].name,
        "lang_encoder_path": assets["lm"].name, "tokenizer_path": assets["lm"].name,
        "cross_attn_every_n_layers": registry.TINY_EVERY_N}))
    paths["config"] = config
    return paths


def test_validate_tiny_preset_with_load(run_cli, tiny):
    result = run_cli("validate", tiny["trained"], "--model", "openflamingo-tiny", "--load", "--format", "json")
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["verdict"] == "ok"
    assert data["inspect"]["format"] == "torch-zip"
    assert data["diff"]["counts"]["unexpected"] == 0
    assert data["load"]["verified"] is True
    assert data["load"]["loaded"] == data["diff"]["counts"]["matched"]


def test_validate_fails_when_the_gates_never_opened(run_cli, tiny):
    result = run_cli("validate", tiny["closed"], "--model", "openflamingo-tiny", "--load", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["load"]["verified"] is False
    assert "exactly 0" in data["load"]["checks"][0]["detail"]


def test_validate_refuses_a_load_with_a_shape_mismatch(run_cli, tiny):
    result = run_cli("validate", tiny["wrong"], "--model", "openflamingo-tiny", "--load", "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["load"]["loaded"] == 0 and "refusing to load" in data["load"]["refused"]
    forced = run_cli("validate", tiny["wrong"], "--model", "openflamingo-tiny", "--load", "--force",
                     "--format", "json")
    assert forced.exit_code == 1
    assert json.loads(forced.stdout)["load"]["skipped"] == ["lang_encoder.transformer.wte.weight"]


def test_diff_ddp_file_against_a_model_config(run_cli, tiny):
    result = run_cli("diff", tiny["ddp"], "--model-config", tiny["config"], "--format", "json")
    assert result.exit_code == 1
    assert {p["fix"] for p in json.loads(result.stdout)["problems"]} == {"--strip-prefix module."}
    fixed = run_cli("diff", tiny["ddp"], "--model-config", tiny["config"], "--strip-prefix", "module.")
    assert fixed.exit_code == 0, fixed.stdout


def test_validate_model_config_with_load(run_cli, tiny):
    result = run_cli("validate", tiny["trained"], "--model-config", tiny["config"], "--load", "--device", "cpu",
                     "--format", "json")
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["load"]["still_on_meta"] == 0
    assert data["provenance"]["random_params"] == 0
    sources = {row["module"]: row["source"] for row in data["provenance"]["modules"]}
    assert sources["vision_encoder"].endswith("tiny-vit.safetensors")
    assert sources["perceiver"] == "checkpoint.pt"


def test_validate_load_fails_when_a_part_stays_random(run_cli, tiny, tmp_path):
    config = json.loads(tiny["config"].read_text())
    config["clip_vision_encoder_pretrained"] = None
    config["clip_vision_encoder_path"] = str(tiny["config"].parent / "tiny-vit.json")
    config["lang_encoder_path"] = config["tokenizer_path"] = str(tiny["config"].parent / "tiny-lm")
    random_vision = tmp_path / "random-vision.json"
    random_vision.write_text(json.dumps(config))
    args = ("validate", tiny["trained"], "--model-config", random_vision, "--load", "--device", "cpu", "--format", "json")
    failed = run_cli(*args)
    assert failed.exit_code == 1
    data = json.loads(failed.stdout)
    assert data["load"]["verified"] is True
    assert data["provenance"]["random_params"] > 0
    assert {"module": "vision_encoder", "source": "initialised randomly"}.items() <= next(
        row for row in data["provenance"]["modules"] if row["module"] == "vision_encoder").items()
    allowed = run_cli(*args, "--allow-random")
    assert allowed.exit_code == 0, allowed.stdout[-1500:]


def test_html_report_goes_to_output_file_and_not_stdout(run_cli, files, tmp_path):
    full, partial = files
    page = tmp_path / "report.html"
    result = run_cli("diff", partial, "--against", full, "--format", "html", "--output", page)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"wrote {page}" in result.stderr
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "FAIL" in text


def test_output_writes_json_atomically_and_refuses_a_missing_folder(run_cli, files, tmp_path):
    full, partial = files
    out = tmp_path / "report.json"
    run_cli("diff", partial, "--against", full, "--format", "json", "--output", out)
    assert json.loads(out.read_text())["verdict"] == "fail"
    missing = run_cli("diff", partial, "--against", full, "--format", "json", "--output", tmp_path / "nope" / "r.json")
    assert missing.exit_code == 2
    assert "the output's folder does not exist" in missing.stderr


def test_html_is_offered_only_where_a_page_exists(run_cli, files):
    result = run_cli("scan", files[0], "--format", "html")
    assert result.exit_code == 2


def test_a_diff_against_a_file_speaks_of_the_target_not_a_model(run_cli, files):
    full, partial = files
    text = run_cli("diff", full, "--against", partial).stdout
    assert "nowhere in the target" in text
    assert "model" not in text


def test_a_layer_hint_names_the_module_without_a_placeholder():
    from diffload_models import metas

    from ckpt_tools import diff_keys

    report = diff_keys(metas(trained_state(build_tiny(every=1))), build_tiny(every=2))
    (hint,) = [h for h in report.hints if h["kind"] == "layers"]
    assert "{}" not in hint["detail"]
    assert ".N." in hint["module"]

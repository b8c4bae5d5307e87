"""load_checkpoint: refuse on a failing verdict, load what fits one tensor at a time, verify it landed."""

from __future__ import annotations

import pytest
import torch
from diffload_models import build_tiny, trained_state
from safetensors.torch import save_file

from ckpt_tools.errors import LoadRefusedError
from ckpt_tools.formats import open_checkpoint
from ckpt_tools.load import load_checkpoint
from ckpt_tools.presets import ModelPreset


def save(tmp_path, state, fmt="safetensors"):
    if fmt == "safetensors":
        path = tmp_path / "ckpt.safetensors"
        # safetensors refuses shared tensors; the tied head is the same values under another name
        save_file({k: v.clone().contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "ckpt.pt"
        torch.save({"model_state_dict": state, "epoch": 1}, path)
    return path


def assert_loaded(model, state):
    current = model.state_dict()
    for key, value in state.items():
        assert torch.equal(current[key], value.to(current[key].dtype)), key


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_copies_every_trained_tensor_and_verifies(tmp_path, fmt):
    source = build_tiny(seed=1)
    state = trained_state(source)
    model = build_tiny(seed=2)
    frozen_before = model.vision.weight.clone()
    report = load_checkpoint(save(tmp_path, state, fmt), model)
    assert report.verdict == "ok"
    assert report.load["loaded"] == 13
    assert report.load["verified"] is True
    assert report.load["compared"] == 13
    assert report.load["mismatched"] == [] and report.load["skipped"] == []
    assert report.load["still_on_meta"] == 0
    assert_loaded(model, state)
    assert torch.equal(model.vision.weight, frozen_before)  # frozen parts untouched
    assert report.to_dict()["load"]["verified"] is True


def test_dtype_mismatch_is_cast_on_the_way_in(tmp_path):
    state = trained_state(build_tiny(seed=1))
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    model = build_tiny(seed=2)
    report = load_checkpoint(save(tmp_path, state), model)
    assert report.counts["dtype_mismatch"] == 13
    assert report.load["cast"] == 13 and report.load["verified"] is True
    assert model.embed.weight.dtype == torch.float32
    assert_loaded(model, state)


def test_failing_verdict_refuses_and_force_loads_what_fits(tmp_path):
    state = trained_state(build_tiny(seed=1, vocab=12))  # wrong tokenizer length
    path = save(tmp_path, state)
    model = build_tiny(seed=2, vocab=10)
    embed_before = model.embed.weight.clone()
    gate_before = model.blocks[0].x.gate.clone()
    with pytest.raises(LoadRefusedError) as info:
        load_checkpoint(path, model)
    assert info.value.report.counts["shape_mismatch"] == 1
    assert "1 shape mismatch" in str(info.value) and "force=True" in str(info.value)
    assert torch.equal(model.blocks[0].x.gate, gate_before)  # nothing was touched
    report = load_checkpoint(path, model, force=True)
    assert report.verdict == "fail"
    assert report.load["forced"] is True
    assert report.load["skipped"] == ["embed.weight"]
    assert report.load["loaded"] == 12 and report.load["verified"] is True
    assert torch.equal(model.embed.weight, embed_before)
    assert torch.equal(model.blocks[0].x.gate, state["blocks.0.x.gate"])


def test_a_forced_load_of_nothing_is_not_verified(tmp_path):
    path = save(tmp_path, {"unrelated.weight": torch.ones(2)})
    report = load_checkpoint(path, build_tiny(seed=2), force=True)
    assert (report.load["loaded"], report.load["verified"]) == (0, False)


def test_meta_model_gets_real_tensors_and_keeps_ties(tmp_path):
    state = trained_state(build_tiny(seed=1))
    model = build_tiny(device="meta")
    report = load_checkpoint(save(tmp_path, state, "pt"), model)
    assert report.load["verified"] is True
    assert model.embed.weight.device.type == "cpu"
    assert model.head.weight is model.embed.weight
    assert isinstance(model.embed.weight, torch.nn.Parameter) and model.embed.weight.requires_grad
    assert not model.blocks[0].lin.weight.requires_grad
    assert model.vision.weight.device.type == "meta"  # frozen parts stay skeletons
    assert report.load["still_on_meta"] == 11
    assert torch.equal(model.blocks[3].x.proj.weight, state["blocks.3.x.proj.weight"])


def test_verification_catches_a_tensor_overwritten_by_another_key(tmp_path):
    state = trained_state(build_tiny(seed=1))
    state["head.weight"] = state["embed.weight"] + 1  # untied in the file, tied in the model
    model = build_tiny(seed=2)
    report = load_checkpoint(save(tmp_path, state), model)
    assert report.load["verified"] is False
    assert report.load["mismatched"] == ["embed.weight"]
    assert report.verdict == "fail"
    (problem,) = report.problems
    assert problem.kind == "load"
    assert "other values for this tied tensor under 'head.weight'" in problem.detail


def test_verification_catches_a_value_changed_during_the_load(tmp_path, monkeypatch):
    import ckpt_tools.load as load_module

    real = load_module._assign

    def assign_then_change(model, entry, source, device):  # e.g. a hook that rescales a weight
        real(model, entry, source, device)
        if entry.name == "blocks.0.x.gate":
            load_module._current(model, entry.name).data.add_(1)

    monkeypatch.setattr(load_module, "_assign", assign_then_change)
    report = load_checkpoint(save(tmp_path, trained_state(build_tiny(seed=1))), build_tiny(seed=2))
    assert report.load["verified"] is False
    assert report.load["mismatched"] == ["blocks.0.x.gate"]
    (problem,) = report.problems
    assert "differs from checkpoint key 'blocks.0.x.gate' after the load" in problem.detail


def test_verification_catches_a_tie_broken_during_the_load(tmp_path, monkeypatch):
    import ckpt_tools.load as load_module

    real = load_module._assign

    def assign_then_untie(model, entry, source, device):  # e.g. a hook that copies a tied weight
        real(model, entry, source, device)
        if entry.names[1:]:
            module, attr = load_module._owner(model, entry.names[1])
            module._parameters[attr] = torch.nn.Parameter(module._parameters[attr].detach().clone())

    monkeypatch.setattr(load_module, "_assign", assign_then_untie)
    model = build_tiny(device="meta")
    report = load_checkpoint(save(tmp_path, trained_state(build_tiny(seed=1)), "pt"), model)
    assert report.load["verified"] is False
    assert report.load["mismatched"] == ["embed.weight"]
    (problem,) = report.problems
    assert "its tied names no longer share one tensor" in problem.detail


def test_preset_value_checks_run_after_the_load(tmp_path):
    gates = {"name": "gates", "globs": ["*.gate"], "kind": "not_all_zero", "detail": "every gate is still exactly 0"}
    preset = ModelPreset(name="tiny-test", build=build_tiny, value_checks=[gates])
    good = load_checkpoint(save(tmp_path, trained_state(build_tiny(seed=1))), build_tiny(), preset=preset)
    assert (good.load["checks"], good.load["verified"]) == ([], True)
    closed = trained_state(build_tiny(seed=1), gate=0.0)
    bad = load_checkpoint(save(tmp_path, closed), build_tiny(), preset=preset)
    assert [c["detail"] for c in bad.load["checks"]] == ["gates: every gate is still exactly 0"]
    assert bad.load["verified"] is False
    assert bad.verdict == "fail"


def test_a_loaded_nan_fails_the_verdict_unless_allowed(tmp_path):
    state = trained_state(build_tiny(seed=1))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and "embed" not in k
               and "head" not in k)  # not the tied pair, whose two names would then disagree
    state[key][0] = float("nan")
    report = load_checkpoint(save(tmp_path, state), build_tiny())
    assert [(c["kind"], c["key"]) for c in report.load["checks"]] == [("value_check", key)]
    assert report.verdict == "fail"
    allowed = load_checkpoint(save(tmp_path, state), build_tiny(), allow_nonfinite=True)
    assert allowed.verdict == "ok"


def test_reads_each_tensor_through_the_lazy_reader(tmp_path, monkeypatch):
    state = trained_state(build_tiny(seed=1))
    ckpt = open_checkpoint(save(tmp_path, state))
    reads: list[str] = []
    original = type(ckpt)._load_tensor

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(type(ckpt), "_load_tensor", spy)
    report = load_checkpoint(ckpt, build_tiny(), remap=[{"drop": "head.*"}])
    assert report.load["loaded"] == 13
    assert sorted(reads) == sorted([k for k in state if k != "head.weight"] * 2)  # load + verify
    assert ckpt.tensor("blocks.0.x.gate") is not None  # a Checkpoint passed in stays open


def test_a_refused_load_names_the_fix_the_key_report_found(tmp_path):
    torch.save({f"module.{k}": v for k, v in torch.nn.Linear(2, 2).state_dict().items()}, tmp_path / "ddp.pt")
    with pytest.raises(LoadRefusedError) as info:
        load_checkpoint(tmp_path / "ddp.pt", torch.nn.Linear(2, 2))
    assert info.value.fix.startswith("the inferred remap rules make it fit: pass auto_remap=True (--auto-remap)")

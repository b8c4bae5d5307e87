"""The benchmark generator reproduces the published OpenFlamingo key layouts exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
REFERENCE = json.loads((BENCH / "data" / "openflamingo-released-keys.json").read_text())
SCALE = 0.001  # the 3B layout at this scale is about 4 MB


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_openflamingo", BENCH / "gen_openflamingo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.mark.parametrize("layout", sorted(gen.LAYOUTS))
def test_pt_key_set_equals_reference(tmp_path, layout):
    path = gen.generate(layout, SCALE, "pt", out=tmp_path / "c.pt")
    state = torch.load(path, weights_only=True)
    expected = REFERENCE[gen.LAYOUTS[layout]]["tensors"]
    assert set(state) == set(expected)
    assert {t.dtype for t in state.values()} == {torch.float32}
    # Only the first dimension is scaled: the rest of every shape is the published one.
    assert all(list(state[k].shape[1:]) == expected[k]["shape"][1:] for k in expected)


def test_full_scale_specs_match_published_sizes():
    specs = gen.layout_specs("3b", 1.0)
    assert sum(gen.nbytes(shape, dtype) for shape, dtype in specs.values()) == 4_187_971_776


def test_ddp_wrapper_prefixes_every_key(tmp_path):
    path = gen.generate("3b", SCALE, "pt", "ddp", out=tmp_path / "ddp.pt")
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model_state_dict", "optimizer_state_dict", "epoch"}
    expected = REFERENCE[gen.LAYOUTS["3b"]]["tensors"]
    assert set(saved["model_state_dict"]) == {f"module.{k}" for k in expected}
    assert saved["epoch"] == 1


def test_safetensors_and_legacy_hold_the_same_tensors_as_pt(tmp_path):
    pt = torch.load(gen.generate("9b", SCALE, "pt", out=tmp_path / "a.pt"), weights_only=True)
    legacy = torch.load(gen.generate("9b", SCALE, "legacy-pt", out=tmp_path / "b.pt"), weights_only=True)
    with safe_open(gen.generate("9b", SCALE, "safetensors", out=tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        st = {k: f.get_tensor(k) for k in f.keys()}
    assert set(pt) == set(legacy) == set(st)
    assert all(torch.equal(pt[k], legacy[k]) and torch.equal(pt[k], st[k]) for k in pt)
    # Values are distinct per tensor, and the gates are not zero (zero gates mean "never loaded").
    gates = [v.item() for k, v in pt.items() if k.endswith("attn_gate")]
    assert len(set(gates)) == len(gates) and 0.0 not in gates


def test_v1_aliases_share_storage(tmp_path):
    path = gen.generate("9b-deprecated", SCALE, "pt", out=tmp_path / "v1.pt", v1_aliases=True)
    state = torch.load(path, weights_only=True)
    alias = state["lang_encoder.gated_cross_attn_layers.3.attn_gate"]
    original = state["lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate"]
    assert alias.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
    assert len(state) == 158 + 8 * 11

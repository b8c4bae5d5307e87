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


# the model preset that loads each layout: its skeleton is built from the model code, so it checks the
# generator independently of the key file the generator reads
PRESETS = {"3b": "openflamingo-3b-vitl-mpt1b", "4b": "openflamingo-4b-vitl-rpj3b",
           "9b": "openflamingo-9b-vitl-mpt7b", "9b-deprecated": "openflamingo-9b-deprecated"}


def test_every_layout_has_a_preset():
    assert sorted(PRESETS) == sorted(gen.LAYOUTS)


@pytest.mark.parametrize("layout", sorted(PRESETS))
def test_pt_keys_are_what_the_model_preset_loads(tmp_path, layout):
    from ckpt_tools.diff import diff_keys
    from ckpt_tools.targets import preset_side

    path = gen.generate(layout, SCALE, "pt", out=tmp_path / "c.pt")
    state = torch.load(path, weights_only=True)
    report = diff_keys(path, preset_side(PRESETS[layout]))
    covered = [e for e in report.entries if e.ckpt_key is not None]
    assert report.unexpected == []  # nothing the model lacks
    assert report.counts["missing_unexpected"] == 0  # nothing the model needs is left out
    assert sorted([e.ckpt_key for e in covered] + [k for e in covered for k in e.also]) == sorted(state)
    assert {t.dtype for t in state.values()} == {torch.float32}
    # Only the first dimension is scaled: the rest of every shape is the model's.
    assert [e.ckpt_key for e in covered if e.ckpt.shape[1:] != e.model.shape[1:]] == []


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
    assert [k for k in pt if not torch.equal(pt[k], legacy[k])] == []
    assert [k for k in pt if not torch.equal(pt[k], st[k])] == []
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

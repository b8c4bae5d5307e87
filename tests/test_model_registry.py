"""The registry of published OpenFlamingo checkpoints: skeletons on meta vs the reference key list."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch

from ckpt_tools.meta import TensorMeta, metas_from_state_dict
from ckpt_tools.presets import available_presets
from ckpt_tools.remap import apply_remap, rules_from_dicts
from model import checks, registry

REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "data" / "openflamingo-released-keys.json"
PUBLISHED = [spec.name for spec in registry.PUBLISHED]


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"reference key list not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def skeletons() -> dict:
    return {}


def skeleton_metas(name: str, cache: dict) -> dict[str, TensorMeta]:
    if name not in cache:
        cache[name] = metas_from_state_dict(registry.specs()[name].build(device="meta").state_dict())
    return cache[name]


def reference_entry(reference: dict, name: str) -> dict:
    """The reference lists the base checkpoints; a langinstruct variant has its base's layout."""
    repo = registry.specs()[name].repo_id.removesuffix("-langinstruct")
    return reference[repo]


def test_presets_are_registered_through_the_entry_point():
    found = available_presets()
    assert set(PUBLISHED) | {"openflamingo-tiny"} <= set(found)
    nine = found["openflamingo-9b-vitl-mpt7b"]
    assert (nine.repo_id, nine.filename) == ("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "checkpoint.pt")
    assert nine.info["lang_encoder"] == "anas-awadalla/mpt-7b"
    assert nine.info["lang_encoder_revision"] == "68e1a8e0ebb9b30f3c45c1ef6195980f29063ae2"
    assert nine.info["cross_attn_every_n_layers"] == 4
    assert nine.info["decoder_layers_attr_name"] == "transformer.blocks"
    full_state_dict = [{"rename": [r"\.decoder_layer\.", "."]},
                       {"drop": ["lang_encoder.old_decoder_blocks.*", "lang_encoder.gated_cross_attn_layers.*"]}]
    assert found["openflamingo-4b-vitl-rpj3b"].remap == [
        {"rename": [r"^lang_encoder\.embed_out\.", "lang_encoder.lm_head."]}, *full_state_dict]
    assert found["openflamingo-9b-deprecated"].remap == [{"drop": "lang_encoder.gated_cross_attn_layers.*"},
                                                          *full_state_dict]


def test_registry_imports_without_torch_and_serves_remap_presets():
    import subprocess
    import sys

    code = ("import sys; from ckpt_tools.presets import available_presets; available_presets(); "
            "from ckpt_tools.remap import preset_rules; print([r.to_dict() for r in "
            "preset_rules('openflamingo-9b-deprecated')][0], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'drop': 'lang_encoder.gated_cross_attn_layers.*'} False"


@pytest.mark.parametrize("name", PUBLISHED)
def test_skeleton_holds_every_published_key_with_its_shape(name, reference, skeletons):
    entry = reference_entry(reference, name)
    preset = registry.specs()[name].preset()
    model = skeleton_metas(name, skeletons)
    remapped = apply_remap(entry["tensors"], rules_from_dicts(preset.remap)).mapping
    mismatched = {new: (entry["tensors"][old]["shape"], model[new].shape if new in model else None)
                  for old, new in remapped.items()
                  if new not in model or list(model[new].shape) != entry["tensors"][old]["shape"]}
    assert mismatched == {}
    assert preset.info["tokenizer_length"] == entry["tokenizer_length"]
    assert preset.info["cross_attn_every_n_layers"] == entry["cross_attn_every_n_layers"]
    assert preset.info["decoder_layers_attr_name"] == entry["decoder_layers_attr_name"]


@pytest.mark.parametrize("name", [*PUBLISHED, "openflamingo-tiny"])
def test_expect_missing_and_require_partition_the_model(name, skeletons):
    """Every key is either frozen (may be missing) or trained (required), never both."""
    preset = registry.specs()[name].preset()
    both, neither = [], []
    for key in skeleton_metas(name, skeletons):
        frozen = any(fnmatch.fnmatchcase(key, g) for g in preset.expect_missing)
        trained = any(fnmatch.fnmatchcase(key, g) for g in preset.require)
        (both if frozen and trained else neither if not (frozen or trained) else []).append(key)
    assert both == [] and neither == []


@pytest.mark.parametrize("name", PUBLISHED)
def test_required_keys_are_exactly_the_published_ones(name, reference, skeletons):
    entry = reference_entry(reference, name)
    preset = registry.specs()[name].preset()
    required = {k for k in skeleton_metas(name, skeletons)
                if any(fnmatch.fnmatchcase(k, g) for g in preset.require)}
    published = set(apply_remap(entry["tensors"], rules_from_dicts(preset.remap)).mapping.values())
    assert required <= published
    # the 4B files also keep the untied output head; everything else they hold is required
    assert published - required <= {"lang_encoder.lm_head.weight"}


def test_9b_skeleton_builds_on_meta():
    # its speed (first build < 3 s) is measured by scripts/bench/bench_model.py, not asserted here:
    # a wall-clock bound in a unit test fails on a loaded machine
    model = registry.specs()["openflamingo-9b-vitl-mpt7b"].build(device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 8_000_000_000
    assert len(model.gated_cross_attn_layers) == 8


def test_skeleton_state_dict_has_no_alias_names(skeletons):
    keys = skeleton_metas("openflamingo-9b-vitl-mpt7b", skeletons)
    assert not [k for k in keys if "old_decoder_blocks" in k or "gated_cross_attn_layers" in k]
    assert not [k for k in keys if ".decoder_layer." in k]
    xattn = checks.xattn_layers(keys)
    assert xattn == {"lang_encoder.transformer.blocks": [3, 7, 11, 15, 19, 23, 27, 31]}


def test_hints_name_the_cross_attention_interval_the_checkpoint_implies(reference, skeletons):
    ckpt = {k: TensorMeta.of(k, v["shape"], "F32")
            for k, v in reference["openflamingo/OpenFlamingo-9B-vitl-mpt7b"]["tensors"].items()}
    model = metas_from_state_dict(registry.specs()["openflamingo-3b-vitl-mpt1b"].build().state_dict())
    found = {h["kind"]: h for h in checks.hints(ckpt, model)}
    assert found["cross_attn_every_n_layers"]["detail"] == (
        "checkpoint has cross-attention at layers 3, 7, ..., 31: cross_attn_every_n_layers=4; the model has 1")
    assert found["cross_attn_every_n_layers"]["fix"] == "build the model with cross_attn_every_n_layers=4"
    # a 2048-wide MPT-1B against the 4096-wide MPT-7B file: a different LM, not a tokenizer problem
    assert found["language_model"]["detail"] == (
        "lang_encoder.transformer.wte.weight is 4096 wide in the checkpoint and 2048 in the model")


def test_hints_infer_the_tokenizer_length_from_the_embedding_rows():
    model = {"lang_encoder.transformer.wte.weight": TensorMeta.of("w", (50277, 64), "F32")}
    ckpt = {"lang_encoder.transformer.wte.weight": TensorMeta.of("w", (50280, 64), "F32")}
    (hint,) = checks.hints(ckpt, model)
    assert hint["kind"] == "tokenizer_length"
    assert hint["detail"] == ("lang_encoder.transformer.wte.weight has 50280 rows in the checkpoint: "
                              "a tokenizer of length 50280; the model has 50277")
    assert hint["fix"] == ("use the checkpoint's tokenizer plus <|endofchunk|>, <image> (and <PAD> if it has "
                           "no pad token) so len(tokenizer) == 50280, then resize the embeddings")


def test_hints_are_empty_when_checkpoint_and_model_agree(reference, skeletons):
    ckpt = {k: {"shape": v["shape"]}
            for k, v in reference["openflamingo/OpenFlamingo-9B-vitl-mpt7b"]["tensors"].items()}
    assert checks.hints(ckpt, skeleton_metas("openflamingo-9b-vitl-mpt7b", skeletons)) == []


def test_hints_report_an_interval_no_setting_produces():
    model = {f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.attn_gate": {"shape": [1]} for i in range(8)}
    ckpt = {f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.attn_gate": {"shape": [1]} for i in (1, 2, 5)}
    (hint,) = checks.hints(ckpt, model)
    assert hint["detail"] == ("checkpoint has cross-attention at layers 1, 2, 5: no cross_attn_every_n_layers "
                              "fits that pattern; the model has 1")


def test_the_gate_check_flags_gates_that_never_left_zero():
    from ckpt_tools.stats import ValueCheck, run_checks

    gate_checks = [ValueCheck(**check) for check in checks.VALUE_CHECKS]
    model = registry.TINY.build(device="cpu")
    (problem,) = run_checks(dict(model.state_dict(keep_vars=True)), gate_checks)
    assert problem["detail"].startswith("xattn_gates_trained: every attn_gate/ff_gate is exactly 0.0")
    with torch.no_grad():
        model.gated_cross_attn_layers[0].attn_gate.fill_(0.25)
    assert run_checks(dict(model.state_dict(keep_vars=True)), gate_checks) == []
    meta = registry.TINY.build(device="meta")
    assert run_checks(dict(meta.state_dict(keep_vars=True)), gate_checks) == []


def test_tiny_preset_builds_for_real_and_deterministically():
    a, b = registry.TINY.build(device="cpu"), registry.TINY.build(device="cpu")
    assert a.perceiver.latents.device.type == "cpu"
    first, second = a.state_dict(), b.state_dict()
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    assert a.lang_encoder.get_input_embeddings().weight.shape == (registry.TINY.tokenizer_length, 32)
    assert len(registry.tiny_tokenizer()) == registry.TINY.tokenizer_length

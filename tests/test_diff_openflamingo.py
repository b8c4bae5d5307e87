"""The OpenFlamingo presets against the published layouts (../shared/reference), on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_tools.diff import diff_keys
from ckpt_tools.meta import TensorMeta
from ckpt_tools.targets import preset_side

# a copy of ../shared/reference/openflamingo-released-keys.json kept in the repository
REFERENCE = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "data" / "openflamingo-released-keys.json"
LAYOUTS = {
    "openflamingo-3b-vitl-mpt1b": "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
    "openflamingo-4b-vitl-rpj3b": "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
    "openflamingo-9b-vitl-mpt7b": "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
    "openflamingo-9b-deprecated": "openflamingo/OpenFlamingo-9B-deprecated",
}
V1_ALIAS = "lang_encoder.gated_cross_attn_layers."

pytestmark = pytest.mark.skipif(not REFERENCE.exists(), reason="reference layouts not available")


def layout(preset: str) -> dict[str, TensorMeta]:
    tensors = json.loads(REFERENCE.read_text())[LAYOUTS[preset]]["tensors"]
    return {k: TensorMeta.of(k, v["shape"], v["dtype"]) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def sides():
    cache: dict = {}

    def get(name):
        if name not in cache:
            cache[name] = preset_side(name, cached=False)
        return cache[name]

    return get


def kinds(report):
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(p.key)
    return out


@pytest.mark.parametrize("preset", list(LAYOUTS))
def test_every_published_layout_is_ok_with_nothing_unexpected(preset, sides):
    metas = layout(preset)
    report = diff_keys(metas, sides(preset))
    assert report.verdict == "ok", report.problems[:3]
    assert report.counts["unexpected"] == 0 and report.counts["missing_unexpected"] == 0
    assert report.counts["matched"] == len(metas)  # nothing dropped, nothing left over
    assert report.dropped == []


def test_4b_embed_out_is_remapped_to_lm_head(sides):
    report = diff_keys(layout("openflamingo-4b-vitl-rpj3b"), sides("openflamingo-4b-vitl-rpj3b"))
    (entry,) = [e for e in report.entries if e.ckpt_key == "lang_encoder.embed_out.weight"]
    assert entry.name == "lang_encoder.lm_head.weight"
    assert entry.status == "matched"


def test_v1_duplicates_are_not_unexpected(sides):
    metas = layout("openflamingo-9b-deprecated")
    for key, meta in list(metas.items()):
        if ".gated_cross_attn_layer." in key:
            index = key.split(".")[3]
            alias = V1_ALIAS + index + "." + key.split(".gated_cross_attn_layer.")[1]
            metas[alias] = meta.renamed(alias)
    report = diff_keys(metas, sides("openflamingo-9b-deprecated"))
    assert report.verdict == "ok"
    assert report.counts["unexpected"] == 0
    assert len(report.dropped) == 88 and all(k.startswith(V1_ALIAS) for k in report.dropped)


def test_wrong_cross_attention_interval_names_the_setting(sides):
    # a file trained with cross_attn_every_n_layers=4 against the 3B model (every layer)
    metas = {k: v for k, v in layout("openflamingo-3b-vitl-mpt1b").items()
             if ".gated_cross_attn_layer." not in k or int(k.split(".")[3]) % 4 == 3}
    report = diff_keys(metas, sides("openflamingo-3b-vitl-mpt1b"))
    assert report.verdict == "fail"
    assert report.counts["missing_unexpected"] == 18 * 11
    hint = [h for h in report.hints if h["kind"] == "cross_attn_every_n_layers"][0]
    assert "cross_attn_every_n_layers=4; the model has 1" in hint["detail"]
    assert "layers 3, 7, ..., 23" in hint["detail"]
    layers = [h for h in report.hints if h["kind"] == "layers"][0]
    assert layers["checkpoint_layers"] == [3, 7, 11, 15, 19, 23]
    rows = {r.module: r.status for r in report.coverage}
    assert rows["lang_encoder.transformer.blocks.{3,7,11,15,19,23}.gated_cross_attn_layer.*"] == "ok"
    (row,) = report.problem_groups()  # 198 missing keys, one line
    assert row[:3] == ["missing_unexpected", "lang_encoder.transformer.blocks.{0..2,4..6,8..10,12..14,16..18,"
                       "20..22}.gated_cross_attn_layer.*", 198]


def test_wrong_tokenizer_length_is_a_shape_mismatch_with_the_length(sides):
    metas = layout("openflamingo-3b-vitl-mpt1b")
    key = "lang_encoder.transformer.wte.weight"
    metas[key] = TensorMeta.of(key, (50277, 2048), "F32")
    report = diff_keys(metas, sides("openflamingo-3b-vitl-mpt1b"))
    assert report.verdict == "fail"
    (problem,) = report.problems
    assert (problem.kind, problem.key) == ("shape_mismatch", key)
    assert problem.detail == "checkpoint [50277, 2048], model [50280, 2048]: excluded from the load"
    assert "50277" in problem.fix


def test_wrong_tokenizer_length_on_a_neox_embedding_gets_the_preset_fix(sides):
    metas = layout("openflamingo-4b-vitl-rpj3b")
    key = "lang_encoder.gpt_neox.embed_in.weight"
    metas[key] = TensorMeta.of(key, (50277, 2560), "F32")
    report = diff_keys(metas, sides("openflamingo-4b-vitl-rpj3b"))
    (problem,) = report.problems
    assert problem.kind == "shape_mismatch"
    hint = [h for h in report.hints if h["kind"] == "tokenizer_length"][0]
    assert problem.fix == hint["fix"]  # the preset's own explanation beats the generic one


def test_ddp_prefix_suggests_strip_prefix(sides):
    metas = {f"module.{k}": v.renamed(f"module.{k}") for k, v in layout("openflamingo-9b-vitl-mpt7b").items()}
    report = diff_keys(metas, sides("openflamingo-9b-vitl-mpt7b"))
    assert report.verdict == "fail"
    assert report.counts["unexpected"] == 158
    assert {p.fix for p in report.problems} == {"--strip-prefix module."}
    fixed = diff_keys(metas, sides("openflamingo-9b-vitl-mpt7b"), remap=[{"strip_prefix": "module."}])
    assert fixed.verdict == "ok"

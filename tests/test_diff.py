"""diff_keys on tiny models: every category, the inferred fixes, aliases on both sides, rendering."""

from __future__ import annotations

import json

import pytest
import torch
from diffload_models import build_tiny, metas, trained_state

from ckpt_tools.checkpoint import Checkpoint
from ckpt_tools.diff import COUNT_NAMES, diff_keys, group_problems
from ckpt_tools.meta import TensorMeta
from ckpt_tools.presets import ModelPreset
from ckpt_tools.remap import rules_from_cli


class MemoryCheckpoint(Checkpoint):
    """A Checkpoint over an in-memory state dict, aliases found by storage like the real readers."""

    format = "memory"

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__("memory.pt")
        self._state = state
        self._metas = metas(state)
        groups: dict[tuple, list[str]] = {}
        for name, t in state.items():
            groups.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
        self.aliases = [g for g in groups.values() if len(g) > 1]

    def _load_tensor(self, key):
        return self._state[key]


def kinds(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(p.key)
    return out


def test_published_like_checkpoint_is_ok_and_frozen_keys_are_expected():
    model = build_tiny(every=1)
    report = diff_keys(metas(trained_state(model)), model)
    assert report.verdict == "ok"
    assert report.counts == {"matched": 13, "dtype_mismatch": 0, "shape_mismatch": 0, "unexpected": 0,
                             "missing_expected": 11, "missing_unexpected": 0}
    assert report.problems == []
    rows = {r.module: (r.status, r.keys_covered, r.keys_total) for r in report.coverage}
    assert rows == {
        "vision.*": ("missing (expected)", 0, 2),
        "embed.*": ("ok", 1, 1),
        "blocks.{0..3}.lin.*": ("missing (expected)", 0, 8),
        "blocks.{0..3}.x.*": ("ok", 12, 12),
        "stat": ("missing (expected)", 0, 1),
    }


def test_non_persistent_buffers_are_not_part_of_the_model_side():
    model = build_tiny()
    report = diff_keys(metas(trained_state(model)), model)
    names = {name for entry in report.entries for name in entry.names}
    assert "embed.weight" in names  # the model side was listed
    assert "scratch" not in names


def test_dtype_mismatch_is_reported_with_the_cast_and_does_not_fail():
    model = build_tiny()
    state = trained_state(model)
    state["blocks.0.x.proj.weight"] = state["blocks.0.x.proj.weight"].to(torch.bfloat16)
    report = diff_keys(metas(state), model)
    assert report.verdict == "ok"
    assert report.counts["dtype_mismatch"] == 1
    (problem,) = report.problems
    assert (problem.kind, problem.key) == ("dtype_mismatch", "blocks.0.x.proj.weight")
    assert problem.detail == "checkpoint BF16, model F32: will be cast BF16 -> F32"
    assert any(r.status == "ok (cast BF16->F32)" for r in report.coverage)


def test_wrong_tokenizer_length_is_a_shape_mismatch_with_the_size_in_the_fix():
    model = build_tiny(vocab=10)
    state = trained_state(build_tiny(vocab=12))
    report = diff_keys(metas(state), model)
    assert report.verdict == "fail"
    assert report.counts["shape_mismatch"] == 1  # embed.weight and head.weight are one tensor
    (problem,) = [p for p in report.problems if p.kind == "shape_mismatch"]
    assert problem.detail == "checkpoint [12, 4], model [10, 4]: excluded from the load"
    assert "saved with 12 tokens (the model has 10)" in problem.fix


def test_missing_trained_parameter_fails_and_expect_missing_allows_it():
    model = build_tiny()
    state = trained_state(model)
    del state["blocks.2.x.gate"]
    report = diff_keys(metas(state), model)
    assert report.verdict == "fail"
    assert kinds(report) == {"missing_unexpected": ["blocks.2.x.gate"]}
    assert report.problems[0].detail == "not in the checkpoint (a trained parameter)"
    allowed = diff_keys(metas(state), model, expect_missing=["blocks.2.x.*"])
    assert allowed.verdict == "ok"
    assert allowed.counts["missing_expected"] == 12


def test_require_makes_a_frozen_key_required_and_a_glob_matching_nothing_is_reported():
    model = build_tiny()
    state = metas(trained_state(model))
    report = diff_keys(state, model, require=["vision.*"])
    assert kinds(report) == {"missing_unexpected": ["vision.weight", "vision.bias"]}
    assert "--require 'vision.*'" in report.problems[0].detail
    typo = diff_keys(state, model, require=["visoin.*"])
    assert typo.verdict == "fail"
    assert typo.counts["missing_unexpected"] == 1
    assert typo.problems[0].key == "visoin.*"


def test_unexpected_key_fails():
    model = build_tiny()
    state = metas(trained_state(model))
    state["extra.weight"] = TensorMeta.of("extra.weight", (2,), "F32")
    report = diff_keys(state, model)
    assert report.verdict == "fail"
    assert kinds(report) == {"unexpected": ["extra.weight"]}
    assert report.counts["unexpected"] == 1


def test_ddp_prefix_suggests_strip_prefix_and_the_rule_fixes_it():
    model = build_tiny()
    state = {f"module.{k}": v for k, v in metas(trained_state(model)).items()}
    report = diff_keys(state, model)
    assert report.verdict == "fail"
    assert report.counts["matched"] == 0
    assert {p.fix for p in report.problems} == {"--strip-prefix module."}
    assert report.hints[0]["fix"] == "--strip-prefix module."
    fixed = diff_keys(state, model, remap=rules_from_cli(strip_prefix=["module."]))
    assert fixed.verdict == "ok"
    assert fixed.counts["matched"] == 13


def test_missing_prefix_suggests_add_prefix():
    model = torch.nn.Module()
    model.lang = build_tiny()
    state = metas(trained_state(model.lang))
    report = diff_keys(state, model)
    assert {p.fix for p in report.problems if p.kind == "unexpected"} == {"--add-prefix lang."}
    assert diff_keys(state, model, remap=[{"add_prefix": "lang."}]).verdict == "ok"


def test_known_rename_embed_out_to_lm_head():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(2, 2, bias=False)
    report = diff_keys({"embed_out.weight": TensorMeta.of("embed_out.weight", (2, 2), "F32")}, model)
    (unexpected,) = [p for p in report.problems if p.kind == "unexpected"]
    assert unexpected.fix == r"--rename '^embed_out\.=lm_head.'"  # a top-level key has no dot before it
    regex, repl = unexpected.fix.split("'")[1].rsplit("=", 1)
    assert diff_keys({"embed_out.weight": TensorMeta.of("embed_out.weight", (2, 2), "F32")}, model,
                     remap=[{"rename": [regex, repl]}]).verdict == "ok"
    assert any(h["kind"] == "rename" and "transformers 5" in h["detail"] for h in report.hints)
    model.inner = torch.nn.Module()
    nested = torch.nn.Module()
    nested.lang = torch.nn.Module()
    nested.lang.lm_head = torch.nn.Linear(2, 2, bias=False)
    key = "lang.embed_out.weight"
    report = diff_keys({key: TensorMeta.of(key, (2, 2), "F32")}, nested)
    fix = [p.fix for p in report.problems if p.kind == "unexpected"][0]
    assert fix == r"--rename '\.embed_out\.=.lm_head.'"
    regex, repl = fix.split("'")[1].rsplit("=", 1)
    assert diff_keys({key: TensorMeta.of(key, (2, 2), "F32")}, nested,
                     remap=[{"rename": [regex, repl]}]).verdict == "ok"


def test_a_shallower_network_gives_one_layer_hint_per_numbered_block():
    def stage(depth):
        model = torch.nn.Module()
        model.layer = torch.nn.ModuleList(torch.nn.Sequential() for _ in range(depth))
        for i, block in enumerate(model.layer):
            block.conv = torch.nn.Linear(2, 2, bias=False)
            block.bn = torch.nn.LayerNorm(2)
            if i == 0:
                block.down = torch.nn.Linear(2, 2, bias=False)  # block 0 only, on both sides
        return model

    report = diff_keys(metas(stage(2).state_dict()), stage(3))
    (hint,) = [h for h in report.hints if h["kind"] == "layers"]
    assert hint["detail"] == "the checkpoint has layer.N at layers 0,1; the model at 0..2"


def test_wrong_cross_attention_interval_gives_a_layer_hint():
    checkpoint = metas(trained_state(build_tiny(every=1)))  # xattn at 0..3
    report = diff_keys(checkpoint, build_tiny(every=2))  # xattn at 1, 3
    assert report.verdict == "fail"
    assert sorted(kinds(report)["unexpected"]) == sorted(
        f"blocks.{i}.x.{p}" for i in (0, 2) for p in ("gate", "proj.weight", "proj.bias"))
    (hint,) = [h for h in report.hints if h["kind"] == "layers"]
    assert hint["checkpoint_layers"] == [0, 1, 2, 3]
    assert hint["model_layers"] == [1, 3]
    assert hint["detail"] == "the checkpoint has blocks.N.x at layers 0..3; the model at 1,3 (every 2)"
    assert {p.fix for p in report.problems} == {hint["fix"]}
    # and the other way round: the model wants layers the checkpoint lacks
    report = diff_keys(metas(trained_state(build_tiny(every=2))), build_tiny(every=1))
    assert sorted(kinds(report)["missing_unexpected"]) == sorted(
        f"blocks.{i}.x.{p}" for i in (0, 2) for p in ("gate", "proj.weight", "proj.bias"))
    rows = {r.module: r.status for r in report.coverage}
    assert rows["blocks.{1,3}.x.*"] == "ok"
    assert rows["blocks.{0,2}.x.*"] == "MISSING"


def test_model_alias_is_covered_by_any_of_its_names():
    model = build_tiny()
    state = metas(trained_state(model))
    del state["embed.weight"]  # head.weight is the same tensor in the model
    report = diff_keys(state, model)
    assert report.verdict == "ok"
    assert report.counts["matched"] == 13


def test_checkpoint_duplicates_count_once():
    model = build_tiny(every=2)
    state = trained_state(model)
    # a v1-style file: every xattn tensor also stored under a second module name (same storage)
    for key in list(state):
        if ".x." in key:
            layer = key.split(".")[1]
            state[f"xattn_layers.{layer}.{key.split('.x.')[1]}"] = state[key]
    ckpt = MemoryCheckpoint(state)
    assert len(ckpt.aliases) == 6
    report = diff_keys(ckpt, model)
    assert report.verdict == "ok"
    assert report.counts["unexpected"] == 0
    assert len(report.duplicates) == 6
    assert report.duplicates["xattn_layers.1.gate"] == "blocks.1.x.gate"
    # an alias group that lands nowhere is one unexpected tensor, not two
    extra = torch.zeros(2)
    state.update({"lost.a": extra, "lost.b": extra})
    report = diff_keys(MemoryCheckpoint(state), model)
    assert report.counts["unexpected"] == 1
    assert kinds(report) == {"unexpected": ["lost.a"]}


def test_target_can_be_a_mapping_or_another_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = build_tiny()
    state = trained_state(model)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, a)
    smaller = {k: v for k, v in state.items() if k != "blocks.0.x.gate"}
    save_file(smaller, b)
    assert diff_keys(str(a), str(a)).verdict == "ok"
    report = diff_keys(str(b), str(a))
    assert kinds(report) == {"missing_unexpected": ["blocks.0.x.gate"]}  # no trainability known
    assert diff_keys(metas(smaller), metas(state), expect_missing=["*.gate"]).verdict == "ok"


def test_preset_remap_expectations_and_hints_apply():
    def hints(ck, model_metas):
        return [{"kind": "interval", "message": "every 1", "fix": "every_n=1", "keys": ["blocks.*"]}]

    preset = ModelPreset(name="tiny-test", build=lambda device="meta", dtype=None: build_tiny(every=2),
                         remap=[{"strip_prefix": "model."}], expect_missing=["blocks.3.x.*"],
                         require=["vision.weight"], hints=hints)
    state = {f"model.{k}": v for k, v in metas(trained_state(build_tiny(every=1))).items()}
    report = diff_keys(state, preset)
    assert report.target == "tiny-test"
    assert "strip_prefix 'model.'" in report.rules
    problems = kinds(report)
    assert problems["missing_unexpected"] == ["vision.weight"]
    assert sorted(problems["unexpected"]) == sorted(f"blocks.{i}.x.{p}" for i in (0, 2)
                                                    for p in ("gate", "proj.weight", "proj.bias"))
    assert {p.fix for p in report.problems if p.key.startswith("blocks.")} == {"every_n=1"}
    assert {"kind": "interval", "detail": "every 1", "fix": "every_n=1", "keys": ["blocks.*"]} in report.hints
    # the user's --expect-missing beats the preset's require
    assert "vision.weight" not in kinds(diff_keys(state, preset, expect_missing=["vision.*"])).get(
        "missing_unexpected", [])


def test_meta_model_needs_no_weights():
    model = build_tiny(device="meta")
    report = diff_keys(metas(trained_state(build_tiny())), model)
    assert report.verdict == "ok"
    assert report.counts["matched"] == 13


def test_to_dict_has_the_stable_names_and_is_json():
    model = build_tiny()
    state = metas(trained_state(model))
    state["extra.weight"] = TensorMeta.of("extra.weight", (2,), "F32")
    data = json.loads(json.dumps(diff_keys(state, model).to_dict()))
    assert data["verdict"] == "fail"
    assert tuple(data["counts"]) == COUNT_NAMES
    assert data["problems"] == [{"kind": "unexpected", "key": "extra.weight",
                                 "detail": "in the checkpoint, nowhere in the model", "fix": None}]
    assert set(data["coverage"][0]) == {"module", "status", "keys_covered", "keys_total", "params_covered",
                                        "params_total"}
    assert data["hints"] == []
    assert "load" not in data


def test_thousands_of_problems_render_in_a_few_lines():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(300))
    state = {f"module.layers.{i}.{p}": TensorMeta.of(f"module.layers.{i}.{p}", s, "F32")
             for i in range(300) for p, s in (("weight", (2, 2)), ("bias", (2,)))}
    report = diff_keys(state, model)
    assert report.counts["unexpected"] == 600
    assert report.counts["missing_unexpected"] == 600
    rows = group_problems(report.problems)
    assert rows == [["missing_unexpected", "layers.{0..299}.*", 600, "not in the checkpoint (a trained parameter)",
                     "--strip-prefix module."],
                    ["unexpected", "module.layers.{0..299}.*", 600, "in the checkpoint, nowhere in the model",
                     "--strip-prefix module."]]
    assert len(report.to_markdown().splitlines()) < 20
    assert [r.module for r in report.coverage] == ["layers.*"]


def test_each_problem_row_shows_the_detail_of_its_own_keys():
    # shape mismatches share a fix but not their shapes: conv1's shapes must not label the fc row
    model = torch.nn.Module()
    model.conv1 = torch.nn.Conv2d(3, 4, 7, bias=False)
    model.fc = torch.nn.Linear(4, 10)
    state = {"conv1.weight": TensorMeta.of("conv1.weight", (4, 3, 3, 3), "F32"),
             "fc.weight": TensorMeta.of("fc.weight", (1000, 4), "F32"),
             "fc.bias": TensorMeta.of("fc.bias", (1000,), "F32")}
    rows = {row[1]: row[3] for row in group_problems(diff_keys(state, model).problems)}
    assert rows["conv1.weight"] == "checkpoint [4, 3, 3, 3], model [4, 3, 7, 7]: excluded from the load"
    assert rows["fc.*"].startswith("checkpoint [1000")


def test_table_rendering_fits_a_terminal(capsys):
    from ckpt_tools.render import render

    model = build_tiny(every=2)
    render(diff_keys(metas(trained_state(build_tiny(every=1))), model), "table")
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out
    assert max(len(line) for line in out.splitlines()) <= 160


@pytest.mark.parametrize("bad", [42, object()])
def test_bad_target_is_a_usage_error(bad):
    from ckpt_tools.errors import UsageError

    with pytest.raises(UsageError):
        diff_keys({}, bad)


def test_preset_skeleton_listing_is_cached_by_fingerprint(tmp_path, monkeypatch):
    from ckpt_tools.targets import preset_side

    monkeypatch.setenv("CKPT_CACHE", str(tmp_path))
    builds = []

    def build(device="meta", dtype=None):
        builds.append(device)
        return build_tiny(every=2)

    preset = ModelPreset(name="tiny-cache", build=build, remap=[{"strip_prefix": "model."}])
    first = preset_side(preset)
    second = preset_side(preset)
    assert builds == ["meta"]  # the second listing came from the cache
    assert second.metas == first.metas and second.groups == first.groups
    assert second.trainable == first.trainable and second.preset is preset
    state = {f"model.{k}": v for k, v in metas(trained_state(build_tiny(every=2))).items()}
    assert diff_keys(state, second).to_dict() == diff_keys(state, first).to_dict()
    changed = ModelPreset(name="tiny-cache", build=build, remap=[{"strip_prefix": "module."}])
    preset_side(changed)
    assert builds == ["meta", "meta"]  # other preset data, other key
    assert len(list((tmp_path / "skeletons").glob("tiny-cache-*.json"))) == 1  # the stale one is gone
    monkeypatch.setenv("CKPT_SKELETON_CACHE", "0")
    preset_side(changed)
    assert len(builds) == 3


def test_a_prefix_that_lines_up_names_but_not_shapes_is_not_suggested():
    # a GPT-2-like checkpoint whose block names line up with the tiny OpenFlamingo's vision blocks
    # after a prefix swap, but whose tensors do not fit them: no prefix fix may be offered
    checkpoint = {f"transformer.h.{i}.{leaf}": TensorMeta.of(f"transformer.h.{i}.{leaf}", (7, 3), "F32")
                  for i in range(2) for leaf in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")}
    report = diff_keys(checkpoint, "openflamingo-tiny")
    assert [h for h in report.hints if h["kind"] in ("prefix", "rename")] == []


def test_running_statistics_of_a_trained_module_are_required():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = {k: TensorMeta.from_tensor(k, v) for k, v in model.state_dict().items() if "running" not in k}
    report = diff_keys(state, model)
    assert sorted(kinds(report)["missing_unexpected"]) == ["1.running_mean", "1.running_var"]


def test_running_statistics_of_a_frozen_module_may_be_missing():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.requires_grad_(False)
    state = {k: TensorMeta.from_tensor(k, v) for k, v in model.state_dict().items() if "running" not in k}
    assert diff_keys(state, model).verdict == "ok"


def _shifted_layers():
    """A model with layers 0..3 and a checkpoint of it saved under 'model.' with layers 1..4."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3, bias=False) for _ in range(4))
    ck = {f"model.layers.{i + 1}.weight": TensorMeta.of(f"model.layers.{i + 1}.weight", (3, 3), "F32")
          for i in range(4)}
    return ck, model


def test_inferred_rules_that_fit_are_the_fix_of_the_problems_they_solve():
    ck, model = _shifted_layers()
    report = diff_keys(ck, model)
    assert {p.fix for p in report.problems} == {"apply the inferred rules: --auto-remap (or --write-rules FILE to "
                                                "keep them)"}


def test_guesses_that_contradict_inferred_rules_are_not_shown():
    ck, model = _shifted_layers()
    assert diff_keys(ck, model).hints == []


def test_the_html_report_shows_the_inferred_rules(tmp_path):
    from ckpt_tools.html import render_html

    ck, model = _shifted_layers()
    page = render_html("diff", diff_keys(ck, model).to_dict(), command_line="ckpt diff x", tool_version="0")
    assert "--rename &#x27;^layers\\.1\\.=layers.0.&#x27;" in page

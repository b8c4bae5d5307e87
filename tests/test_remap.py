"""Remap rules on plain key lists: kinds, chaining, presets, collisions, rule sources."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_tools.errors import RemapError, UsageError
from ckpt_tools.remap import (
    Rule,
    apply_remap,
    available_remaps,
    parse_rename,
    preset_rules,
    remap_module_names,
    rules_from_cli,
    rules_from_dicts,
    rules_to_json,
)


def test_strip_prefix_is_leading_only():
    result = apply_remap(["module.a", "enc.module.b", "c"], [Rule("strip_prefix", ("module.",))])
    assert result.mapping == {"module.a": "a", "enc.module.b": "enc.module.b", "c": "c"}
    assert result.renamed == {"module.a": "a"}


def test_add_prefix_and_unmatched_rules():
    rules = [Rule("add_prefix", ("model.",)), Rule("strip_prefix", ("zzz.",)), Rule("drop", ("nothing*",))]
    result = apply_remap(["a", "b"], rules)
    assert result.mapping == {"a": "model.a", "b": "model.b"}
    assert result.unmatched_rules == rules[1:]


def test_rules_chain_each_sees_previous_output():
    rules = [Rule("strip_prefix", ("module.",)), Rule("rename", (r"^encoder\.", "enc.")),
             Rule("rename", (r"^enc\.", "E."))]
    result = apply_remap(["module.encoder.w"], rules)
    assert result.mapping == {"module.encoder.w": "E.w"}
    assert result.unmatched_rules == []


def test_rename_replaces_every_match_with_groups():
    result = apply_remap(["layers.3.attn.layers.4"], [Rule("rename", (r"layers\.(\d+)", r"blocks.\1"))])
    assert result.mapping["layers.3.attn.layers.4"] == "blocks.3.attn.blocks.4"


def test_drop_and_keep_globs_and_order():
    keys = ["a.weight", "a.bias", "b.weight", "c.weight"]
    rules = [Rule("drop", ("*.bias",)), Rule("keep", ("a.*", "b.*"))]
    result = apply_remap(keys, rules)
    assert list(result.mapping) == ["a.weight", "b.weight"]
    assert result.dropped == ["a.bias", "c.weight"]
    # the key removed by drop is never seen by later rules
    assert result.unmatched_rules == []


def test_keep_that_lets_nothing_through_is_reported():
    rules = [Rule("keep", ("zzz*",))]
    result = apply_remap(["a"], rules)
    assert result.mapping == {} and result.dropped == ["a"]
    assert result.unmatched_rules == rules


def test_collision_names_both_keys():
    with pytest.raises(RemapError) as info:
        apply_remap(["module.x", "x"], [Rule("strip_prefix", ("module.",))])
    assert "'module.x'" in str(info.value) and "'x'" in str(info.value)
    assert "fix:" in str(info.value)


def test_empty_result_name_is_an_error():
    with pytest.raises(RemapError, match="empty name"):
        apply_remap(["module."], [Rule("strip_prefix", ("module.",))])


def test_renamed_by_rule_tracks_explicit_renames_only():
    rules = [Rule("strip_prefix", ("m.",)), Rule("rename", ("^a", "b"))]
    result = apply_remap(["m.a1", "m.c1"], rules)
    assert result.renamed_by_rule == {"m.a1"}


@pytest.mark.parametrize(("kind", "args", "message"), [
    ("rename", ("(unclosed", "x"), "invalid rename"),
    ("rename", ("^(a)", r"\2"), "invalid rename"),
    ("rename", ("only-one",), "takes 2"),
    ("strip_prefix", ("",), "non-empty"),
    ("explode", ("x",), "unknown rule kind"),
])
def test_invalid_rules_raise(kind, args, message):
    with pytest.raises(RemapError, match=message):
        Rule(kind, args)


def test_ddp_preset():
    result = apply_remap(["module.enc.module.w"], preset_rules("ddp"))
    assert result.mapping == {"module.enc.module.w": "enc.module.w"}


def test_compile_preset_removes_the_segment_anywhere():
    keys = ["_orig_mod.a.w", "enc._orig_mod.b.w", "enc.my_orig_mod.c"]
    result = apply_remap(keys, preset_rules("compile"))
    assert list(result.mapping.values()) == ["a.w", "enc.b.w", "enc.my_orig_mod.c"]


def test_fsdp_preset_removes_both_wrapper_segments():
    key = "_fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.w"
    result = apply_remap([key], preset_rules("fsdp"))
    assert result.mapping[key] == "layers.0.mlp.w"


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UsageError, match="ddp"):
        preset_rules("nope")


def test_entry_point_presets_extend_the_registry(monkeypatch):
    import importlib.metadata as md

    class FakeEntryPoint:
        def load(self):
            return lambda: {"mine": [{"strip_prefix": "net."}]}

    real = md.entry_points

    def fake_entry_points(*, group):
        return [FakeEntryPoint()] if group == "ckpt_tools.remaps" else real(group=group)

    monkeypatch.setattr(md, "entry_points", fake_entry_points)
    assert "mine" in available_remaps() and "ddp" in available_remaps()
    assert apply_remap(["net.a"], preset_rules("mine")).mapping == {"net.a": "a"}


def test_rules_from_dicts_schema_and_round_trip():
    items = [{"strip_prefix": "module."}, {"rename": ["^a", "b"]}, {"drop": "*.bias"},
             {"keep": ["x*", "y*"]}, {"add_prefix": "p."}]
    rules = rules_from_dicts(items)
    assert [r.to_dict() for r in rules] == items
    assert json.loads(rules_to_json(rules)) == items


def test_rules_from_dicts_expands_presets():
    rules = rules_from_dicts([{"preset": "ddp"}, {"drop": "x"}])
    assert [r.to_dict() for r in rules] == [{"strip_prefix": "module."}, {"drop": "x"}]
    assert rules[0].origin == "preset ddp"


def test_rules_from_dicts_rejects_two_kinds_in_one_rule():
    with pytest.raises(RemapError, match="exactly one kind"):
        rules_from_dicts([{"drop": "a", "keep": "b"}])


def test_rules_from_cli_order_and_none_when_empty(tmp_path):
    assert rules_from_cli() is None
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[[rule]]\nrename = ["^x", "y"]\n\n[[rule]]\npreset = "compile"\n')
    rules = rules_from_cli(strip_prefix=("s.",), add_prefix=("a.",), rename=("^r=q",), drop=("d1", "d2"),
                           keep=("k",), presets=("ddp",), rules_file=rules_file)
    kinds = [(r.kind, r.args) for r in rules]
    assert kinds == [
        ("strip_prefix", ("module.",)), ("strip_prefix", ("s.",)), ("add_prefix", ("a.",)),
        ("rename", ("^r", "q")), ("drop", ("d1",)), ("drop", ("d2",)), ("keep", ("k",)), ("rename", ("^x", "y")),
        ("rename", (r"(?<![^.])_orig_mod\.", "")),
    ]
    assert rules[7].origin == str(rules_file)


def test_preset_flag_runs_before_user_rules():
    rules = rules_from_cli(drop=("x.*",), presets=("ddp",))
    result = apply_remap(["module.x.w", "module.y.w"], rules)
    assert result.mapping == {"module.y.w": "y.w"} and result.dropped == ["module.x.w"]


def test_rules_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\n")
    with pytest.raises(RemapError, match="invalid TOML"):
        rules_from_cli(rules_file=bad)
    other = tmp_path / "other.toml"
    other.write_text('[[rules]]\ndrop = "x"\n')
    with pytest.raises(RemapError, match="unknown top-level"):
        rules_from_cli(rules_file=other)
    with pytest.raises(UsageError, match="not found"):
        rules_from_cli(rules_file=tmp_path / "missing.toml")


def test_parse_rename_splits_at_last_equals():
    assert parse_rename("a(?=b)=c") == ("a(?=b)", "c")
    assert parse_rename("^x=") == ("^x", "")
    with pytest.raises(UsageError):
        parse_rename("noequals")


def test_property_every_key_is_kept_or_dropped_once():
    from hypothesis import given, reject, settings
    from hypothesis import strategies as st

    segment = st.sampled_from(["module", "enc", "layers", "0", "1", "weight", "_orig_mod"])
    key = st.lists(segment, min_size=1, max_size=5).map(".".join)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(key, unique=True, max_size=12))
    def check(keys):
        rules = [Rule("drop", ("*.1.*",)), *preset_rules("compile")]
        try:
            result = apply_remap(keys, rules)
        except RemapError as exc:  # two keys collided, which the error names
            assert "both map to" in exc.one_line()
            reject()  # hypothesis fails the test when it can find too few inputs that remap
        assert sorted([*result.mapping, *result.dropped]) == sorted(keys)
        assert [new for new in result.mapping.values() if "_orig_mod." in new] == []
        assert len(set(result.mapping.values())) == len(result.mapping)

    check()


def test_remap_checkpoint_takes_rules_as_plain_data(tmp_path):
    from safetensors.torch import load_file, save_file

    from ckpt_tools import remap_checkpoint

    save_file({"module.a": torch.ones(2)}, str(tmp_path / "in.safetensors"))
    remap_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", rules=[{"preset": "ddp"}])
    assert list(load_file(str(tmp_path / "out.safetensors"))) == ["a"]


def test_remap_checkpoint_takes_the_text_of_a_rules_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from ckpt_tools import remap_checkpoint

    save_file({"module.a": torch.ones(2)}, str(tmp_path / "in.safetensors"))
    remap_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors",
                     rules='[[rule]]\nstrip_prefix = "module."\n')
    assert list(load_file(str(tmp_path / "out.safetensors"))) == ["a"]


def test_a_rule_that_is_not_a_rule_is_named(tmp_path):
    from ckpt_tools import remap_checkpoint

    with pytest.raises(RemapError) as bad:
        remap_checkpoint(tmp_path / "in.safetensors", tmp_path / "out.safetensors", rules=[("drop", "x")])
    assert "('drop', 'x')" in str(bad.value)


@pytest.mark.parametrize(("modules", "mapping", "dropped", "want"), [
    # DDP's wrapper stripped: the model's modules move up, the root keeps its name
    (["", "module", "module.0", "module.act"], {"module.0.w": "0.w"}, [],
     {"": "", "module.0": "0", "module.act": "act"}),
    # a prefix added: every module moves under it, one holding no key (an activation) too
    (["", "0", "act"], {"0.w": "x.0.w"}, [], {"": "x", "0": "x.0", "act": "x.act"}),
    # a rename deeper down: modules above it stay, the renamed ones follow
    (["", "a", "a.layers", "a.layers.0"], {"a.layers.0.w": "a.blocks.0.w"}, [],
     {"": "", "a": "a", "a.layers": "a.blocks", "a.layers.0": "a.blocks.0"}),
    # a module whose keys were all dropped goes, with what is below it
    (["", "a", "a.act", "b"], {"b.w": "b.w"}, ["a.w"], {"": "", "b": "b"}),
])
def test_module_names_follow_their_keys(modules, mapping, dropped, want):
    assert remap_module_names(modules, mapping, dropped) == want

"""Property-based tests: the safetensors header validator and the remap rules.

The header properties check that any valid layout is accepted exactly, that no byte-level damage
escapes as anything but InvalidCheckpointError, and that the validator is never more lenient than
the safetensors library itself. The remap properties check round trips, collision detection and
that presets are idempotent.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import HealthCheck, assume, event, given, reject, settings
from hypothesis import strategies as st

safetensors_format = pytest.importorskip("ckpt_tools.formats.safetensors")
remap = pytest.importorskip("ckpt_tools.remap")

from ckpt_tools.errors import InvalidCheckpointError, RemapError  # noqa: E402
from ckpt_tools.meta import DTYPES  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# dtypes the safetensors library reads in every version we support (for the differential test)
COMMON = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]


# -- safetensors headers --------------------------------------------------------------------

names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12).filter(lambda n: n != "__metadata__")
tensor_specs = st.dictionaries(
    names, st.tuples(st.sampled_from(COMMON), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6)
metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


def _layout(specs: dict, meta: dict, order: list[str] | None = None) -> tuple[bytes, dict]:
    header, position = {}, 0
    for name in order or list(specs):
        dtype, shape = specs[name]
        size = math.prod(shape) * int(DTYPES[dtype][0])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(position), header


def _parse(data: bytes):
    return safetensors_format.parse_header(data[:8], lambda n: data[8:8 + n], len(data), "x.safetensors")


@SETTINGS
@given(tensor_specs, metadata, st.randoms())
def test_valid_layouts_are_accepted_exactly(specs, meta, rnd):
    order = list(specs)
    rnd.shuffle(order)
    data, header = _layout(specs, meta, order)
    metas, got_meta, offsets, start = _parse(data)
    assert got_meta == meta
    assert start == len(data) - sum(m.nbytes for m in metas.values())
    for name, (dtype, shape) in specs.items():
        assert (metas[name].dtype, metas[name].shape) == (dtype, tuple(shape))
        assert list(offsets[name]) == header[name]["data_offsets"]


@SETTINGS
@given(tensor_specs, st.data())
def test_damage_is_always_an_invalid_checkpoint_error(specs, data):
    good, _ = _layout(specs, {})
    mutation = data.draw(st.sampled_from(["truncate", "flip", "append", "length"]))
    if mutation == "truncate":
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    elif mutation == "flip":
        at = data.draw(st.integers(0, len(good) - 1))
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1:]
    elif mutation == "append":
        bad = good + data.draw(st.binary(min_size=1, max_size=9))
    else:
        bad = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + good[8:]
    try:
        metas, _, offsets, start = _parse(bad)
    except InvalidCheckpointError as exc:  # the expected outcome of most damage
        event("refused")
        assert "\n" not in exc.one_line()
        return
    event("accepted")  # e.g. a flipped byte inside a tensor's data
    # accepted: then it must really be a consistent layout
    spans = sorted(offsets.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert start + spans[-1][1] == len(bad)
    for name, (begin, end) in offsets.items():
        assert end - begin == metas[name].nbytes


@settings(max_examples=60, deadline=None)
@given(tensor_specs, st.data())
def test_never_more_lenient_than_the_safetensors_library(tmp_path_factory, specs, data):
    from safetensors import safe_open

    good, _ = _layout(specs, {})
    at = data.draw(st.integers(8, len(good) - 1))
    bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1:]
    try:
        _parse(bad)
    except InvalidCheckpointError:  # refusing is never more lenient
        event("refused")
        return
    event("accepted")
    path = tmp_path_factory.getbasetemp() / "differential.safetensors"
    path.write_bytes(bad)
    with safe_open(str(path), framework="pt") as handle:  # must not raise
        for key in handle.keys():
            handle.get_slice(key).get_shape()


def test_known_bad_headers_name_the_problem():
    with pytest.raises(InvalidCheckpointError, match="absurdly large"):
        _parse(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(InvalidCheckpointError, match="duplicate key"):
        raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
        _parse(struct.pack("<Q", len(raw)) + raw + b"\0\0")


# -- remap rules ----------------------------------------------------------------------------

SEGMENTS = ["a", "b", "enc", "dec", "0", "1", "weight", "bias", "module", "_orig_mod",
            "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "lang_encoder", "embed_out", "lm_head"]
keys = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map(".".join)
key_sets = st.lists(keys, min_size=1, max_size=12, unique=True)
prefixes = st.sampled_from(["module.", "model.", "_orig_mod.", "x."])


@SETTINGS
@given(key_sets, prefixes)
def test_add_then_strip_prefix_is_the_identity(key_list, prefix):
    rules = [remap.Rule("add_prefix", (prefix,)), remap.Rule("strip_prefix", (prefix,))]
    result = remap.apply_remap(key_list, rules)
    assert result.mapping == {k: k for k in key_list}
    assert result.renamed == {} and result.dropped == []


@SETTINGS
@given(key_sets, prefixes)
def test_strip_then_add_prefix_restores_prefixed_keys(key_list, prefix):
    prefixed = [prefix + k for k in key_list]
    there = remap.apply_remap(prefixed, [remap.Rule("strip_prefix", (prefix,))])
    back = remap.apply_remap(there.mapping.values(), [remap.Rule("add_prefix", (prefix,))])
    assert list(back.mapping.values()) == prefixed


@SETTINGS
@given(key_sets, prefixes)
def test_strip_prefix_without_a_collision_renames_every_key(key_list, prefix):
    rule = remap.Rule("strip_prefix", (prefix,))
    targets = [rule.apply(k) for k in key_list]
    assume(all(targets) and len(set(targets)) == len(targets))
    result = remap.apply_remap(key_list, [rule])
    assert list(result.mapping.values()) == targets


@SETTINGS
@given(key_sets, prefixes, st.data())
def test_strip_prefix_refuses_two_keys_that_meet(key_list, prefix, data):
    kept = data.draw(st.sampled_from(key_list))
    assume(not kept.startswith(prefix) and prefix + kept not in key_list)
    stripped = [k.removeprefix(prefix) for k in key_list]
    assume(len(set(stripped)) == len(stripped))  # the only collision is the one added below
    keys = [*key_list, prefix + kept]  # both become `kept`
    with pytest.raises(RemapError, match="both map to") as info:
        remap.apply_remap(keys, [remap.Rule("strip_prefix", (prefix,))])
    assert f"'{prefix + kept}'" in info.value.one_line()


@SETTINGS
@given(key_sets, st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=2))
def test_results_partition_the_input(key_list, globs):
    rules = [remap.Rule("drop", tuple(f"*{g}*" for g in globs))]
    result = remap.apply_remap(key_list, rules)
    assert set(result.mapping) | set(result.dropped) == set(key_list)
    assert not set(result.mapping) & set(result.dropped)


def _preset_names() -> list[str]:
    names = list(remap.available_remaps())
    try:
        from ckpt_tools.presets import available_presets

        names += [name for name, preset in available_presets().items() if preset.remap]
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("name", _preset_names())
def test_presets_are_idempotent(name):
    rules = remap.preset_rules(name)

    @SETTINGS
    @given(key_sets)
    def check(key_list):
        # ddp removes one leading wrapper by design; a doubly wrapped key is a different file
        assume(not any(k.startswith("module.module.") for k in key_list) or name != "ddp")
        try:
            once = remap.apply_remap(key_list, rules)
        except RemapError:  # two keys collided: not an input idempotence is about
            reject()  # hypothesis fails the test when it can find too few inputs that pass
        twice = remap.apply_remap(list(once.mapping.values()), rules)
        assert list(twice.mapping.values()) == list(once.mapping.values())

    check()


def test_every_preset_changes_a_typical_key_set_and_is_idempotent_on_it():
    keys = ["module.x.weight", "_orig_mod.enc.0.weight", "lang_encoder.embed_out.weight",
            "_fsdp_wrapped_module.dec.1.bias", "_checkpoint_wrapped_module.a.weight",
            "lang_encoder.gated_cross_attn_layers.0.attn_gate"]
    unchanged, not_idempotent = [], []
    for name in _preset_names():
        once = remap.apply_remap(keys, remap.preset_rules(name))
        if not once.renamed and not once.dropped:
            unchanged.append(name)
        twice = remap.apply_remap(list(once.mapping.values()), remap.preset_rules(name))
        if list(twice.mapping.values()) != list(once.mapping.values()):
            not_idempotent.append(name)
    assert unchanged == []
    assert not_idempotent == []


@SETTINGS
@given(st.lists(st.sampled_from([
    {"strip_prefix": "module."}, {"add_prefix": "model."}, {"rename": ["^enc\\.", "encoder."]},
    {"drop": "*.bias"}, {"keep": ["*.weight", "*.bias"]}, {"rename": ["(?<![^.])_orig_mod\\.", ""]},
]), min_size=1, max_size=5), key_sets)
def test_rules_survive_a_json_round_trip(rule_dicts, key_list):
    rules = remap.rules_from_dicts(rule_dicts)
    again = remap.rules_from_dicts(json.loads(remap.rules_to_json(rules)))
    assert [(r.kind, r.args) for r in again] == [(r.kind, r.args) for r in rules]
    # the same mapping, or the same refusal (a collision, an empty name)
    assert _outcome(key_list, again) == _outcome(key_list, rules)


def _outcome(key_list, rules) -> dict | str:
    try:
        mapping = remap.apply_remap(key_list, rules).mapping
    except RemapError as exc:
        event("refused")
        return exc.one_line()
    event("remapped")
    return mapping

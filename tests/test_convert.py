"""convert_to_safetensors and remap_checkpoint on tiny real files, checked with the safetensors library."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_tools.convert import convert_to_safetensors
from ckpt_tools.convert_plan import Planned, parse_size, plan_shards
from ckpt_tools.errors import (
    IntegrityError,
    InvalidCheckpointError,
    OutputExistsError,
    RemapError,
    UsageError,
)
from ckpt_tools.formats import open_checkpoint
from ckpt_tools.meta import TensorMeta
from ckpt_tools.remap import Rule, rules_from_cli, rules_from_dicts
from ckpt_tools.remap_file import remap_checkpoint


def sample_state() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
        "layer.bias": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "layer.norm": torch.tensor([0.5, -2.25, 3.0], dtype=torch.bfloat16),
        "counter": torch.tensor([7, 8, 9], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "gate": torch.tensor(0.125),
        "empty": torch.zeros(0, 3),
    }


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def read_output(result) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in result.files:
        if name.endswith(".safetensors"):
            tensors.update(read_safetensors(name)[0])
    return tensors


def assert_same(got: dict, want: dict) -> None:
    """Same names, dtypes, shapes and values; the order of the names is not compared (a
    safetensors file lists them sorted, whatever order they were written in)."""
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def write_format(fmt: str, state: dict, folder) -> str:
    """Save ``state`` in one of the formats the reader opens; return the SOURCE to pass."""
    folder.mkdir(exist_ok=True)
    if fmt == "safetensors":
        save_file(state, folder / "m.safetensors")
        return str(folder / "m.safetensors")
    if fmt == "zip-pt":
        torch.save(state, folder / "m.pt")
        return str(folder / "m.pt")
    if fmt == "legacy-pt":
        torch.save(state, folder / "m.pt", _use_new_zipfile_serialization=False)
        return str(folder / "m.pt")
    names = list(state)
    halves = {"a": names[: len(names) // 2], "b": names[len(names) // 2:]}
    if fmt == "sharded-safetensors":
        shard = "model-0000{}-of-00002.safetensors"
        files = {k: shard.format(i + 1) for i, keys in enumerate(halves.values()) for k in keys}
        for i, keys in enumerate(halves.values()):
            save_file({k: state[k] for k in keys}, folder / shard.format(i + 1))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
        return str(folder / "model.safetensors.index.json")
    if fmt == "sharded-bin":
        files = {}
        for i, keys in enumerate(halves.values()):
            name = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({k: state[k] for k in keys}, folder / name)
            files.update({k: name for k in keys})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": files}))
        return str(folder / "pytorch_model.bin.index.json")
    if fmt == "folder":
        save_file(state, folder / "model.safetensors")
        return str(folder)
    raise AssertionError(fmt)


ALL_FORMATS = ["safetensors", "zip-pt", "legacy-pt", "sharded-safetensors", "sharded-bin", "folder"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    state = sample_state()
    src = write_format(fmt, state, tmp_path / "src")
    result = convert_to_safetensors(src, tmp_path / "out.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "out.safetensors")
    assert_same(tensors, state)
    assert metadata["format"] == "pt"
    assert result.verified is True and result.verified_tensors == len(state)
    assert result.tensors == len(state)
    assert result.files == [str(tmp_path / "out.safetensors")]
    assert result.bytes_written == os.path.getsize(tmp_path / "out.safetensors")


def test_provenance_metadata(tmp_path):
    src = write_format("zip-pt", sample_state(), tmp_path)
    rules = rules_from_cli(add_prefix=("model.",))
    convert_to_safetensors(src, tmp_path / "o.safetensors", rules=rules)
    _, metadata = read_safetensors(tmp_path / "o.safetensors")
    assert metadata["ckpt_tools.source"] == "m.pt"
    assert metadata["ckpt_tools.source_size"] == str(os.path.getsize(src))
    assert json.loads(metadata["ckpt_tools.remap"]) == [{"add_prefix": "model."}]
    assert metadata["ckpt_tools.version"]


def test_safetensors_source_metadata_is_kept(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors", metadata={"author": "me", "format": "pt"})
    convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "o.safetensors")
    assert read_safetensors(tmp_path / "o.safetensors")[1]["author"] == "me"


def test_tied_weights_stored_once_and_recorded(tmp_path):
    shared = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    torch.save({"wte.weight": shared, "lm_head.weight": shared, "b": torch.ones(1)}, tmp_path / "t.pt")
    result = convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(tensors) == ["b", "wte.weight"]
    assert result.aliases_removed == {"lm_head.weight": "wte.weight"}
    assert json.loads(metadata["ckpt_tools.aliases"]) == {"lm_head.weight": "wte.weight"}
    assert result.tensors == 2


def test_restore_aliases_from_metadata(tmp_path):
    from safetensors.torch import load_file

    from ckpt_tools.convert import restore_aliases

    shared = torch.arange(4.0)
    torch.save({"wte.weight": shared, "lm_head.weight": shared}, tmp_path / "t.pt")
    convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors")
    state = load_file(tmp_path / "t.safetensors")
    restore_aliases(state, read_safetensors(tmp_path / "t.safetensors")[1])
    assert sorted(state) == ["lm_head.weight", "wte.weight"]
    assert state["lm_head.weight"] is state["wte.weight"]


def _tied(tmp_path):
    shared = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    torch.save({"wte.weight": shared, "lm_head.weight": shared, "b": torch.ones(1)}, tmp_path / "t.pt")
    return shared


def test_a_name_stored_once_is_read_back_as_an_alias_of_the_one_kept(tmp_path):
    shared = _tied(tmp_path)
    convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors")
    with open_checkpoint(tmp_path / "t.safetensors") as ckpt:
        assert (sorted(ckpt.keys()), ckpt.aliases) == (["b", "lm_head.weight", "wte.weight"],
                                                      [["wte.weight", "lm_head.weight"]])
        assert torch.equal(ckpt.tensor("lm_head.weight"), shared)


def test_a_converted_tied_checkpoint_loads_into_a_model_that_unties_the_names(tmp_path):
    from ckpt_tools import load_checkpoint

    shared = _tied(tmp_path)
    convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors")
    model = torch.nn.Module()
    for name in ("wte", "lm_head"):
        setattr(model, name, torch.nn.Linear(4, 2, bias=False))
    model.b = torch.nn.Parameter(torch.zeros(1))
    report = load_checkpoint(tmp_path / "t.safetensors", model)
    assert (report.verdict, report.load["verified"]) == ("ok", True)
    assert torch.equal(model.lm_head.weight.detach(), shared)


def test_a_sharded_conversion_read_back_and_converted_again_keeps_the_record(tmp_path):
    _tied(tmp_path)
    convert_to_safetensors(tmp_path / "t.pt", tmp_path / "sharded", max_shard_size=40)
    convert_to_safetensors(tmp_path / "sharded", tmp_path / "back.safetensors")
    assert json.loads(read_safetensors(tmp_path / "back.safetensors")[1]["ckpt_tools.aliases"]) == {
        "lm_head.weight": "wte.weight"}


def test_alias_kept_is_the_one_a_rename_points_to(tmp_path):
    shared = torch.ones(3)
    torch.save({"wte.weight": shared, "lm_head.weight": shared}, tmp_path / "t.pt")
    rules = [Rule("rename", ("^lm_head", "output"))]
    result = convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors", rules=rules)
    assert result.aliases_removed == {"wte.weight": "output.weight"}
    assert list(read_output(result)) == ["output.weight"]


def openflamingo_v1_state() -> dict[str, torch.Tensor]:
    """v1 files hold each cross-attention tensor twice: under the decoder layer and under
    ``gated_cross_attn_layers``, sharing one storage."""
    state = {"lang_encoder.model.embed_tokens.weight": torch.arange(12.0).reshape(4, 3)}
    for layer in (0, 1):
        for leaf in ("attn_gate", "ff_gate", "attn.to_q.weight"):
            tensor = torch.full((2, 2) if "weight" in leaf else (1,), float(layer + 1) + len(leaf) / 100)
            state[f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer.{leaf}"] = tensor
            state[f"lang_encoder.gated_cross_attn_layers.{layer}.{leaf}"] = tensor
    return state


def test_openflamingo_v1_duplicates_resolved_to_first_name(tmp_path):
    state = openflamingo_v1_state()
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "v1.pt")
    result = convert_to_safetensors(tmp_path / "v1.pt", tmp_path / "v1.safetensors", rules=rules_from_cli(presets=("ddp",)))
    tensors = read_output(result)
    assert sorted(tensors) == sorted(k for k in state if not k.startswith("lang_encoder.gated_cross_attn_layers."))
    assert len(result.aliases_removed) == 6
    assert result.aliases_removed["lang_encoder.gated_cross_attn_layers.1.ff_gate"] == \
        "lang_encoder.model.layers.1.gated_cross_attn_layer.ff_gate"
    for removed, kept in result.aliases_removed.items():
        assert torch.equal(tensors[kept], state[removed])


def test_openflamingo_v1_duplicates_dropped_by_a_preset_are_recorded_as_aliases(tmp_path):
    """The 9B-deprecated model preset drops the ``gated_cross_attn_layers`` copies: it points to
    the decoder-layer names, and the dropped names stay restorable from the metadata."""
    state = openflamingo_v1_state()
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "v1.pt")
    rules = rules_from_cli(presets=("ddp",), rules_file=None) + rules_from_dicts(
        [{"drop": "lang_encoder.gated_cross_attn_layers.*"}])
    result = convert_to_safetensors(tmp_path / "v1.pt", tmp_path / "v1.safetensors", rules=rules)
    assert result.dropped == [] and result.tensors == 7
    assert result.aliases_removed["lang_encoder.gated_cross_attn_layers.0.attn.to_q.weight"] == \
        "lang_encoder.model.layers.0.gated_cross_attn_layer.attn.to_q.weight"
    _, metadata = read_safetensors(tmp_path / "v1.safetensors")
    assert json.loads(metadata["ckpt_tools.aliases"]) == result.aliases_removed
    assert len(result.aliases_removed) == 6


def test_dropping_every_name_of_an_alias_group_drops_it(tmp_path):
    shared = torch.ones(3)
    torch.save({"a": shared, "b": shared, "c": torch.zeros(1)}, tmp_path / "t.pt")
    result = convert_to_safetensors(tmp_path / "t.pt", tmp_path / "t.safetensors", rules=rules_from_cli(drop=("a", "b")))
    assert result.dropped == ["a", "b"] and result.aliases_removed == {}


def test_slices_and_strided_views_are_stored_as_their_own_data(tmp_path):
    base = torch.arange(1000, dtype=torch.float32)
    matrix = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"slice": base[100:110], "transposed": matrix.t(), "column": matrix[:, 1]}
    torch.save(state, tmp_path / "v.pt")
    convert_to_safetensors(tmp_path / "v.pt", tmp_path / "v.safetensors")
    tensors, _ = read_safetensors(tmp_path / "v.safetensors")
    assert_same(tensors, {k: v.contiguous() for k, v in state.items()})
    header_len = int.from_bytes((tmp_path / "v.safetensors").read_bytes()[:8], "little")
    assert os.path.getsize(tmp_path / "v.safetensors") == 8 + header_len + (10 + 12 + 3) * 4


def test_training_wrapper_extras_reported_and_written(tmp_path):
    state = {"module.x": torch.ones(2), "module.y": torch.zeros(3)}
    wrapper = {"model_state_dict": state, "optimizer_state_dict": {"state": {0: {"m": torch.ones(2)}}},
               "epoch": 3, "config": {"lr": 0.5, "name": "run"}}
    torch.save(wrapper, tmp_path / "train.pt")
    result = convert_to_safetensors(tmp_path / "train.pt", tmp_path / "w.safetensors",
                                    rules=rules_from_cli(presets=("ddp",)), extras_path=tmp_path / "extras.json")
    assert result.extras == {"optimizer_state_dict": "dict", "epoch": "int", "config": "dict"}
    assert sorted(result.extras_written) == ["config", "epoch"]
    assert json.loads((tmp_path / "extras.json").read_text()) == {"config": {"lr": 0.5, "name": "run"}, "epoch": 3}
    assert sorted(read_output(result)) == ["x", "y"]


def test_extras_listed_when_no_file_given(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(1)}, "epoch": 1}, tmp_path / "w.pt")
    result = convert_to_safetensors(tmp_path / "w.pt", tmp_path / "w.safetensors")
    assert result.extras == {"epoch": "int"} and result.extras_path is None
    assert sorted(os.listdir(tmp_path)) == ["w.pt", "w.safetensors"]


def test_sharding_writes_transformers_layout(tmp_path):
    state = {f"layer.{i}.weight": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    save_file(state, tmp_path / "s.safetensors")
    result = convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "out", max_shard_size="100B")
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"] == {"layer.0.weight": "model-00001-of-00003.safetensors",
                                   "layer.1.weight": "model-00001-of-00003.safetensors",
                                   "layer.2.weight": "model-00002-of-00003.safetensors",
                                   "layer.3.weight": "model-00002-of-00003.safetensors",
                                   "layer.4.weight": "model-00003-of-00003.safetensors"}
    assert_same(read_output(result), state)
    with open_checkpoint(tmp_path / "out") as again:
        assert again.keys() == list(state)


def test_folder_destination_without_size_gets_one_shard_and_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    (tmp_path / "out").mkdir()
    convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_max_shard_size_with_a_file_destination_is_a_usage_error(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    with pytest.raises(UsageError, match="folder"):
        convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "o.safetensors", max_shard_size="1GB")


@pytest.mark.parametrize(("dtype", "float_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                    ("fp32", torch.float32)])
def test_dtype_casts_floating_tensors_only(tmp_path, dtype, float_dtype):
    state = sample_state()
    torch.save(state, tmp_path / "m.pt")
    result = convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype=dtype)
    want = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in state.items()}
    assert_same(read_output(result), want)
    assert result.verified_tensors == len(state)


def test_cast_of_contiguous_and_strided_tensors(tmp_path):
    state = {"w": torch.randn(33, 7), "t": torch.randn(9, 5).t()}
    torch.save(state, tmp_path / "m.pt")
    result = convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype="bf16")
    assert_same(read_output(result), {k: v.to(torch.bfloat16) for k, v in state.items()})


def _flip_a_storage_byte(path) -> None:
    """Damage a torch file's first storage after torch.save wrote it (its CRC no longer holds)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", handle.read(4))
        at = info.header_offset + 30 + name_len + extra_len
        handle.seek(at)
        byte = handle.read(1)[0]
        handle.seek(at)
        handle.write(bytes([byte ^ 1]))


def test_a_damaged_storage_is_refused_by_its_crc(tmp_path):
    torch.save({"w": torch.arange(8.0)}, tmp_path / "m.pt")
    _flip_a_storage_byte(tmp_path / "m.pt")
    with pytest.raises(InvalidCheckpointError, match="data/0 fails its CRC-32 check"):
        convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors")


def test_a_damaged_storage_leaves_no_output(tmp_path):
    torch.save({"w": torch.arange(8.0)}, tmp_path / "m.pt")
    _flip_a_storage_byte(tmp_path / "m.pt")
    with pytest.raises(InvalidCheckpointError):
        convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_damaged_storage_is_refused_by_remap(tmp_path):
    torch.save({"w": torch.arange(8.0)}, tmp_path / "m.pt")
    _flip_a_storage_byte(tmp_path / "m.pt")
    with pytest.raises(InvalidCheckpointError, match="CRC-32"):
        remap_checkpoint(tmp_path / "m.pt", tmp_path / "r.pt", rules=None)


def test_a_file_saved_without_crcs_converts(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(8.0)}, tmp_path / "m.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    result = convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors")
    assert read_output(result)["w"].tolist() == list(range(8))


def test_a_cast_that_overflows_is_refused(tmp_path):
    torch.save({"w": torch.tensor([1.0, 1e5, 2.0])}, tmp_path / "m.pt")
    with pytest.raises(UsageError, match="turns 1 finite value into Inf"):
        convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype="fp16")


def test_a_cast_that_overflows_leaves_no_output(tmp_path):
    torch.save({"w": torch.tensor([1.0, 1e5, 2.0])}, tmp_path / "m.pt")
    with pytest.raises(UsageError):
        convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_cast_to_dcp_that_overflows_is_refused(tmp_path):
    from ckpt_tools.convert import convert_to_dcp

    torch.save({"w": torch.tensor([1.0, 1e5, 2.0])}, tmp_path / "m.pt")
    with pytest.raises(UsageError, match="turns 1 finite value into Inf"):
        convert_to_dcp(tmp_path / "m.pt", tmp_path / "out", dtype="fp16")


def test_an_inf_already_in_the_source_casts_without_complaint(tmp_path):
    torch.save({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "m.pt")
    result = convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype="fp16")
    assert read_output(result)["w"].isinf().tolist() == [False, True]


def test_a_cast_is_recorded_in_the_metadata(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    convert_to_safetensors(tmp_path / "m.pt", tmp_path / "c.safetensors", dtype="bf16")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.metadata()["ckpt_tools.dtype"] == "BF16"


@pytest.mark.parametrize(("tensor", "chunks"), [
    (torch.randn(33, 7), 15),  # contiguous: 231 float32 values, 16 (64 bytes) per chunk
    (torch.randn(9, 33).t(), 33),  # strided: whole rows of 9 values (36 bytes), one per chunk
], ids=["contiguous", "strided"])
def test_cast_is_written_in_bounded_chunks(tensor, chunks):
    from ckpt_tools.safetensors_writer import tensor_chunks

    pieces = list(tensor_chunks(tensor, "BF16", chunk_bytes=64))
    assert len(pieces) == chunks
    assert max(p.numel() for p in pieces) * tensor.element_size() <= 64
    assert torch.equal(torch.cat(pieces), tensor.to(torch.bfloat16).reshape(-1))


def test_prefix_collision_names_both_and_writes_nothing(tmp_path):
    torch.save({"module.x": torch.ones(1), "x": torch.zeros(1)}, tmp_path / "c.pt")
    with pytest.raises(RemapError, match="'module.x' and 'x'|'x' and 'module.x'"):
        convert_to_safetensors(tmp_path / "c.pt", tmp_path / "c.safetensors", rules=rules_from_cli(presets=("ddp",)))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_refuses_to_overwrite_without_force(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    (tmp_path / "o.safetensors").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "o.safetensors")
    assert (tmp_path / "o.safetensors").read_text() == "keep me"
    convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "o.safetensors", force=True)
    assert torch.equal(read_safetensors(tmp_path / "o.safetensors")[0]["a"], torch.ones(2))


def test_never_writes_over_its_own_source_even_with_force(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    before = (tmp_path / "s.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="own source"):
        convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "s.safetensors", force=True)
    src = write_format("sharded-safetensors", sample_state(), tmp_path / "sharded")
    with pytest.raises(OutputExistsError, match="own source"):
        convert_to_safetensors(src, tmp_path / "sharded", force=True, max_shard_size="1GB")
    assert (tmp_path / "s.safetensors").read_bytes() == before


def test_force_replaces_stale_shards(tmp_path):
    state = {f"w{i}": torch.full((10,), float(i)) for i in range(4)}
    save_file(state, tmp_path / "s.safetensors")
    convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "out", max_shard_size="40B")
    with pytest.raises(OutputExistsError):
        convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "out", max_shard_size="80B")
    convert_to_safetensors(tmp_path / "s.safetensors", tmp_path / "out", max_shard_size="80B", force=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                                    "model.safetensors.index.json"]


def _fail_after(monkeypatch, calls: int, exc: BaseException) -> None:
    import ckpt_tools.safetensors_writer as writer

    real = writer._write_tensor
    count = {"n": 0}

    def flaky(*args):
        count["n"] += 1
        if count["n"] > calls:
            raise exc
        return real(*args)

    monkeypatch.setattr(writer, "_write_tensor", flaky)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, exc):
    state = {f"w{i}": torch.full((10,), float(i)) for i in range(4)}
    torch.save(state, tmp_path / "s.pt")
    _fail_after(monkeypatch, 2, exc)
    with pytest.raises(type(exc)):
        convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors")
    with pytest.raises(type(exc)):
        convert_to_safetensors(tmp_path / "s.pt", tmp_path / "out", max_shard_size="40B")
    assert os.listdir(tmp_path) == ["s.pt"]


def test_killed_conversion_leaves_nothing(tmp_path):
    torch.save({f"w{i}": torch.full((1000,), float(i)) for i in range(4)}, tmp_path / "s.pt")
    code = f"""
import os, signal
import ckpt_tools.safetensors_writer as w
from ckpt_tools.convert import convert_to_safetensors
real, n = w._write_tensor, [0]
def kill_midway(*args):
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args)
w._write_tensor = kill_midway
convert_to_safetensors({str(tmp_path / 's.pt')!r}, {str(tmp_path / 'o.safetensors')!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) == ["s.pt"]


def test_verification_failure_is_an_integrity_error_and_keeps_nothing(tmp_path, monkeypatch):
    import ckpt_tools.safetensors_writer as writer

    torch.save({"a": torch.ones(4), "b": torch.zeros(4)}, tmp_path / "s.pt")
    real = writer._write_tensor

    def corrupt_first_tensor(out, meta, tensor, spans):
        written = real(out, meta, tensor, spans)
        if meta.name == "a":
            os.pwrite(out.fd, b"\xff", os.lseek(out.fd, 0, os.SEEK_CUR) - 1)
        return written

    monkeypatch.setattr(writer, "_write_tensor", corrupt_first_tensor)
    with pytest.raises(IntegrityError, match="differ") as info:
        convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors")
    assert info.value.key == "a" and info.value.exit_code == 1
    assert os.listdir(tmp_path) == ["s.pt"]


def test_verification_of_a_cast_tensor_catches_a_flipped_byte(tmp_path, monkeypatch):
    # a cast tensor is written from memory, so it is compared with its cast source, not copied ranges
    import ckpt_tools.safetensors_writer as writer

    torch.save({"a": torch.ones(4), "b": torch.zeros(4)}, tmp_path / "s.pt")
    real = writer._write_tensor

    def corrupt_b(out, meta, tensor, spans):
        written = real(out, meta, tensor, spans)
        if meta.name == "b":
            os.pwrite(out.fd, b"\xff", os.lseek(out.fd, 0, os.SEEK_CUR) - 1)
        return written

    monkeypatch.setattr(writer, "_write_tensor", corrupt_b)
    with pytest.raises(IntegrityError, match="differ") as info:
        convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors", dtype="F16")
    assert info.value.key == "b"
    assert os.listdir(tmp_path) == ["s.pt"]


def test_a_written_header_that_lists_other_tensors_is_an_integrity_error(tmp_path, monkeypatch):
    import ckpt_tools.safetensors_writer as writer

    torch.save({"a": torch.ones(4), "b": torch.zeros(4)}, tmp_path / "s.pt")
    real = writer.build_header

    def misnamed(metas, metadata=None):  # a valid header, under another name
        return real([m.renamed("z") if m.name == "a" else m for m in metas], metadata)

    monkeypatch.setattr(writer, "build_header", misnamed)
    with pytest.raises(IntegrityError, match="does not list the planned tensors"):
        convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors")
    assert os.listdir(tmp_path) == ["s.pt"]


def test_mmapped_tensors_are_copied_file_to_file(tmp_path, monkeypatch):
    import ckpt_tools.safetensors_writer as writer

    copies = []
    real = writer.copy_span
    monkeypatch.setattr(writer, "copy_span", lambda *a: copies.append(a[3]) or real(*a))
    state = {"a": torch.arange(10.0), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3), "t": torch.ones(2, 3).t()}
    torch.save(state, tmp_path / "s.pt")
    result = convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors")
    assert_same(read_output(result), {k: v.contiguous() for k, v in state.items()})
    assert copies == [40, 24]  # the transposed view is not contiguous: written from memory


def test_file_spans_locate_mapped_bytes(tmp_path):
    from ckpt_tools.safetensors_writer import FileSpans

    torch.save({"a": torch.arange(5, dtype=torch.int64)}, tmp_path / "s.pt")
    mapped = torch.load(tmp_path / "s.pt", mmap=True, weights_only=True)["a"]
    spans = FileSpans()
    try:
        fd, offset = spans.locate(mapped[1:])
        assert os.pread(fd, 32, offset) == mapped[1:].numpy().tobytes()
        assert spans.locate(torch.arange(5)) is None
    finally:
        spans.close()


def test_no_verify_reports_it(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "s.pt")
    result = convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors", verify=False)
    assert result.verified is False and result.verified_tensors == 0


def test_result_json_fields(tmp_path):
    torch.save({"module.a": torch.ones(4)}, tmp_path / "s.pt")
    result = convert_to_safetensors(tmp_path / "s.pt", tmp_path / "o.safetensors", rules=rules_from_cli(presets=("ddp",)))
    data = result.to_dict()
    assert {"source", "destination", "files", "tensors", "aliases_removed", "renamed", "dropped",
            "bytes_written", "verified"} <= set(data)
    assert data["renamed"] == {"module.a": "a"} and data["tensors"] == 1 and data["verified"] is True


# -- planning --

def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5KB") == 1500
    assert parse_size("123") == 123
    for bad in ("", "GB", "-1GB", "2 parsecs", "0"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_plan_shards_greedy_and_oversized_tensor_alone():
    plan = [Planned(n, TensorMeta.of(n, (s,), "U8")) for n, s in [("a", 40), ("b", 50), ("c", 300), ("d", 10)]]
    shards = plan_shards(plan, 100)
    assert [[p.source_key for p in shard] for shard in shards] == [["a", "b"], ["c"], ["d"]]
    assert [[p.source_key for p in s] for s in plan_shards(plan, None)] == [["a", "b", "c", "d"]]


def test_openflamingo_3b_layout_plans_on_meta(tmp_path):
    """The real 3B key layout plans in milliseconds without any tensor bytes."""
    from pathlib import Path

    from ckpt_tools.convert_plan import plan_tensors, resolve_aliases
    from ckpt_tools.remap import apply_remap

    keys_file = Path(__file__).parents[1] / "scripts" / "bench" / "data" / "openflamingo-released-keys.json"
    if not keys_file.exists():
        pytest.skip("reference key file not present")
    reference = json.loads(keys_file.read_text())
    tensors = reference["openflamingo/OpenFlamingo-3B-vitl-mpt1b"]["tensors"]
    metas = {"module." + k: TensorMeta.of("module." + k, v["shape"], v["dtype"]) for k, v in tensors.items()}
    remap = apply_remap(metas, rules_from_cli(presets=("ddp",)))
    plan = plan_tensors(metas, remap, resolve_aliases([], remap), "BF16")
    shards = plan_shards(plan, parse_size("1GB"))
    assert sum(p.meta.nbytes for p in plan) * 2 == sum(m.nbytes for m in metas.values())
    assert len(shards) == 3


# -- remap_checkpoint --

def test_remap_safetensors_stays_safetensors(tmp_path):
    save_file({"module.a": torch.ones(2), "module.b": torch.zeros(1)}, tmp_path / "s.safetensors",
              metadata={"format": "pt", "note": "x"})
    result = remap_checkpoint(tmp_path / "s.safetensors", tmp_path / "o.safetensors",
                              rules=rules_from_cli(presets=("ddp",), drop=("b",)))
    tensors, metadata = read_safetensors(tmp_path / "o.safetensors")
    assert list(tensors) == ["a"] and metadata["note"] == "x"
    assert result.format == "safetensors" and result.renamed == {"module.a": "a"} and result.dropped == ["module.b"]


def test_remap_sharded_safetensors_stays_sharded(tmp_path):
    src = write_format("sharded-safetensors", sample_state(), tmp_path / "src")
    result = remap_checkpoint(src, tmp_path / "out", rules=rules_from_cli(add_prefix=("m.",)))
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert_same(read_output(result), {"m." + k: v for k, v in sample_state().items()})


@pytest.mark.parametrize("legacy", [False, True])
def test_remap_pickle_keeps_wrapper_extras_and_sharing(tmp_path, legacy):
    shared = torch.arange(4.0)
    wrapper = {"model_state_dict": {"module.a": shared, "module.tied": shared, "module.n": torch.tensor(3)},
               "epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    torch.save(wrapper, tmp_path / "w.pt", _use_new_zipfile_serialization=not legacy)
    result = remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=rules_from_cli(presets=("ddp",)))
    assert result.format == ("torch-legacy" if legacy else "torch-zip")
    assert zipfile.is_zipfile(tmp_path / "o.pt") is (not legacy)
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    assert loaded["epoch"] == 3 and loaded["optimizer_state_dict"]["param_groups"] == [{"lr": 0.1}]
    state = loaded["model_state_dict"]
    assert list(state) == ["a", "tied", "n"]
    assert torch.equal(state["a"], shared) and state["a"].data_ptr() == state["tied"].data_ptr()


def _save_altered(monkeypatch, alter):
    """Make remap's torch.save write ``alter(state)`` instead of the state it was given."""
    real = torch.save

    def save(obj, f, **kwargs):
        real(alter(dict(obj)), f, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _flip_first_byte(tensor: torch.Tensor) -> torch.Tensor:
    flipped = tensor.clone()
    raw = flipped.reshape(-1).view(torch.uint8)
    raw[0] = raw[0] ^ 1
    return flipped


def test_remap_pickle_verification_catches_a_flipped_byte(tmp_path, monkeypatch):
    # a legacy file is written back by torch.save (a zip is rewritten without torch: test_torch_free.py)
    torch.save({"module.a": torch.arange(4.0), "module.b": torch.ones(3)}, tmp_path / "w.pt",
               _use_new_zipfile_serialization=False)
    _save_altered(monkeypatch, lambda state: {**state, "b": _flip_first_byte(state["b"])})
    with pytest.raises(IntegrityError, match="written bytes differ from the source") as info:
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=rules_from_cli(presets=("ddp",)))
    assert info.value.key == "b"
    assert os.listdir(tmp_path) == ["w.pt"]  # the output was removed, no temporary left


def test_remap_pickle_verification_catches_a_changed_dtype(tmp_path, monkeypatch):
    torch.save({"module.a": torch.arange(4.0)}, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    _save_altered(monkeypatch, lambda state: {"a": state["a"].double()})
    with pytest.raises(IntegrityError, match="does not list the remapped tensors"):
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=rules_from_cli(presets=("ddp",)))
    assert os.listdir(tmp_path) == ["w.pt"]


def test_remap_without_torch_verification_catches_a_wrong_listing(tmp_path, monkeypatch):
    # a torch zip is rewritten without torch: a pickle naming another tensor than planned is refused
    import ckpt_tools.remap_file as remap_file

    torch.save({"module.a": torch.arange(4.0), "module.b": torch.ones(3)}, tmp_path / "w.pt")
    real = remap_file.plan_torch_zip

    def plan(root, *args, **kwargs):
        return real({("z" if name == "a" else name): ref for name, ref in root.items()}, *args, **kwargs)

    monkeypatch.setattr(remap_file, "plan_torch_zip", plan)
    with pytest.raises(IntegrityError, match="does not list the remapped tensors"):
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=rules_from_cli(presets=("ddp",)))
    assert os.listdir(tmp_path) == ["w.pt"]


@pytest.mark.parametrize("zip_format", [True, False])
def test_remap_of_a_pickle_that_drops_every_tensor_says_so(tmp_path, zip_format):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(RemapError, match="the rules drop every tensor"):
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=[{"drop": "*"}])
    assert os.listdir(tmp_path) == ["w.pt"]


def test_convert_refuses_to_take_one_part_of_a_model_split_side_by_side(tmp_path):
    torch.save({"model": {"enc": {"w": torch.ones(4)}, "dec": {"w": torch.ones(2), "b": torch.ones(2)}}},
               tmp_path / "n.pt")
    with pytest.raises(InvalidCheckpointError, match="one of several side by side under model") as info:
        convert_to_safetensors(tmp_path / "n.pt", tmp_path / "n.safetensors")
    assert info.value.fix == "--select model to convert them together, or --select model.enc for this one"


def test_nested_state_dicts_convert_together_and_remap_refuses_to_take_them_apart(tmp_path):
    state = {"encoder": {"w": torch.ones(2)}, "decoder": {"w": torch.zeros(3)}}
    torch.save({"model": state, "epoch": 3}, tmp_path / "n.pt")
    convert_to_safetensors(tmp_path / "n.pt", tmp_path / "n.safetensors", select="model")
    assert_same(load_file(tmp_path / "n.safetensors"), {"encoder.w": torch.ones(2), "decoder.w": torch.zeros(3)})
    with pytest.raises(UsageError, match="remap cannot write back"):
        remap_checkpoint(tmp_path / "n.pt", tmp_path / "o.pt", rules=None, select="model")


def test_remap_of_a_sharded_bin_points_to_convert(tmp_path):
    src = write_format("sharded-bin", sample_state(), tmp_path / "src")
    with pytest.raises(UsageError, match="ckpt convert"):
        remap_checkpoint(src, tmp_path / "out", rules=None)


def test_remap_refuses_existing_output(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "w.pt")
    (tmp_path / "o.pt").write_text("x")
    with pytest.raises(OutputExistsError):
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "o.pt", rules=None)
    with pytest.raises(OutputExistsError, match="own source"):
        remap_checkpoint(tmp_path / "w.pt", tmp_path / "w.pt", rules=None, force=True)


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_run(tmp_path):
    import fcntl

    from ckpt_tools.convert import convert_to_safetensors

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.arange(4.0)}, str(src))
    stale = tmp_path / ".out.safetensors.dead0000.tmp"
    stale.write_bytes(b"complete but never renamed")
    live = tmp_path / ".out.safetensors.live0000.tmp"
    live.write_bytes(b"being written")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        convert_to_safetensors(src, tmp_path / "out.safetensors")
        assert not stale.exists()
        assert live.exists()
    finally:
        os.close(holder)

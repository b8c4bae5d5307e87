"""The lazy reader: every format, wrappers, aliases, extras, and one test per error message."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ckpt_tools import open_checkpoint
from ckpt_tools.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from ckpt_tools.meta import TensorMeta


def small_state() -> dict[str, torch.Tensor]:
    return {
        "encoder.layers.0.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "encoder.layers.1.weight": torch.arange(12, 24, dtype=torch.float32).reshape(3, 4),
        "head.bias": torch.ones(5, dtype=torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def write_safetensors_raw(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


# -- formats ---------------------------------------------------------------------------------------

def test_safetensors_lists_header_and_reads_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(small_state(), str(path), metadata={"format": "pt"})
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors"
        assert sorted(ckpt.keys()) == sorted(small_state())
        assert ckpt.meta("head.bias") == TensorMeta("head.bias", (5,), "BF16", 10)
        assert ckpt.meta("step") == TensorMeta("step", (), "I64", 8)
        assert ckpt.metadata == {"format": "pt"}
        assert torch.equal(ckpt.tensor("encoder.layers.1.weight"), small_state()["encoder.layers.1.weight"])


def test_safetensors_listing_reads_only_the_header(tmp_path):
    from ckpt_tools.formats.safetensors import SafetensorsCheckpoint

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1000, 1000)}, str(path))
    reads: list[int] = []

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            data = self.handle.read(n)
            reads.append(len(data))
            return data

        def seek(self, *a):
            return self.handle.seek(*a)

        def close(self):
            self.handle.close()

    ckpt = SafetensorsCheckpoint(str(path), Counting(path.open("rb")), path.stat().st_size)
    assert ckpt.meta("w").nbytes == 4_000_000
    assert sum(reads) == ckpt.header_bytes < 200
    ckpt.close()


def test_safetensors_inspect_does_not_import_torch(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(small_state(), str(path))
    code = ("import sys; from ckpt_tools.inspect import inspect_checkpoint; "
            f"r = inspect_checkpoint({str(path)!r}); r.to_dict(); "
            "print(len(r.tensors), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "False"]


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_pickles_zip_and_legacy(tmp_path, legacy):
    path = tmp_path / "m.pt"
    torch.save(small_state(), path, _use_new_zipfile_serialization=not legacy)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == ("torch-legacy" if legacy else "torch-zip")
        assert ckpt.meta("encoder.layers.0.weight") == TensorMeta("encoder.layers.0.weight", (3, 4), "F32", 48)
        assert torch.equal(ckpt.tensor("head.bias"), torch.ones(5, dtype=torch.bfloat16))
        assert any("storages that sit unaligned" in n for n in ckpt.notes) == legacy


def test_zip_pickle_is_memory_mapped(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small_state(), path)
    with open_checkpoint(path) as ckpt:
        address = ckpt.tensor("encoder.layers.0.weight").data_ptr()
        mapped = []
        for line in open("/proc/self/maps"):
            span, *rest = line.split()
            if rest and rest[-1] == str(path):
                lo, hi = (int(x, 16) for x in span.split("-"))
                mapped.append(lo <= address < hi)
        assert any(mapped)


def test_wrapper_priority_extras_and_aliases(tmp_path):
    state = small_state()
    state["head.tied"] = state["encoder.layers.0.weight"]
    path = tmp_path / "train.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer_state_dict": {"state": {}}, "epoch": 3,
                "state_dict_ema": {"x": torch.zeros(1)}}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.wrapper == "model_state_dict"
        assert ckpt.extras == {"optimizer_state_dict": "dict", "epoch": "int", "state_dict_ema": "dict"}
        assert ckpt.aliases == [["module.encoder.layers.0.weight", "module.head.tied"]]
        assert len(ckpt) == 5


def test_nested_wrappers_report_the_path(tmp_path):
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"module": {"w": torch.zeros(2)}, "note": "hi"}, "global_step": 10}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.wrapper == "state_dict.module"
        assert ckpt.extras == {"global_step": "int", "state_dict.note": "str"}
        assert ckpt.keys() == ["w"]


def test_non_tensor_entries_of_a_state_dict_become_extras(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.zeros(2), "version": 2}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == ["w"]
        assert ckpt.extras == {"version": "int"}


def _write_sharded(folder, kind: str) -> None:
    state = small_state()
    parts = [dict(list(state.items())[:2]), dict(list(state.items())[2:])]
    suffix = "safetensors" if kind == "safetensors" else "bin"
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"model-0000{i}-of-00002.{suffix}"
        if kind == "safetensors":
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 126}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_index_and_folder(tmp_path, kind):
    _write_sharded(tmp_path, kind)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == ("sharded-safetensors" if kind == "safetensors" else "sharded-torch-zip")
        assert sorted(ckpt.keys()) == sorted(small_state())
        assert ckpt.metadata == {"total_size": "126"}
        assert torch.equal(ckpt.tensor("step"), torch.tensor(7))


def test_folder_with_single_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.keys() == ["w"]


def test_format_is_sniffed_from_content_not_name(tmp_path):
    path = tmp_path / "weights.bin"
    save_file({"w": torch.zeros(2)}, str(path))
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "safetensors"


# -- errors: one test per message ------------------------------------------------------------------

def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(tmp_path / "nope.pt")
    assert message(e) == f"{tmp_path / 'nope.pt'}: no such file or folder; fix: check the path, or use hf://ORG/NAME[@REVISION]/PATH for the hub"


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(tmp_path / "e.pt")
    assert message(e).endswith("e.pt: the file is empty; fix: the download or save was interrupted: fetch or save it again")


def test_truncated_zip(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(small_state(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "truncated or corrupt torch checkpoint" in message(e)
    assert message(e).endswith("fix: the file is damaged: download or save it again")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(small_state(), str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "tensor data runs past the end of the file" in message(e)
    assert "fix: the file is damaged or not safetensors" in message(e)


def test_safetensors_shorter_than_its_length_prefix(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "truncated: 3 bytes is too short for a safetensors header" in message(e)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "h.safetensors"
    write_safetensors_raw(path, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, length=5000)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "header length 5000 runs past the end of the" in message(e)


def test_invalid_header_json(tmp_path):
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "header is not valid JSON" in message(e)


def test_overlapping_offsets_name_the_key(tmp_path):
    path = tmp_path / "o.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    write_safetensors_raw(path, header, b"\0" * 12)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "key 'b': data_offsets overlap those of 'a'" in message(e)


def test_out_of_range_offsets(tmp_path):
    path = tmp_path / "r.safetensors"
    write_safetensors_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "key 'a': tensor data runs past the end of the file (16 > 8 data bytes; truncated?)" in message(e)


def test_gap_between_tensors_names_the_key(tmp_path):
    path = tmp_path / "g.safetensors"
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    write_safetensors_raw(path, header, b"\0" * 12)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "key 'b': gap of 4 bytes before this tensor's data" in message(e)


def test_bytes_after_the_last_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors_raw(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 7)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "3 unexpected bytes after the last tensor" in message(e)


def test_unknown_dtype_names_the_key(tmp_path):
    path = tmp_path / "d.safetensors"
    write_safetensors_raw(path, {"a": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "key 'a': unknown dtype 'F31'" in message(e)


def test_size_disagreeing_with_shape(tmp_path):
    path = tmp_path / "s.safetensors"
    write_safetensors_raw(path, {"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "key 'a': F16 [4] needs 8 bytes but data_offsets span 16" in message(e)


def test_pickle_that_is_not_a_dict_of_tensors(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1), torch.ones(1)], path)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert message(e).endswith("list.pt: the pickle holds a list, not a dict of tensors; "
                               "fix: save a state dict: torch.save(model.state_dict(), path)")


def test_dict_without_tensors(tmp_path):
    path = tmp_path / "cfg.pt"
    torch.save({"lr": 0.1, "epochs": 3}, path)
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(path)
    assert "no tensors found (top-level entries: lr, epochs)" in message(e)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_needing_refused_globals_names_them(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(UnsafePickleError) as e:
        open_checkpoint(path)
    text = message(e)
    assert "the pickle needs globals that safe (weights_only) loading refuses" in text
    assert "system" in text
    assert f"fix: run `ckpt scan {path}` to see what they would do" in text


def test_plain_pickle_is_refused_without_loading(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(path)
    assert "a plain pickle, not a torch checkpoint" in message(e)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(tmp_path)
    assert "the folder holds no checkpoint" in message(e)


def test_folder_with_two_checkpoints_and_no_index(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(UnsupportedFormatError) as e:
        open_checkpoint(tmp_path)
    assert "several checkpoints (a.safetensors, b.safetensors) and no index" in message(e)


def test_index_naming_a_missing_shard(tmp_path):
    _write_sharded(tmp_path, "safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(tmp_path / "model.safetensors.index.json")
    assert "index names shard 'model-00002-of-00002.safetensors', which is missing" in message(e)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_shard_names_must_stay_inside(tmp_path, shard):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(InvalidCheckpointError) as e:
        open_checkpoint(tmp_path)
    assert f"shard name '{shard}' escapes the checkpoint folder" in message(e)


def test_symlink_loop_folder(tmp_path):
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(tmp_path / "loop.pt")
    assert "cannot read" in message(e)


def test_a_foreign_message_is_cut_at_a_sentence_not_mid_word():
    from ckpt_tools.errors import foreign_message

    long = ("PytorchStreamReader failed reading zip archive: failed finding central directory. If you are "
            "seeing this error, there is a high chance that the file is corrupted, truncated or not a zip")
    assert foreign_message(RuntimeError(long)) == \
        "PytorchStreamReader failed reading zip archive: failed finding central directory."
    assert foreign_message("word " * 50) == ("word " * 32).strip() + "…"

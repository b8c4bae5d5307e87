"""Torch files read inertly: every tensor bitwise equal to what was saved, placeholders for every
other global, nothing imported or called, code-running pickles refused unless asked."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ckpt_tools import open_checkpoint
from ckpt_tools.errors import InvalidCheckpointError, UnsafePickleError, UnsupportedFormatError, UsageError
from ckpt_tools.inert import InertObject, is_code_global, loads

SYSTEM = f"{os.system.__module__}.system"
KINDS = ["zip", "legacy"]


def save(obj, path, kind: str):
    torch.save(obj, path, _use_new_zipfile_serialization=(kind == "zip"))
    return path


def varied_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(10, dtype=torch.int64)
    state = {
        "f32": torch.randn(3, 4, generator=generator),
        "f16": torch.randn(5, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "f64": torch.randn(3, generator=generator).double(),
        "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),  # saved through _rebuild_tensor_v3 and a byte storage
        "f8": torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "base": base,
        "rows": base[1:3],  # contiguous, at an offset
        "cols": base[:, 2:4],  # not contiguous
        "transposed": base.t(),
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.ones(2, 2)),
        "head": shared[:4],
        "tail": shared[6:],
    }
    state["tied"] = state["f32"]
    return state


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- tensors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_is_bitwise_equal_to_the_saved_one(tmp_path, kind):
    state = varied_state()
    path = save(state, tmp_path / "v.pt", kind)
    with open_checkpoint(path) as ckpt:
        assert ckpt.keys() == list(state)
        for key, original in state.items():
            got = ckpt.tensor(key)
            assert (got.dtype, got.shape) == (original.dtype, original.shape), key
            assert raw(got) == raw(original), key


@pytest.mark.parametrize("key", ["rows", "cols", "transposed", "tail", "scalar"])
def test_strides_and_offsets_are_the_saved_ones(tmp_path, key):
    state = varied_state()
    with open_checkpoint(save(state, tmp_path / "v.pt", "zip")) as ckpt:
        got = ckpt.tensor(key)
        assert (got.stride(), got.storage_offset()) == (state[key].stride(), state[key].storage_offset())


def test_views_of_one_storage_share_it(tmp_path):
    with open_checkpoint(save(varied_state(), tmp_path / "v.pt", "zip")) as ckpt:
        storages = {key: ckpt.tensor(key).untyped_storage().data_ptr() for key in ("base", "rows", "cols", "f32")}
        assert storages["base"] == storages["rows"] == storages["cols"]
        assert storages["f32"] != storages["base"]
        assert ckpt.aliases == [["f32", "tied"]]


@pytest.mark.parametrize("kind", KINDS)
def test_byte_spans_point_at_the_tensor_bytes(tmp_path, kind):
    state = varied_state()
    path = save(state, tmp_path / "v.pt", kind)
    data = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        for key in ("f32", "rows", "u16", "scalar"):
            where, offset, nbytes = ckpt.byte_span(key)
            assert (where, data[offset:offset + nbytes]) == (path, raw(state[key]))
        assert ckpt.byte_span("cols") is None


def test_listing_imports_no_torch(tmp_path):
    path = save({"model": {"w": torch.ones(2)}, "hparams": argparse.Namespace(lr=0.1)}, tmp_path / "n.pt", "legacy")
    code = ("import sys; from ckpt_tools import open_checkpoint; c = open_checkpoint(sys.argv[1]); "
            "print(c.wrapper, c.keys(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["model", "['w']", "False"]


# -- what the pickle names, read without running it ----------------------------------------

def test_namespace_is_listed_as_not_executed_with_readable_fields(tmp_path):
    state = {"layer.weight": torch.randn(2, 3), "layer.bias": torch.zeros(2)}
    path = save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=0.1, layers=[2, 3])},
                tmp_path / "lightning.ckpt", "zip")
    with open_checkpoint(path) as ckpt:
        assert (ckpt.wrapper, ckpt.keys()) == ("state_dict", list(state))
        assert ckpt.extras == {"hyper_parameters": "argparse.Namespace (not executed)"}
        assert ckpt.not_executed == {"argparse.Namespace": ["hyper_parameters"]}
        assert ckpt.extra_values()["hyper_parameters"]["fields"] == {"lr": 0.1, "layers": [2, 3]}


def test_a_module_named_by_the_pickle_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_sidefx_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nclass Config:\n    def __init__(self, depth):\n        self.depth = depth\n")
    code = ("import sys, torch, ckpt_sidefx_mod; "
            "torch.save({'w': torch.ones(2), 'cfg': ckpt_sidefx_mod.Config(3)}, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.pt")], check=True,
                   env={**os.environ, "PYTHONPATH": str(tmp_path)})
    marker.unlink()  # saving it imported the module once, in that other process
    monkeypatch.syspath_prepend(str(tmp_path))
    with open_checkpoint(tmp_path / "c.pt") as ckpt:
        assert ckpt.keys() == ["w"]
        assert ckpt.not_executed == {"ckpt_sidefx_mod.Config": ["cfg"]}
        assert ckpt.extra_values()["cfg"]["fields"] == {"depth": 3}
    assert not marker.exists()
    assert "ckpt_sidefx_mod" not in sys.modules


def _handmade(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


def _text(value: str) -> bytes:
    return b"X" + len(value).to_bytes(4, "little") + value.encode()


def test_operations_on_a_placeholder_are_recorded_in_order():
    data = _handmade(b"cnowhere_mod\nThing\n", b")\x81",  # NEWOBJ
                     b"}", _text("depth"), b"K\x03s", b"b",  # BUILD {"depth": 3}
                     b"(", _text("k"), b"K\x01u",  # SETITEMS
                     b"(K\x07e")  # APPENDS
    thing = loads(data).root
    assert isinstance(thing, InertObject)
    assert (thing.dotted, thing.ops) == ("nowhere_mod.Thing", ["NEWOBJ", "BUILD", "SETITEM", "APPENDS"])
    assert (thing.state, thing.items, thing.listitems) == ({"depth": 3}, [("k", 1)], [7])


def test_a_call_of_a_placeholder_keeps_its_arguments():
    thing = loads(_handmade(b"cnowhere_mod\nmake\n", _text("a"), b"K\x02\x86R")).root
    assert (thing.dotted, thing.how, thing.args) == ("nowhere_mod.make", "REDUCE", ("a", 2))


@pytest.mark.parametrize("target", [b"ccollections\nCounter\n", b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n"])
def test_a_pickle_cannot_change_the_stand_ins_for_later_reads(target):
    import collections

    poison = _handmade(target, b"N}", _text("dtype"), _text("F64"), b"s", _text("kind"), _text("x"), b"s\x86b")
    with contextlib.suppress(InvalidCheckpointError):  # refused, or applied to that pickle's own copy
        loads(poison)
    clean = loads(_handmade(target)).root
    assert getattr(clean, "dtype", "F32") == "F32" and getattr(clean, "kind", "dtype") == "dtype"
    assert not hasattr(collections.Counter, "dtype")


@pytest.mark.parametrize(("module", "name", "hostile"), [
    ("posix", "system", True), ("nt", "system", True), ("subprocess", "Popen", True),
    ("builtins", "eval", True), ("builtins", "getattr", True), ("builtins", "set", False),
    ("os.path", "join", True), ("importlib", "import_module", True), ("torch.hub", "load", True),
    ("pathlib", "Path.write_text", True), ("pathlib", "PosixPath", False), ("argparse", "Namespace", False),
    ("torch.nn.modules.linear", "Linear", False), ("omegaconf.dictconfig", "DictConfig", False),
    ("transformers.training_args", "TrainingArguments", False),
])
def test_where_the_line_is(module, name, hostile):
    assert is_code_global(module, name) is hostile


class Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payload(tmp_path, kind):
    target = tmp_path / "pwned"
    obj = {"w": torch.arange(6.0), "a": Reduce(os.system, f"touch {target}"),
           "b": Reduce(builtins.exec, f"open({str(target)!r}, 'w').write('x')")}
    return save(obj, tmp_path / f"evil-{kind}.pt", kind), target


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_pickles_are_refused_by_default(tmp_path, kind):
    path, target = _payload(tmp_path, kind)
    with pytest.raises(UnsafePickleError) as info:
        open_checkpoint(path)
    assert info.value.globals == [SYSTEM, "builtins.exec"]
    assert "pass --inert (inert=True)" in str(info.value)
    assert not target.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_pickles_are_read_without_running_when_asked(tmp_path, kind):
    path, target = _payload(tmp_path, kind)
    with open_checkpoint(path, inert=True) as ckpt:
        assert ckpt.keys() == ["w"]
        assert torch.equal(ckpt.tensor("w"), torch.arange(6.0))
        assert ckpt.not_executed == {SYSTEM: ["a"], "builtins.exec": ["b"]}
        assert ckpt.extras == {"a": f"{SYSTEM} (not executed)", "b": "builtins.exec (not executed)"}
    assert not target.exists()


# -- pickled modules -----------------------------------------------------------------------

def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1, bias=False), nn.BatchNorm1d(3), nn.Sequential(nn.Linear(3, 2)))
    model[1].running_mean.uniform_()
    model[1].register_buffer("scratch", torch.full((4,), 9.0), persistent=False)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_a_pickled_module_lists_its_state_dict(tmp_path, kind):
    model = small_model()
    with open_checkpoint(save(model, tmp_path / "m.pt", kind)) as ckpt:
        assert ckpt.wrapper is None
        assert ckpt.keys() == list(model.state_dict())
        for key, value in model.state_dict().items():
            assert raw(ckpt.tensor(key)) == raw(value), key


@pytest.mark.parametrize("kind", KINDS)
def test_a_module_under_a_key_is_selected_and_its_other_tensors_accounted(tmp_path, kind):
    model = small_model()
    path = save({"model": model, "optimizer": None, "epoch": 3}, tmp_path / "yolo.pt", kind)
    with open_checkpoint(path) as ckpt:
        assert (ckpt.wrapper, ckpt.keys()) == ("model", list(model.state_dict()))
        assert ckpt.extras == {"optimizer": "NoneType", "epoch": "int"}
        assert set(ckpt.not_executed) == {"torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv1d",
                                          "torch.nn.modules.batchnorm.BatchNorm1d", "torch.nn.modules.linear.Linear"}
        assert ckpt.not_executed["torch.nn.modules.container.Sequential"] == ["model", "model._modules.2"]
        assert ("not executed (read inertly, never imported or called): torch.nn.modules.container.Sequential "
                "at model; and 3 more globals inside them") in ckpt.notes
        assert [b.to_dict() for b in ckpt.accounting.buckets] == [
            {"kind": "selected", "path": "model", "tensors": 8, "nbytes": 6 * 4 + 4 * 3 * 4 + 8 + 6 * 4 + 2 * 4},
            {"kind": "extra", "path": "model._modules.1._buffers.scratch", "tensors": 1, "nbytes": 16}]


# -- damaged and unsupported files ------------------------------------------------------------

def test_a_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UnsupportedFormatError) as info:
        open_checkpoint(path)
    assert "a TorchScript archive (torch.jit.save)" in str(info.value)


def test_a_tensor_past_its_storage_is_reported_as_damage(tmp_path):
    path = save({"w": torch.arange(4.0)}, tmp_path / "w.pt", "legacy")
    data = bytearray(path.read_bytes())
    data[data.index(b"K\x04\x85") + 1] = 9  # the shape (4,) becomes (9,)
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpointError) as info:
        open_checkpoint(path)
    assert "a tensor reaches past its storage" in str(info.value)


# -- options ---------------------------------------------------------------------------------

def test_unknown_options_are_refused_not_dropped(tmp_path):
    pt = save({"w": torch.ones(1)}, tmp_path / "w.pt", "zip")
    with pytest.raises(TypeError) as unknown:
        open_checkpoint(pt, weights_only=False)
    assert "weights_only" in str(unknown.value)


def test_select_on_safetensors_is_a_usage_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError) as flat:
        open_checkpoint(tmp_path / "w.safetensors", select="model")
    assert "this checkpoint holds no pickle" in str(flat.value)
    with open_checkpoint(tmp_path / "w.safetensors", inert=True) as ckpt:
        assert ckpt.keys() == ["w"]


# -- rewriting the pickle ----------------------------------------------------------------------

def test_remap_rewrites_a_training_file_with_its_scalars(tmp_path):
    from ckpt_tools.remap import rules_from_cli
    from ckpt_tools.remap_file import remap_checkpoint

    weights = {"_orig_mod.w": torch.arange(6.0).reshape(2, 3), "_orig_mod.b": torch.ones(2)}
    src = save({"model": weights, "best_val_loss": torch.tensor(1.5), "iter_num": 7}, tmp_path / "ckpt.pt", "zip")
    remap_checkpoint(src, tmp_path / "out.pt", rules=rules_from_cli(strip_prefix=("_orig_mod.",)))
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(written) == ["best_val_loss", "iter_num", "model"]
    assert torch.equal(written["model"]["w"], weights["_orig_mod.w"])
    assert torch.equal(written["best_val_loss"], torch.tensor(1.5))


def test_remap_refuses_a_pickle_holding_objects_not_executed(tmp_path):
    from ckpt_tools.remap import rules_from_cli
    from ckpt_tools.remap_file import remap_checkpoint

    src = save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, tmp_path / "t.pt", "zip")
    with pytest.raises(UsageError) as info:
        remap_checkpoint(src, tmp_path / "out.pt", rules=rules_from_cli(add_prefix=("m.",)))
    assert "holds objects that were not executed (argparse.Namespace)" in str(info.value)
    assert not (tmp_path / "out.pt").exists()

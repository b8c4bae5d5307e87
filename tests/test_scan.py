"""ckpt scan: every import and call of a pickle, found without executing it.

Payloads are made with pickle.dumps / torch.save, which only call ``__reduce__`` (harmless); no
test ever loads them unsafely. Each payload would create ``tmp_path / "pwned"`` if it ran.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

from ckpt_tools.errors import CheckpointNotFoundError, InvalidCheckpointError, UnsafePickleError
from ckpt_tools.formats import open_checkpoint
from ckpt_tools.scan import scan_pickle, unsafe_globals


class Reduce:
    """Pickles as ``func(*args)``: what a malicious checkpoint embeds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(target) -> Reduce:
    return Reduce(os.system, f"touch {target}")


def state(extra=None) -> dict:
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    if extra is not None:
        sd["payload"] = extra
    return sd


def save_zip(path, obj):
    torch.save(obj, path)
    return path


def save_legacy(path, obj):
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def save_pickle(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


SAVERS = {"zip": save_zip, "legacy": save_legacy, "pickle": save_pickle}
SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


# -- clean files ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_clean_torch_files_are_safe(tmp_path, kind):
    obj = {"model": OrderedDict(state()), "step": 3, "lr": 0.5, "name": "x",
           "p": torch.nn.Parameter(torch.zeros(2)), "i8": torch.zeros(2, dtype=torch.int8)}
    path = SAVERS[kind](tmp_path / "clean.pt", obj)
    report = scan_pickle(path)
    assert report.verdict == "safe"
    assert report.offenders == []
    names = {f"{g['module']}.{g['name']}" for g in report.to_dict()["globals"]}
    assert "torch._utils._rebuild_tensor_v2" in names
    assert [g for g in report.globals if not g["allowed"]] == []


def test_zip_and_legacy_list_their_pickles(tmp_path):
    assert scan_pickle(save_zip(tmp_path / "a.pt", state())).pickles == ["a/data.pkl"]
    legacy = scan_pickle(save_legacy(tmp_path / "b.pt", state()))
    assert legacy.format == "torch-legacy"
    assert legacy.pickles == ["magic", "protocol", "sys_info", "object", "storage_keys"]


def test_plain_pickle_of_tensors_is_unsafe(tmp_path):
    # torch.storage._load_from_bytes calls torch.load without weights_only
    report = scan_pickle(save_pickle(tmp_path / "t.pkl", state(), protocol=2))
    assert report.offenders == ["torch.storage._load_from_bytes"]


def test_plain_pickle_of_an_ordered_dict_is_safe(tmp_path):
    report = scan_pickle(save_pickle(tmp_path / "od.pkl", OrderedDict(a=1), protocol=2))
    assert (report.format, report.verdict) == ("pickle", "safe")
    assert [(g["module"], g["name"]) for g in report.globals] == [("collections", "OrderedDict")]


# -- payloads -------------------------------------------------------------------------------

PAYLOADS = {
    "os.system": (lambda t: touch(t), [SYSTEM]),
    "builtins.exec": (lambda t: Reduce(builtins.exec, f"open({str(t)!r}, 'w').write('x')"), ["builtins.exec"]),
    "builtins.eval": (lambda t: Reduce(builtins.eval, f"open({str(t)!r}, 'w')"), ["builtins.eval"]),
    "io.open": (lambda t: Reduce(builtins.open, str(t), "w"), [f"{builtins.open.__module__}.open"]),
    "subprocess.Popen": (lambda t: Reduce(subprocess.Popen, ["touch", str(t)]), ["subprocess.Popen"]),
}


@pytest.mark.parametrize("kind", sorted(SAVERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_payloads_are_unsafe_and_named(tmp_path, kind, payload):
    make, expected = PAYLOADS[payload]
    target = tmp_path / "pwned"
    # a plain pickle of tensors imports torch.storage._load_from_bytes (itself unsafe), so
    # plain pickles carry plain values around the payload
    obj = state(make(target)) if kind != "pickle" else {"step": 1, "payload": make(target)}
    path = SAVERS[kind](tmp_path / f"evil.{kind}", obj)
    report = scan_pickle(path)
    assert report.verdict == "unsafe"
    assert report.offenders == expected
    assert unsafe_globals(path) == expected
    assert {"opcode": "REDUCE", "callable": expected[0], "count": 1, "allowed": False} in [
        {k: c[k] for k in ("opcode", "callable", "count", "allowed")} for c in report.calls]
    assert not target.exists()


def test_memoised_global_is_counted_for_every_call(tmp_path):
    target = tmp_path / "pwned"
    path = save_pickle(tmp_path / "twice.pkl", [touch(target), touch(target)], protocol=2)
    assert b"\x68" in path.read_bytes() or b"\x6a" in path.read_bytes()  # BINGET / LONG_BINGET
    calls = [c for c in scan_pickle(path).calls if c["callable"] == SYSTEM]
    assert [(c["opcode"], c["count"]) for c in calls] == [("REDUCE", 2)]


def _handmade(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def _uni(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_stack_global_resolved_through_the_memo(tmp_path):
    # strings memoised, popped, then fetched back with BINGET before STACK_GLOBAL
    data = _handmade(_uni("os"), b"\x94", b"0", _uni("system"), b"\x94", b"0",
                     b"h\x00", b"h\x01", b"\x93", _uni("id"), b"\x85", b"R")
    path = tmp_path / "memo.pkl"
    path.write_bytes(data)
    report = scan_pickle(path)
    assert report.offenders == ["os.system"]
    assert [(c["opcode"], c["callable"]) for c in report.calls] == [("REDUCE", "os.system")]


def test_a_stack_global_that_is_never_called_is_still_an_offender(tmp_path):
    # importing the module is itself code the unpickler would run
    path = tmp_path / "import-only.pkl"
    path.write_bytes(_handmade(_uni("os"), _uni("system"), b"\x93", b"0", b"N"))
    report = scan_pickle(path)
    assert report.offenders == ["os.system"]
    assert report.calls == []


def test_long_binget_and_binput(tmp_path):
    data = b"\x80\x02" + b"cos\nsystem\nr\x07\x00\x00\x000" + b"j\x07\x00\x00\x00" + b"U\x02id\x85R."
    path = tmp_path / "long.pkl"
    path.write_bytes(data)
    assert [(c["opcode"], c["callable"]) for c in scan_pickle(path).calls] == [("REDUCE", "os.system")]


def test_inst_obj_newobj_and_build_are_calls(tmp_path):
    inst = b"(S'id'\nios\nsystem\n."  # protocol 0 INST
    obj = _handmade(b"(", _uni("subprocess"), _uni("Popen"), b"\x93", _uni("id"), b"o")
    newobj = _handmade(_uni("subprocess"), _uni("Popen"), b"\x93", b")", b"\x81", b"}", b"b")
    newobj_ex = _handmade(_uni("subprocess"), _uni("Popen"), b"\x93", b")", b"}", b"\x92")
    cases = {"inst": (inst, "INST", "os.system"), "obj": (obj, "OBJ", "subprocess.Popen"),
             "newobj": (newobj, "NEWOBJ", "subprocess.Popen"), "newobj_ex": (newobj_ex, "NEWOBJ_EX", "subprocess.Popen")}
    for name, (data, opcode, callable_) in cases.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        report = scan_pickle(path)
        assert (opcode, callable_) in [(c["opcode"], c["callable"]) for c in report.calls], name
        assert report.offenders == [callable_], name
    builds = [c for c in scan_pickle(tmp_path / "newobj.pkl").calls if c["opcode"] == "BUILD"]
    assert [(c["callable"], c["allowed"]) for c in builds] == [("subprocess.Popen", False)]


def test_python2_names_are_mapped_like_the_unpickler_does(tmp_path):
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\nset\n]\x85R" + b"c__builtin__\neval\nU\x011\x85R" + b"\x86.")
    report = scan_pickle(path)
    assert [(g["module"], g["name"], g["allowed"]) for g in report.globals] == [
        ("builtins", "set", True), ("builtins", "eval", False)]


def test_every_pickle_record_in_a_zip_is_scanned(tmp_path):
    path = save_zip(tmp_path / "extra.pt", state())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra/constants.pkl", pickle.dumps(touch(tmp_path / "pwned"), protocol=2))
    report = scan_pickle(path)
    assert report.pickles == ["extra/data.pkl", "extra/constants.pkl"]
    assert report.offenders == [SYSTEM]
    assert [g["pickle"] for g in report.globals if not g["allowed"]] == ["extra/constants.pkl"]


def test_a_second_pickle_behind_the_first_is_scanned(tmp_path):
    path = tmp_path / "two.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2) + pickle.dumps(touch(tmp_path / "pwned"), protocol=2))
    report = scan_pickle(path)
    assert report.pickles == ["pickle 0", "pickle 1"]
    assert report.offenders == [SYSTEM]


def test_a_pickle_with_a_zip_appended_is_scanned_as_the_pickle_torch_would_load(tmp_path):
    zipped = save_zip(tmp_path / "z.pt", state()).read_bytes()
    path = tmp_path / "polyglot.pt"
    path.write_bytes(pickle.dumps(touch(tmp_path / "pwned"), protocol=2) + zipped)
    report = scan_pickle(path)
    assert report.format == "pickle"
    assert report.offenders == [SYSTEM]


def test_truncated_payload_still_names_what_it_imported(tmp_path):
    data = pickle.dumps([touch(tmp_path / "pwned"), list(range(100))], protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) - 20])
    report = scan_pickle(path)
    assert report.verdict == "unsafe"
    assert report.offenders == [SYSTEM]
    assert any("malformed" in note for note in report.notes)


def test_safe_globals_registered_with_torch_are_honoured_but_blocked_modules_never(tmp_path):
    path = save_pickle(tmp_path / "print.pkl", Reduce(print, "hi"), protocol=2)
    assert scan_pickle(path).offenders == ["builtins.print"]
    with torch.serialization.safe_globals([print, os.system]):
        assert scan_pickle(path).verdict == "safe"
        assert scan_pickle(save_pickle(tmp_path / "sys.pkl", touch("x"), protocol=2)).offenders == [SYSTEM]
    assert scan_pickle(path).verdict == "unsafe"


def test_scanning_imports_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "scan_canary_module.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "canary.pkl"
    path.write_bytes(b"\x80\x02cscan_canary_module\nf\n)R.")
    assert scan_pickle(path).offenders == ["scan_canary_module.f"]
    assert not marker.exists()
    assert "scan_canary_module" not in sys.modules


def test_file_object_source(tmp_path):
    data = save_legacy(tmp_path / "l.pt", state(touch(tmp_path / "pwned"))).read_bytes()
    assert unsafe_globals(io.BytesIO(data)) == [SYSTEM]


# -- unreadable input -----------------------------------------------------------------------

def test_unreadable_inputs_raise_invalid_checkpoint(tmp_path):
    zipped = save_zip(tmp_path / "ok.pt", state()).read_bytes()
    cases = {
        "empty.pt": b"",
        "garbage.bin": b"\xff\xfe not a pickle at all",
        "truncated-zip.pt": zipped[: len(zipped) // 2],
        "truncated-pickle.pkl": pickle.dumps({"a": list(range(50))}, protocol=2)[:-30],
        "huge-length.pkl": b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"xx",
        "no-stop.pkl": b"\x80\x02]q\x00",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidCheckpointError):
            scan_pickle(tmp_path / name)
    with pytest.raises(CheckpointNotFoundError):
        scan_pickle(tmp_path / "missing.pt")


def test_sharded_index_and_folder_scan_every_shard(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_zip(folder / "pytorch_model-00001-of-00002.bin", {"a": torch.zeros(2)})
    save_legacy(folder / "pytorch_model-00002-of-00002.bin", {"b": torch.zeros(2), "x": touch(tmp_path / "pwned")})
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                                "b": "pytorch_model-00002-of-00002.bin"}}))
    for source in (index, folder):
        report = scan_pickle(source)
        assert report.source == str(source)
        assert report.offenders == [SYSTEM]
        assert report.pickles[0] == "pytorch_model-00001-of-00002.bin:pytorch_model-00001-of-00002/data.pkl"
        assert [g["pickle"] for g in report.globals if not g["allowed"]] == ["pytorch_model-00002-of-00002.bin:object"]
    single = tmp_path / "single"
    single.mkdir()
    save_zip(single / "model.pt", state())
    assert scan_pickle(single).pickles == ["model.pt:model/data.pkl"]  # a folder scan names each file
    escape = tmp_path / "escape.index.json"
    escape.write_text(json.dumps({"weight_map": {"a": "../x.bin"}}))
    with pytest.raises(InvalidCheckpointError, match="escapes"):
        scan_pickle(escape)


def test_zip_without_pickle_and_zip_bomb(tmp_path):
    plain = tmp_path / "nopkl.pt"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(InvalidCheckpointError, match="without a .pkl"):
        scan_pickle(plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"\x00" * (64 * 1024 * 1024))
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(InvalidCheckpointError, match="zip bomb"):
        scan_pickle(bomb)


def test_safetensors_has_nothing_to_execute(tmp_path):
    from safetensors.torch import save_file

    save_file(state(), tmp_path / "m.safetensors")
    report = scan_pickle(tmp_path / "m.safetensors")
    assert (report.format, report.verdict, report.pickles) == ("safetensors", "safe", [])


def test_hf_sources_are_scanned_by_range_reads(tmp_path, run_cli, monkeypatch):
    from safetensors.torch import save_file

    from ckpt_tools.server import HubServer, publish

    target = tmp_path / "pwned"
    files = {"evil.pt": save_zip(tmp_path / "evil.pt", state(touch(target))),
             "legacy.bin": save_legacy(tmp_path / "legacy.bin", state(touch(target))),
             "clean.pt": save_zip(tmp_path / "clean.pt", state())}
    save_file(state(), tmp_path / "m.safetensors")
    files["m.safetensors"] = tmp_path / "m.safetensors"
    root = tmp_path / "served"
    publish(root, "org/evil", files, tag="v1")
    with HubServer(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        assert scan_pickle("hf://org/evil@v1/evil.pt").offenders == [SYSTEM]
        assert scan_pickle("hf://org/evil/legacy.bin").offenders == [SYSTEM]
        assert scan_pickle("hf://org/evil/m.safetensors").verdict == "safe"
        result = run_cli("scan", "hf://org/evil/clean.pt", "--format", "json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["source"] == "hf://org/evil/clean.pt"
        assert run_cli("scan", "hf://org/evil/missing.pt").exit_code == 2
    assert not target.exists()


def test_hf_sharded_index_scans_every_shard_at_one_commit(tmp_path, monkeypatch):
    from ckpt_tools.server import HubServer, publish

    target = tmp_path / "pwned"
    index = {"weight_map": {"a": "part-1.bin", "b": "part-2.bin"}}
    files = {"sub/pytorch_model.bin.index.json": json.dumps(index).encode(),
             "sub/part-1.bin": save_zip(tmp_path / "p1.bin", state()),
             "sub/part-2.bin": save_zip(tmp_path / "p2.bin", state(touch(target)))}
    publish(tmp_path / "served", "org/sharded", files)
    with HubServer(tmp_path / "served") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        report = scan_pickle("hf://org/sharded/sub/pytorch_model.bin.index.json")
    assert report.verdict == "unsafe" and report.offenders == [SYSTEM]
    assert {p.split(":")[0] for p in report.pickles} == {"part-1.bin", "part-2.bin"}
    assert not target.exists()


def test_refusal_error_names_every_global_and_the_scan_command(tmp_path):
    path = save_zip(tmp_path / "e.pt", {"a": touch(tmp_path / "p"), "b": Reduce(builtins.eval, "1")})
    with pytest.raises(UnsafePickleError) as refused:
        open_checkpoint(path)
    assert refused.value.globals == [SYSTEM, "builtins.eval"]
    assert f"ckpt scan {path}" in refused.value.one_line()
    assert "\n" not in refused.value.one_line()
    assert not (tmp_path / "p").exists()


# -- CLI ------------------------------------------------------------------------------------

def test_cli_exit_codes_and_json(tmp_path, run_cli):
    clean = save_zip(tmp_path / "clean.pt", state())
    evil = save_legacy(tmp_path / "evil.pt", state(touch(tmp_path / "pwned")))
    ok = run_cli("scan", clean, "--format", "json")
    assert ok.exit_code == 0
    doc = json.loads(ok.stdout)
    assert doc["verdict"] == "safe" and doc["pickles"] == ["clean/data.pkl"]
    assert set(doc["globals"][0]) == {"module", "name", "allowed"}
    bad = run_cli("scan", evil, "--format", "json")
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["verdict"] == "unsafe"
    assert {"module": "posix" if SYSTEM.startswith("posix") else "nt", "name": "system", "allowed": False} in doc["globals"]
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b"\xffnope")
    unreadable = run_cli("scan", garbage)
    assert unreadable.exit_code == 2
    assert unreadable.stderr.count("\n") == 1 and unreadable.stderr.startswith("error: ")
    assert not (tmp_path / "pwned").exists()


def test_cli_table_and_markdown_name_the_offender(tmp_path, run_cli):
    evil = save_zip(tmp_path / "evil.pt", state(touch(tmp_path / "pwned")))
    table = run_cli("scan", evil)
    assert table.exit_code == 1 and f"UNSAFE, imports or calls {SYSTEM}" in table.stdout
    md = run_cli("scan", evil, "--format", "markdown")
    assert f"| {SYSTEM} | NO | 1 | evil/data.pkl |" in md.stdout


def test_a_numeric_numpy_array_is_safe_without_a_pickle(tmp_path, run_cli):
    import numpy as np

    np.save(tmp_path / "ints.npy", np.arange(10))
    result = run_cli("scan", tmp_path / "ints.npy")
    assert result.exit_code == 0
    assert "safe, no pickle: nothing to scan (numpy)" in result.stdout


def test_an_object_numpy_array_is_scanned_as_the_pickle_it_holds(tmp_path, run_cli):
    import numpy as np

    np.save(tmp_path / "objs.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    report = scan_pickle(tmp_path / "objs.npy")
    assert report.verdict == "unsafe"
    assert "numpy.ndarray" in report.offenders


def test_an_npz_is_scanned_member_by_member(tmp_path):
    import numpy as np

    np.savez(tmp_path / "mix.npz", a=np.arange(3), b=np.array([{"x": 2}], dtype=object))
    report = scan_pickle(tmp_path / "mix.npz")
    assert (report.format, report.pickles, report.verdict) == ("npz", ["b.npy"], "unsafe")


def test_a_safetensors_scan_prints_no_empty_table(tmp_path, run_cli):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    result = run_cli("scan", tmp_path / "a.safetensors")
    assert result.exit_code == 0
    assert "global" not in result.stdout


def test_an_empty_file_is_called_empty_as_every_command_does(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InvalidCheckpointError, match="the file is empty"):
        scan_pickle(tmp_path / "empty.pt")

"""convert, remap and scan of a plain state dict import no torch, and write what the torch path writes.

Each command runs in a subprocess whose ``sys.meta_path`` refuses ``torch``; its output is then
read with torch here and compared bit for bit with what the torch path writes. The torch-zip
writer's pickle is compared byte for byte with the one ``torch.save`` writes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckpt_tools.convert as convert_module
import ckpt_tools.pickle_safety as pickle_safety
import ckpt_tools.remap_file as remap_file
import ckpt_tools.torch_zip as torch_zip
from ckpt_tools.errors import IntegrityError
from ckpt_tools.formats import open_checkpoint
from ckpt_tools.fs import AtomicFile
from ckpt_tools.remap import rules_from_cli
from ckpt_tools.remap_file import remap_checkpoint
from ckpt_tools.scan import scan_pickle
from ckpt_tools.torch_zip import plan_torch_zip, torch_pickle, write_torch_zip

REPO = Path(__file__).resolve().parent.parent

# the CLI with torch made unimportable (an attempt is reported on stderr at exit, even when the
# code caught the ImportError); exits with the CLI's own exit code
TORCH_ATTEMPTED = "an import of torch was attempted"
BLOCKED_CLI = f"""
import atexit, sys

class NoTorch:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            self.attempts.append(name)
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
atexit.register(lambda: NoTorch.attempts and sys.stderr.write("{TORCH_ATTEMPTED}\\n"))
from ckpt_tools.cli import main
main(sys.argv[1:])
"""


def run_blocked(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", BLOCKED_CLI, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO)


def small_state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(10, 10), "a.bias": torch.randn(10),
            "a.half": torch.arange(6, dtype=torch.float16).reshape(2, 3)}


@pytest.fixture(params=["pt", "safetensors"])
def small(request, tmp_path):
    path = tmp_path / f"small.{request.param}"
    if request.param == "pt":
        torch.save(small_state(), path)
    else:
        save_file(small_state(), str(path))
    return path


def read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        assert (got[key].shape, got[key].dtype) == (want[key].shape, want[key].dtype), key
        assert torch.equal(bits(got[key]), bits(want[key])), key


# -- scan --

def test_scan_without_torch_reports_what_scan_with_torch_reports(small):
    blocked = run_blocked("scan", small, "--format", "json")
    assert blocked.returncode == 0, blocked.stderr
    assert TORCH_ATTEMPTED not in blocked.stderr
    assert json.loads(blocked.stdout) == scan_pickle(small).to_dict()


def test_the_allow_list_snapshot_is_the_installed_torchs():
    code = ("import json; from ckpt_tools.pickle_safety import live_allow_list; allowed, blocked = live_allow_list(); "
            "print(json.dumps([sorted(allowed), list(blocked)]))")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    allowed, blocked = json.loads(fresh.stdout)
    snapshot = pickle_safety.snapshot_allow_list(pickle_safety.installed_torch_version())
    assert snapshot is not None, "run scripts/allowlist_snapshot.py for the installed torch"
    assert (sorted(snapshot[0]), list(snapshot[1])) == (allowed, blocked)


def test_without_torch_imported_the_snapshot_is_used(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(pickle_safety, "live_allow_list", lambda: pytest.fail("torch was read"))
    assert pickle_safety.allow_list() == pickle_safety.snapshot_allow_list(pickle_safety.installed_torch_version())


def test_a_torch_version_the_snapshot_lacks_is_read_from_torch(monkeypatch):
    live = (frozenset({"m.f"}), ("sys",))
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(pickle_safety, "installed_torch_version", lambda: "0.0.0-unknown")
    monkeypatch.setattr(pickle_safety, "live_allow_list", lambda: live)
    assert pickle_safety.allow_list() == live


def test_once_torch_is_imported_the_allow_list_is_read_live(monkeypatch):
    live = (frozenset({"m.f"}), ("sys",))
    monkeypatch.setattr(pickle_safety, "live_allow_list", lambda: live)
    assert pickle_safety.allow_list() == live


# -- convert --

def converted_with_torch(src: Path, dst: Path, monkeypatch) -> None:
    """The tensor path: every tensor built with torch, written and verified from memory."""
    with monkeypatch.context() as patch:
        patch.setattr(convert_module._ShardWriter, "_unchanged", lambda self, item: None)
        convert_module.convert_to_safetensors(src, dst)


def test_convert_without_torch_writes_what_the_torch_path_writes(small, tmp_path, monkeypatch):
    blocked = run_blocked("convert", small, tmp_path / "fast.safetensors", "--format", "json")
    assert blocked.returncode == 0, blocked.stderr
    assert TORCH_ATTEMPTED not in blocked.stderr
    assert json.loads(blocked.stdout)["verified_tensors"] == 3
    converted_with_torch(small, tmp_path / "torch.safetensors", monkeypatch)
    assert_bitwise_equal(load_file(str(tmp_path / "fast.safetensors")), load_file(str(tmp_path / "torch.safetensors")))
    assert_bitwise_equal(load_file(str(tmp_path / "fast.safetensors")), read(small))


# -- remap --

def remapped_with_torch(src: Path, dst: Path, monkeypatch, **rules) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(remap_file, "_plan_without_torch", lambda *args: None)
        patch.setattr(convert_module._ShardWriter, "_unchanged", lambda self, item: None)
        remap_checkpoint(src, dst, rules=rules_from_cli(**rules))


def test_remap_without_torch_writes_what_the_torch_path_writes(small, tmp_path, monkeypatch):
    fast, slow = tmp_path / f"fast{small.suffix}", tmp_path / f"torch{small.suffix}"
    blocked = run_blocked("remap", small, fast, "--strip-prefix", "a.", "--drop", "half", "--format", "json")
    assert blocked.returncode == 0, blocked.stderr
    assert TORCH_ATTEMPTED not in blocked.stderr
    assert json.loads(blocked.stdout)["verified"] is True
    remapped_with_torch(small, slow, monkeypatch, strip_prefix=("a.",), drop=("half",))
    assert_bitwise_equal(read(fast), read(slow))
    assert_bitwise_equal(read(fast), {k.removeprefix("a."): v for k, v in read(small).items() if k != "a.half"})


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def test_a_remapped_pt_holds_the_pickle_torch_save_writes(tmp_path, monkeypatch):
    torch.save(small_state(), tmp_path / "s.pt")
    assert run_blocked("remap", tmp_path / "s.pt", tmp_path / "fast.pt", "--strip-prefix", "a.").returncode == 0
    remapped_with_torch(tmp_path / "s.pt", tmp_path / "slow.pt", monkeypatch, strip_prefix=("a.",))
    assert data_pkl(tmp_path / "fast.pt") == data_pkl(tmp_path / "slow.pt")


def module_state() -> dict:
    """A module's own state dict: an OrderedDict whose ``_metadata`` holds each module's version."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict()


def test_a_remapped_state_dict_keeps_its_module_versions_under_the_new_names(tmp_path):
    torch.save(module_state(), tmp_path / "s.pt")
    remap_checkpoint(tmp_path / "s.pt", tmp_path / "o.pt", rules=rules_from_cli(add_prefix=("m.",)))
    written = torch.load(tmp_path / "o.pt", weights_only=True)
    assert written._metadata == {"m": {"version": 1}, "m.0": {"version": 1}, "m.1": {"version": 2}}


@pytest.mark.parametrize("state", [module_state, lambda: {"w": torch.nn.Parameter(torch.ones(2))}],
                         ids=["state-dict-metadata", "parameter"])
def test_a_remapped_pt_keeps_what_torch_save_would_keep(tmp_path, monkeypatch, state):
    torch.save(state(), tmp_path / "s.pt")
    remap_checkpoint(tmp_path / "s.pt", tmp_path / "fast.pt", rules=rules_from_cli(add_prefix=("m.",)))
    remapped_with_torch(tmp_path / "s.pt", tmp_path / "slow.pt", monkeypatch, add_prefix=("m.",))
    assert data_pkl(tmp_path / "fast.pt") == data_pkl(tmp_path / "slow.pt")


def test_a_remapped_parameter_stays_a_parameter(tmp_path):
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, tmp_path / "s.pt")
    remap_checkpoint(tmp_path / "s.pt", tmp_path / "o.pt", rules=rules_from_cli(add_prefix=("m.",)))
    assert type(torch.load(tmp_path / "o.pt", weights_only=True)["m.w"]) is torch.nn.Parameter


def test_a_remapped_pt_keeps_its_archive_and_records_and_only_the_storages_it_needs(tmp_path):
    torch.save(small_state(), tmp_path / "s.pt")
    remap_checkpoint(tmp_path / "s.pt", tmp_path / "o.pt", rules=rules_from_cli(drop=("a.half",)))
    with zipfile.ZipFile(tmp_path / "o.pt") as archive:
        assert archive.namelist() == ["s/data.pkl", "s/.format_version", "s/.storage_alignment", "s/byteorder",
                                      "s/data/0", "s/data/1", "s/version", "s/.data/serialization_id"]
        assert archive.testzip() is None
        assert archive.read("s/byteorder") == b"little"


def test_a_remapped_pt_loads_memory_mapped(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "s.pt")
    remap_checkpoint(tmp_path / "s.pt", tmp_path / "o.pt", rules=rules_from_cli(add_prefix=("m.",)))
    mapped = torch.load(tmp_path / "o.pt", weights_only=True, mmap=True)  # needs aligned storages
    assert_bitwise_equal(mapped, {"m." + k: v for k, v in state.items()})


# -- the torch-zip writer --

def varied_objects() -> dict[str, object]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.arange(4.0)
    return {
        "dtypes": {"f16": torch.ones(2, dtype=torch.float16), "bf16": torch.ones(2, 2, dtype=torch.bfloat16),
                   "u16": torch.tensor([1, 2], dtype=torch.uint16), "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
                   "bool": torch.tensor([True]), "c64": torch.ones(2, dtype=torch.complex64),
                   "scalar": torch.tensor(3.0)},
        "views": {"cols": base[:, 2:4], "t": base.t(), "rows": base[1:3], "a": shared, "tied": shared,
                  "middle": shared[1:3], "empty": torch.empty(0, 3), "empty_rows": torch.empty(2, 0)},
        "training": {"model": {"w": torch.ones(2)}, "epoch": 3, "param": torch.nn.Parameter(torch.ones(2)),
                     "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]},
                     "names": ("a", "b"), "dtype": torch.float16, "size": torch.Size([2, 3]), "blob": b"x",
                     "ordered": __import__("collections").OrderedDict(b=1, a=2), "none": None},
    }


@pytest.mark.parametrize("name", list(varied_objects()))
def test_the_pickle_is_byte_for_byte_the_one_torch_save_writes(name, tmp_path):
    torch.save(varied_objects()[name], tmp_path / "src.pt")
    with open_checkpoint(tmp_path / "src.pt", select=".") as checkpoint:
        buffer = io.BytesIO()
        torch.save(checkpoint.pickled_root(), buffer)
        ours, _ = torch_pickle(checkpoint.inert_root())
    assert ours == zipfile.ZipFile(buffer).read("archive/data.pkl")


def write_plan(src: Path, dst: Path, **options) -> dict[str, int]:
    with open_checkpoint(src, select=".") as checkpoint:
        plan = plan_torch_zip(checkpoint.inert_root(), src, checkpoint.storage_range)
        with AtomicFile(dst) as handle:
            starts = write_torch_zip(handle, plan, **options)
            handle.commit()
    return starts


def test_zip64_records_load_in_torch_and_zipfile(tmp_path):
    objects = varied_objects()["views"]
    torch.save(objects, tmp_path / "src.pt")
    write_plan(tmp_path / "src.pt", tmp_path / "out.pt", zip64_from=0)  # every size and offset as ZIP64
    assert zipfile.ZipFile(tmp_path / "out.pt").testzip() is None
    assert_bitwise_equal(torch.load(tmp_path / "out.pt", weights_only=True), objects)


def test_records_start_at_the_sources_storage_alignment(tmp_path):
    torch.save(small_state(), tmp_path / "src.pt")
    starts = write_plan(tmp_path / "src.pt", tmp_path / "out.pt")
    assert [offset % 64 for offset in starts.values()] == [0] * len(starts)


def test_a_source_storage_with_a_wrong_crc_is_written_with_a_right_one(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "src.pt")
    with zipfile.ZipFile(tmp_path / "src.pt") as archive:  # torch never checks a storage's CRC
        info = archive.getinfo("src/data/1")
    with open(tmp_path / "src.pt", "r+b") as handle:
        handle.seek(info.header_offset + 14)
        handle.write(b"\0\0\0\0")
    remap_checkpoint(tmp_path / "src.pt", tmp_path / "out.pt", rules=None)
    assert zipfile.ZipFile(tmp_path / "out.pt").testzip() is None


def test_what_only_torch_writes_back_goes_through_torch(tmp_path):
    torch.save({"w": torch.ones(2), "device": torch.device("cpu")}, tmp_path / "src.pt")
    with open_checkpoint(tmp_path / "src.pt") as checkpoint:
        assert plan_torch_zip(checkpoint.inert_root(), tmp_path / "src.pt", checkpoint.storage_range) is None
    remap_checkpoint(tmp_path / "src.pt", tmp_path / "out.pt", rules=rules_from_cli(add_prefix=("m.",)))
    assert torch.load(tmp_path / "out.pt", weights_only=True)["device"] == torch.device("cpu")


def test_a_copy_that_differs_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    torch.save(small_state(), tmp_path / "src.pt")
    real = torch_zip.write_range

    def corrupt(out, source):
        written = real(out, source)
        os.pwrite(out.fd, b"\xff", os.lseek(out.fd, 0, os.SEEK_CUR) - 1)
        return written

    monkeypatch.setattr(torch_zip, "write_range", corrupt)
    with pytest.raises(IntegrityError, match="differ"):
        remap_checkpoint(tmp_path / "src.pt", tmp_path / "out.pt", rules=None)
    assert os.listdir(tmp_path) == ["src.pt"]

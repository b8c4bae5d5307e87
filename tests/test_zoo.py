"""Real training checkpoints (tests/zoo.py) read through the public API: the model's weights are
chosen, read and converted bit for bit, and everything else in the file is listed.

Names these tests assume for information the reports do not carry yet (align them here when the
reader gains them):

    report.wrapper                    dotted path of the chosen weights inside the file; None when
                                      they are the file's root object (a bare state dict, a whole
                                      pickled module) or a folder's safetensors file
    report.extras                     {dotted name: type name}; holds every top-level entry beside
                                      the weights (optimizer state, epoch, args, ...)
    report.to_dict()["selection"]     {"path": <as report.wrapper>,
                                       "file": <name of the file chosen in a folder; None for a file>,
                                       "alternatives": [{"path": <dotted path>, ...}, ...]}
    report.to_dict()["not_executed"]  [dotted name of each global read without being imported or run]
    report.to_dict()["other_files"]   [name of each file in a folder beside the chosen one]

The first group of tests checks the zoo itself (what each framework wrote is what its case says),
so that a failure in the second group is the reader's, not the zoo's.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo import BUILDERS, ZooCase, build_zoo

from ckpt_tools import convert_to_safetensors, inspect_checkpoint, open_checkpoint, restore_aliases
from ckpt_tools.errors import CkptError
from ckpt_tools.meta import TensorMeta

FOLDERS = ["hf-trainer", "accelerate"]
FILES = [name for name in BUILDERS if name not in FOLDERS]
WITHOUT_EXTRAS = {"torch-save-module", *FOLDERS}
WITH_EXTRAS = [name for name in FILES if name not in WITHOUT_EXTRAS]
WEIGHTS_ONLY_SAFE = ["deepspeed", "nanogpt", "openflamingo", *FOLDERS]  # no global outside torch's allow-list
PICKLED_MODULES = {"torch-save-module": "zoo_whole_net", "yolo": "zoo_yolo_net"}


@pytest.fixture(scope="session")
def zoo_cases(tmp_path_factory) -> dict[str, ZooCase]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def case(request, zoo_cases) -> ZooCase:
    return zoo_cases[request.param]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bitwise (signed zeros, NaN payloads) and dtype-exact."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert (got[key].dtype, tuple(got[key].shape)) == (tensor.dtype, tuple(tensor.shape)), key
        assert torch.equal(bits(got[key]), bits(tensor)), key


def report_dict(case: ZooCase) -> dict:
    return inspect_checkpoint(case.path).to_dict()


# -- the zoo is what it says --

def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _load_own_file(case: ZooCase, monkeypatch):
    """torch.load(weights_only=True) of a file this session wrote, allowing exactly the globals the
    case names (plus what they need), to check the zoo's own expectations against it."""
    import numpy as np

    monkeypatch.syspath_prepend(str(case.path.parent))
    allowed = [_resolve(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(case.path))]
    # a numpy array's dtype is rebuilt by a call whose result's class no global names
    allowed.append(type(np.dtype(np.float64)))
    with torch.serialization.safe_globals(allowed):
        return torch.load(case.path, weights_only=True)


def _at(obj, dotted: str | None):
    for part in dotted.split(".") if dotted else []:
        obj = obj[part]
    return obj


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_zoo_case_kind_matches_its_path(case):
    assert case.is_folder == (case.name in FOLDERS)


@pytest.mark.parametrize("case", FILES, indirect=True)
def test_zoo_not_executed_globals_are_in_the_file(case):
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(case.path)))
    assert set(case.not_executed) <= found


@pytest.mark.parametrize("case", FILES, indirect=True)
def test_zoo_file_names_globals_outside_the_weights_only_allow_list_unless_listed_safe(case):
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(case.path))
    assert bool(found) == (case.name not in WEIGHTS_ONLY_SAFE)


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_zoo_expects_unexecuted_globals_exactly_in_unsafe_files(case):
    assert bool(case.not_executed) == (case.name not in WEIGHTS_ONLY_SAFE)


@pytest.mark.parametrize("case", FILES, indirect=True)
def test_zoo_file_holds_the_case_state(case, monkeypatch):
    weights = _at(_load_own_file(case, monkeypatch), case.selected)
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    assert_bitwise_equal(dict(state), case.state)


@pytest.mark.parametrize("case", FILES, indirect=True)
def test_zoo_file_holds_the_case_extras_and_alternatives(case, monkeypatch):
    root = _load_own_file(case, monkeypatch)
    top = set(root) if isinstance(root, dict) else set()
    assert set(case.extras) | set(case.alternatives) <= top


@pytest.mark.parametrize("case", FILES, indirect=True)
def test_zoo_extras_exist_exactly_for_files_with_entries_beside_the_weights(case):
    assert bool(case.extras) == (case.name not in WITHOUT_EXTRAS)


@pytest.mark.parametrize("case", FOLDERS, indirect=True)
def test_zoo_folder_holds_the_model_file_and_the_others(case):
    assert sorted(os.listdir(case.path)) == sorted([case.selected, *case.other_files])


@pytest.mark.parametrize("case", FOLDERS, indirect=True)
def test_zoo_folder_model_file_holds_the_case_state(case):
    with safe_open(str(case.path / case.selected), framework="pt") as f:
        assert_bitwise_equal({k: f.get_tensor(k) for k in f.keys()}, case.state)


# -- the reader: selection --

@pytest.mark.parametrize("case", FILES, indirect=True)
def test_inspect_chooses_the_model_weights(case):
    assert inspect_checkpoint(case.path).wrapper == case.selected


@pytest.mark.parametrize("case", FOLDERS, indirect=True)
def test_inspect_chooses_the_folder_model_file(case):
    assert Path(report_dict(case)["selection"]["file"]).name == case.selected


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_inspect_lists_exactly_the_model_keys(case):
    assert sorted(inspect_checkpoint(case.path).tensors) == sorted(case.state)


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_inspect_gives_each_tensor_shape_and_dtype(case):
    want = {key: TensorMeta.from_tensor(key, tensor) for key, tensor in case.state.items()}
    assert inspect_checkpoint(case.path).tensors == want


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_alternatives_are_listed(case):
    alternatives = report_dict(case)["selection"]["alternatives"]
    assert [a["path"] for a in alternatives] == list(case.alternatives)


# -- the reader: what else is in the file --

@pytest.mark.parametrize("case", WITH_EXTRAS, indirect=True)
def test_extras_are_listed(case):
    extras = inspect_checkpoint(case.path).extras
    assert [name for name in case.extras if name not in extras] == []


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_globals_not_executed_are_named(case):
    named = report_dict(case)["not_executed"]
    assert [name for name in case.not_executed if name not in named] == []


@pytest.mark.parametrize("case", WEIGHTS_ONLY_SAFE, indirect=True)
def test_weights_only_safe_files_name_no_global(case):
    assert report_dict(case)["not_executed"] == []


@pytest.mark.parametrize("case", FOLDERS, indirect=True)
def test_folder_lists_the_other_files(case):
    assert sorted(report_dict(case)["other_files"]) == sorted(case.other_files)


@pytest.mark.parametrize("case", list(PICKLED_MODULES), indirect=True)
def test_no_module_named_in_the_pickle_is_imported(case, monkeypatch, tmp_path):
    """The module that defines the pickled classes sits on sys.path and leaves a mark when
    imported; reading and converting (or refusing) must not import it."""
    module = PICKLED_MODULES[case.name]
    monkeypatch.syspath_prepend(str(case.path.parent))
    monkeypatch.delitem(sys.modules, module, raising=False)
    log = case.path.parent / "imported.log"
    marks = log.read_text()
    for action in (lambda: inspect_checkpoint(case.path),
                   lambda: convert_to_safetensors(case.path, tmp_path / "out.safetensors", force=True)):
        with contextlib.suppress(CkptError):  # refusing is not importing; the import is what is checked
            action()
    assert (module in sys.modules, log.read_text()) == (False, marks)


# -- the reader: bytes --

@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_open_checkpoint_reads_the_weights_bitwise(case):
    with open_checkpoint(case.path) as ckpt:
        got = {key: ckpt.tensor(key) for key in ckpt.keys()}
    assert_bitwise_equal(got, case.state)


@pytest.mark.parametrize("case", list(BUILDERS), indirect=True)
def test_convert_writes_the_weights_bitwise(case, tmp_path):
    out = tmp_path / "model.safetensors"
    convert_to_safetensors(case.path, out)
    with safe_open(str(out), framework="pt") as f:
        written, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert_bitwise_equal(restore_aliases(written, metadata), case.state)

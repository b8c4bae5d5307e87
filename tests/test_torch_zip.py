"""The torch-free listing of zip-format torch files agrees with what was saved."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from ckpt_tools import open_checkpoint
from ckpt_tools.meta import metas_from_state_dict


def varied_state() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "param": torch.nn.Parameter(torch.ones(3, 2)),
        "bf16": torch.arange(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "rows": base[1:3],          # a slice at an offset: contiguous
        "cols": base[:, 2:4],       # a slice that is not contiguous
        "transposed": base.t(),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
    }
    state["tied"] = state["bf16"]
    return state


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "train.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in varied_state().items()},
                "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(2)}}}, "epoch": 4}, path)
    return path


def test_listing_matches_what_was_saved(saved):
    expected = {"module." + k: v for k, v in varied_state().items()}
    with open_checkpoint(saved) as ckpt:
        assert ckpt.metas() == metas_from_state_dict(expected)
        assert ckpt.aliases == [["module.bf16", "module.tied"]]
        assert (ckpt.wrapper, ckpt.extras) == ("model_state_dict", {"optimizer_state_dict": "dict", "epoch": "int"})
        for key, value in expected.items():
            assert torch.equal(ckpt.tensor(key), value.detach())


def test_byte_spans_point_at_the_tensor_bytes(saved):
    with open_checkpoint(saved) as ckpt:
        data = saved.read_bytes()
        for key in ("module.param", "module.rows", "module.bf16", "module.scalar"):
            path, offset, nbytes = ckpt.byte_span(key)
            tensor = ckpt.tensor(key).contiguous()
            assert data[offset:offset + nbytes] == tensor.view(-1).view(torch.uint8).numpy().tobytes()
        assert ckpt.byte_span("module.cols") is None and ckpt.byte_span("module.transposed") is None


def test_listing_and_plain_conversion_never_import_torch(saved, tmp_path):
    out = tmp_path / "out.safetensors"
    code = ("import sys; from ckpt_tools.inspect import inspect_checkpoint; "
            "from ckpt_tools.convert import convert_to_safetensors; from ckpt_tools.remap import preset_rules; "
            f"r = inspect_checkpoint({str(saved)!r}); "
            f"convert_to_safetensors({str(saved)!r}, {str(out)!r}, rules=preset_rules('ddp'), verify=False, "
            "extras_path=None); print(len(r.tensors), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # non-contiguous slices need torch to be laid out: only they import it
    assert result.returncode == 0, result.stderr
    count, imported = result.stdout.split()
    assert count == "9"
    with safe_open(str(out), framework="pt") as f:
        for key, value in varied_state().items():
            if key != "tied":
                assert torch.equal(f.get_tensor(key), value.detach().contiguous())
    assert imported == "True"  # the two non-contiguous tensors


def test_contiguous_checkpoint_converts_without_torch(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"a": torch.arange(6.0), "b": torch.ones(2, 2, dtype=torch.float16)}, path)
    out = tmp_path / "plain.safetensors"
    code = ("import sys; from ckpt_tools.convert import convert_to_safetensors; "
            f"convert_to_safetensors({str(path)!r}, {str(out)!r}, verify=False); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    with safe_open(str(out), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.arange(6.0))


def test_dtype_values_are_kept_as_their_names(tmp_path):
    path = tmp_path / "dtype.pt"
    torch.save({"w": torch.zeros(2), "dtype": torch.float16}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.extras == {"dtype": "dtype"}
        assert ckpt.extra_values() == {"dtype": "torch.float16"}

"""Tensor statistics, value diffs and value checks on real files with planted values.

Expected figures are computed here with numpy in float64 on the same values; the low-precision
tensors (BF16, F8) hold values chosen to be exact in their dtype, so numpy needs no BF16/F8 support.
"""

from __future__ import annotations

import io
import json
import math
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckpt_tools import open_checkpoint
from ckpt_tools.errors import UsageError
from ckpt_tools.render import render
from ckpt_tools.stats import (
    FINITE,
    ValueCheck,
    checkpoint_stats,
    count_nonfinite,
    default_checks,
    run_checks,
    tensor_diff,
    tensor_stats,
    value_diff,
)

CHUNK = 128
BIG = "encoder.layers.0.weight"     # 1200 values: 10 chunks of 128
CHANGED = "encoder.layers.1.weight"  # B = A + 1e-3
# Exact in F8_E4M3 and F8_E5M2 (at most 2 mantissa bits) and in BF16.
F8_VALUES = np.array([0, 0.5, 1, 1.25, 1.5, 1.75, 2, 3, 3.5, 6, 448, -0.5, -1.25, -3, -448], dtype=np.float64)


def _bf16_exact(values: np.ndarray) -> np.ndarray:
    """float32 values with the low 16 bits cleared: exactly representable in bfloat16."""
    bits = values.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def _reference() -> dict[str, np.ndarray]:
    """The planted values, as numpy arrays in the dtype each tensor is stored in."""
    rng = np.random.default_rng(19)
    nan = rng.normal(size=20).astype(np.float32)
    nan[3] = np.nan
    inf = rng.normal(size=20).astype(np.float32)
    inf[[2, 9]] = [np.inf, -np.inf]
    ids = rng.integers(-1000, 1000, size=(1, 50), dtype=np.int64)
    ids[0, 7] = 2**60 + 1  # not representable in float64: min/max must stay exact
    return {
        BIG: (rng.normal(size=(40, 30)) * 0.02 + 0.1).astype(np.float32),
        CHANGED: (rng.normal(size=(40, 30)) * 0.02 - 0.3).astype(np.float32),
        "encoder.norm.bias": nan,
        "encoder.norm.weight": inf,
        "encoder.extra": np.ones(3, dtype=np.float32),
        "decoder.blocks.0.attn_gate": np.zeros(1, dtype=np.float32),
        "decoder.blocks.0.ff_gate": np.zeros(1, dtype=np.float32),
        "decoder.proj.weight": _bf16_exact(rng.normal(size=(16, 8))),
        "decoder.q8.weight": rng.choice(F8_VALUES, size=64),
        "decoder.q5.weight": rng.choice(F8_VALUES, size=64),
        "decoder.position_ids": ids,
        "decoder.mask": rng.random(33) < 0.3,
        "decoder.freqs": (rng.normal(size=6) + 1j * rng.normal(size=6)).astype(np.complex64),
        "decoder.resized": np.arange(4, dtype=np.float32),
        "all_nan": np.full(4, np.nan, dtype=np.float32),
    }


TORCH_DTYPES = {"decoder.proj.weight": torch.bfloat16, "decoder.q8.weight": torch.float8_e4m3fn,
                "decoder.q5.weight": torch.float8_e5m2}


def _tensors(reference: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in reference.items():
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        out[name] = tensor.to(TORCH_DTYPES[name]) if name in TORCH_DTYPES else tensor
    return out


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return _reference()


@pytest.fixture
def a_file(tmp_path, ref):
    path = tmp_path / "a.safetensors"
    save_file(_tensors(ref), str(path))
    return path


@pytest.fixture
def b_file(tmp_path, ref):
    """A with one tensor changed by 1e-3, one stored in another dtype, one renamed, one resized."""
    tensors = _tensors(ref)
    tensors[CHANGED] = tensors[CHANGED] + np.float32(1e-3)
    tensors["decoder.proj.weight"] = tensors["decoder.proj.weight"].float()
    tensors["decoder.only_b"] = tensors.pop("encoder.extra")
    tensors["decoder.resized"] = torch.arange(5, dtype=torch.float32)
    path = tmp_path / "b.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture
def stats(a_file):
    """Safetensors lists its keys sorted, so every report below is in sorted order."""
    with open_checkpoint(a_file) as ckpt:
        return checkpoint_stats(ckpt, chunk_elems=CHUNK)


def _finite(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64).ravel()
    return values[np.isfinite(values)]


# --- statistics ----------------------------------------------------------------------------------------


def test_a_tensor_bigger_than_the_chunk_is_read_in_several_chunks(stats):
    assert stats.tensors[BIG].chunks == 10


def test_chunked_figures_match_numpy(stats, ref):
    got, want = stats.tensors[BIG].acc, ref[BIG].astype(np.float64)
    assert (got.minimum, got.maximum) == (want.min(), want.max())
    assert got.mean == pytest.approx(want.mean(), rel=1e-12)
    assert got.std == pytest.approx(want.std(), rel=1e-12)
    assert got.abs_sum / got.finite == pytest.approx(np.abs(want).mean(), rel=1e-12)


def test_the_chunk_size_does_not_change_the_figures(a_file, stats):
    with open_checkpoint(a_file) as ckpt:
        whole = checkpoint_stats(ckpt, keys=[BIG]).tensors[BIG]
    assert whole.chunks == 1
    assert whole.acc.std == pytest.approx(stats.tensors[BIG].acc.std, rel=1e-13)


def test_a_nan_is_counted_and_left_out_of_the_figures(stats, ref):
    got = stats.tensors["encoder.norm.bias"].acc
    assert (got.nan, got.inf) == (1, 0)
    assert got.mean == pytest.approx(_finite(ref["encoder.norm.bias"]).mean(), rel=1e-12)


def test_infs_are_counted_and_min_max_are_finite(stats, ref):
    got, want = stats.tensors["encoder.norm.weight"].acc, _finite(ref["encoder.norm.weight"])
    assert (got.nan, got.inf) == (0, 2)
    assert (got.minimum, got.maximum) == (want.min(), want.max())


def test_nonfinite_lists_the_tensors_with_nan_or_inf(stats):
    assert stats.to_dict()["nonfinite"] == ["all_nan", "encoder.norm.bias", "encoder.norm.weight"]


def test_a_tensor_without_finite_values_reports_null_not_nan(stats):
    figures = stats.to_dict()["tensors"]["all_nan"]
    assert [figures[k] for k in ("min", "max", "mean", "std", "abs_mean")] == [None] * 5


def test_the_json_holds_no_nan_or_infinity(stats):
    json.dumps(stats.to_dict(), allow_nan=False)  # raises on NaN or Infinity


def test_all_zero_lists_the_zero_tensors(stats):
    assert stats.to_dict()["all_zero"] == ["decoder.blocks.0.attn_gate", "decoder.blocks.0.ff_gate"]


@pytest.mark.parametrize("name, dtype", [("decoder.proj.weight", "BF16"), ("decoder.q8.weight", "F8_E4M3"),
                                         ("decoder.q5.weight", "F8_E5M2")])
def test_low_precision_floats_match_numpy(stats, ref, name, dtype):
    got, want = stats.tensors[name], ref[name].astype(np.float64)
    assert got.dtype == dtype
    assert (got.acc.minimum, got.acc.maximum) == (want.min(), want.max())
    assert got.acc.mean == pytest.approx(want.mean(), rel=1e-12)
    assert got.acc.std == pytest.approx(want.std(), rel=1e-12)
    assert got.acc.zero_fraction == np.count_nonzero(want == 0) / want.size


def test_the_f8_values_survived_the_file(a_file, ref):
    with open_checkpoint(a_file) as ckpt:
        stored = ckpt.tensor("decoder.q5.weight").to(torch.float64).numpy()
    assert np.array_equal(stored, ref["decoder.q5.weight"])


def test_integer_min_max_are_exact(stats, ref):
    got = stats.tensors["decoder.position_ids"].acc
    assert (got.minimum, got.maximum) == (int(ref["decoder.position_ids"].min()), 2**60 + 1)


def test_bool_mean_is_the_fraction_true(stats, ref):
    mask = ref["decoder.mask"]
    assert stats.tensors["decoder.mask"].acc.mean == pytest.approx(mask.sum() / mask.size, rel=1e-15)


def test_complex_tensors_are_described_by_magnitude(stats, ref):
    got = stats.tensors["decoder.freqs"]
    assert got.basis == "magnitude"
    assert got.acc.mean == pytest.approx(np.abs(ref["decoder.freqs"].astype(np.complex128)).mean(), rel=1e-6)


def test_a_module_combines_its_tensors_exactly(stats, ref):
    module = next(m for m in stats.modules() if m.name == "encoder.layers.{0,1}")
    both = np.concatenate([ref[BIG].ravel(), ref[CHANGED].ravel()]).astype(np.float64)
    assert module.acc.mean == pytest.approx(both.mean(), rel=1e-12)
    assert module.acc.std == pytest.approx(both.std(), rel=1e-12)


def test_a_strided_tensor_in_a_torch_file_is_read_by_rows(tmp_path, ref):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.from_numpy(ref[BIG]).t()}, path)
    with open_checkpoint(path) as ckpt:
        assert not ckpt.tensor("w").is_contiguous()
        got = checkpoint_stats(ckpt, chunk_elems=CHUNK).tensors["w"]
    want = ref[BIG].T.astype(np.float64)
    assert got.chunks == 10  # 40 rows of 30: 4 rows per chunk
    assert got.acc.std == pytest.approx(want.std(), rel=1e-12)


class Counting:
    """A Checkpoint stand-in that hands out fresh copies and remembers what it handed out."""

    def __init__(self, checkpoint):
        self.inner, self.source, self.aliases = checkpoint, checkpoint.source, checkpoint.aliases
        self.reads: list[str] = []
        self.alive_at_read: list[bool] = []
        self._last = None

    def keys(self):
        return self.inner.keys()

    def meta(self, key):
        return self.inner.meta(key)

    def tensor(self, key):
        self.alive_at_read.append(self._last is not None and self._last() is not None)
        self.reads.append(key)
        tensor = self.inner.tensor(key).clone()
        self._last = weakref.ref(tensor)
        return tensor


def test_one_tensor_in_memory_at_a_time(a_file):
    with open_checkpoint(a_file) as ckpt:
        counting = Counting(ckpt)
        checkpoint_stats(counting, chunk_elems=CHUNK)
    assert not any(counting.alive_at_read)


def test_names_that_share_one_tensor_are_read_once(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    torch.save({"first": shared, "second": shared}, tmp_path / "tied.pt")
    with open_checkpoint(tmp_path / "tied.pt") as ckpt:
        counting = Counting(ckpt)
        report = checkpoint_stats(counting)
    assert counting.reads == ["first"]
    assert report.tensors["second"].acc.mean == 2.5


def test_a_bad_chunk_size_is_a_usage_error():
    with pytest.raises(UsageError, match="chunk_elems"):
        tensor_diff("x", torch.zeros(1), torch.zeros(1), chunk_elems=0)


def test_an_unknown_key_is_a_usage_error(a_file):
    with open_checkpoint(a_file) as ckpt, pytest.raises(UsageError, match="nope"):
        checkpoint_stats(ckpt, keys=["nope"])


def test_the_renderings_show_the_modules(stats):
    table, markdown = io.StringIO(), io.StringIO()
    render(stats, "table", table)
    render(stats, "markdown", markdown)
    assert "encoder.layers.{0,1}" in table.getvalue()
    assert "| encoder.layers.{0,1} | 2 |" in markdown.getvalue()


# --- value diffs -------------------------------------------------------------------------------------


@pytest.fixture
def diff(a_file, b_file):
    with open_checkpoint(a_file) as a, open_checkpoint(b_file) as b:
        return value_diff(b, a, chunk_elems=CHUNK)  # B (the new one) against A


def test_the_changed_tensor_matches_numpy(diff, ref):
    got = diff.tensors[CHANGED]
    old = ref[CHANGED].astype(np.float64).ravel()
    new = (ref[CHANGED] + np.float32(1e-3)).astype(np.float64).ravel()
    assert got.identical is False
    assert got.acc.figures()["max_abs_diff"] == np.abs(new - old).max()
    assert got.acc.relative_change == pytest.approx(np.linalg.norm(new - old) / np.linalg.norm(old), rel=1e-9)
    assert got.acc.cosine == pytest.approx(new @ old / (np.linalg.norm(new) * np.linalg.norm(old)), rel=1e-12)


def test_the_diff_is_chunked_too(diff):
    assert diff.tensors[CHANGED].acc.chunks == 10


def test_an_unchanged_tensor_is_bitwise_identical(diff):
    got = diff.tensors[BIG]
    assert (got.identical, got.acc.relative_change, got.acc.cosine) == (True, 0.0, 1.0)


def test_equal_nans_count_as_identical(diff):
    assert diff.tensors["encoder.norm.bias"].identical is True


def test_another_dtype_is_compared_after_the_upcast(diff):
    got = diff.tensors["decoder.proj.weight"]
    assert (got.upcast, got.identical, got.acc.relative_change) == (True, False, 0.0)


def test_names_and_shapes_that_do_not_match_are_listed(diff):
    assert (diff.only_in_a, diff.only_in_b) == (["decoder.only_b"], ["encoder.extra"])
    assert diff.not_compared == [{"name": "decoder.resized", "reason": "shape", "a": "F32[5]", "b": "F32[4]"}]


def test_a_module_says_how_much_of_it_changed(diff):
    module = next(m for m in diff.modules() if m.name == "encoder.layers.{0,1}")
    assert module.line().startswith("encoder.layers.{0,1}: 50% identical, mean relative change ")


def test_pairs_compare_renamed_tensors_under_the_name_in_b(a_file, b_file):
    with open_checkpoint(a_file) as a, open_checkpoint(b_file) as b:
        report = value_diff(b, a, pairs=[("decoder.only_b", "encoder.extra")])
    assert (list(report.tensors), report.tensors["encoder.extra"].identical) == (["encoder.extra"], True)


def test_a_change_above_max_change_is_a_problem(a_file, b_file):
    with open_checkpoint(a_file) as a, open_checkpoint(b_file) as b:
        report = value_diff(b, a, max_change=1e-4)
    assert [(p["kind"], p["key"]) for p in report.problems] == [("value_change", CHANGED)]


def test_no_problem_below_max_change(a_file, b_file):
    with open_checkpoint(a_file) as a, open_checkpoint(b_file) as b:
        assert value_diff(b, a, max_change=0.5).problems == []


def test_the_value_diff_markdown_shows_the_modules(diff):
    assert "| encoder.layers.{0,1} | 1/2 |" in diff.to_markdown()


def test_the_value_diff_json_holds_no_nan_or_infinity(diff):
    json.dumps(diff.to_dict(), allow_nan=False)


def test_two_zero_tensors_have_no_change_and_cosine_one():
    got = tensor_diff("z", torch.zeros(3), torch.zeros(3)).acc
    assert (got.relative_change, got.cosine) == (0.0, 1.0)


def test_a_change_from_zero_is_infinite_and_null_in_json():
    got = tensor_diff("z", torch.ones(3), torch.zeros(3))
    assert math.isinf(got.acc.relative_change)
    assert (got.to_dict()["relative_change"], got.to_dict()["cosine"]) == (None, 0.0)


def test_nan_payloads_are_compared_bitwise():
    def nan(payload: int) -> torch.Tensor:
        return torch.tensor([0x7FC00000 | payload, 0x3F800000], dtype=torch.int32).view(torch.float32)

    assert tensor_diff("n", nan(1), nan(1)).identical is True
    assert tensor_diff("n", nan(1), nan(2)).identical is False


def test_positions_with_nan_or_inf_are_left_out_of_a_diff():
    got = tensor_diff("n", torch.tensor([float("nan"), 1.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 4.0, float("inf")]))
    assert (got.acc.nonfinite, got.acc.compared) == (2, 2)
    assert (got.acc.figures()["max_abs_diff"], got.acc.figures()["mean_abs_diff"]) == (2.0, 1.0)


def test_a_value_turned_nan_is_an_infinite_change():
    got = tensor_diff("w", torch.full((4,), float("nan")), torch.ones(4))
    assert math.isinf(got.acc.relative_change)


def test_a_value_turned_nan_is_counted_as_changed():
    got = tensor_diff("w", torch.tensor([float("nan"), float("inf"), float("nan"), 1.0]),
                      torch.tensor([float("nan"), float("-inf"), 3.0, 1.0]))
    assert got.acc.nonfinite_changed == 2


def test_the_same_nan_on_both_sides_is_no_change():
    got = tensor_diff("w", torch.tensor([float("nan"), 2.0]), torch.tensor([float("nan"), 2.0]))
    assert got.acc.relative_change == 0.0


def test_a_value_turned_nan_fails_max_change(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.full((3,), float("nan"))}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(3)}, str(tmp_path / "b.safetensors"))
    with open_checkpoint(tmp_path / "a.safetensors") as a, open_checkpoint(tmp_path / "b.safetensors") as b:
        problem = value_diff(a, b, max_change=0.5).problems[0]
    assert problem["detail"].startswith("3 values turned NaN or Inf")

def _with_bytes(dtype: torch.dtype, values: list[float], raw: dict[int, int]) -> torch.Tensor:
    """``values`` in ``dtype`` with the bytes at some positions replaced (a NaN bit pattern, say)."""
    tensor = torch.tensor(values).to(dtype)
    view = tensor.view(torch.uint8)
    for index, byte in raw.items():
        view[index] = byte
    return tensor


NONFINITE_CASES = [
    (_with_bytes(torch.float8_e4m3fn, [1.0, 2.0, 3.0], {1: 0x7F}), (1, 0)),       # E4M3 has NaN, no Inf
    (_with_bytes(torch.float8_e5m2, [1.0, 2.0, 3.0], {0: 0x7C, 2: 0x7F}), (1, 1)),  # +Inf, NaN
    (torch.tensor([1.0, float("nan"), float("-inf"), 0.0]).to(torch.bfloat16), (1, 1)),
    (torch.tensor([1e308, 1e308, 5.0], dtype=torch.float64), (0, 0)),  # the sum overflows; no value is Inf
    (torch.tensor([1, 2], dtype=torch.int64), (0, 0)),
]


@pytest.mark.parametrize("tensor, expected", NONFINITE_CASES)
def test_count_nonfinite(tensor, expected):
    assert count_nonfinite(tensor, chunk_elems=2) == expected


@pytest.mark.parametrize("tensor, expected", NONFINITE_CASES)
def test_the_statistics_count_the_same_nan_and_inf(tensor, expected):
    got = tensor_stats("t", tensor, chunk_elems=2).acc
    assert (got.nan, got.inf) == expected


# --- value checks ------------------------------------------------------------------------------------


GATES = ValueCheck("gates_trained", ("*attn_gate", "*ff_gate"), "not_all_zero")


def test_the_finite_check_names_the_tensors_with_nan_or_inf(a_file):
    with open_checkpoint(a_file) as ckpt:
        problems = run_checks(ckpt, [FINITE])
    assert [p["key"] for p in problems] == ["all_nan", "encoder.norm.bias", "encoder.norm.weight"]


def test_all_zero_gates_fail_as_one_group(stats):
    problems = run_checks(stats, [GATES])
    assert [p["key"] for p in problems] == ["decoder.blocks.0.attn_gate, decoder.blocks.0.ff_gate"]


def test_one_trained_gate_passes_the_group():
    assert run_checks({"x.attn_gate": torch.zeros(1), "x.ff_gate": torch.tensor([0.1])}, [GATES]) == []


def test_a_check_that_matches_nothing_passes():
    assert run_checks({"w": torch.zeros(2)}, [GATES]) == []


def test_only_the_matched_tensors_are_read(a_file):
    with open_checkpoint(a_file) as ckpt:
        counting = Counting(ckpt)
        run_checks(counting, [GATES])
    assert counting.reads == ["decoder.blocks.0.attn_gate", "decoder.blocks.0.ff_gate"]


def test_not_constant_names_a_constant_tensor():
    check = ValueCheck("varies", ("*",), "not_constant")
    assert [p["key"] for p in run_checks({"c": torch.full((3,), 0.5), "v": torch.arange(3.0)}, [check])] == ["c"]


def test_meta_tensors_are_skipped():
    assert run_checks({"w": torch.empty(3, device="meta")}, [FINITE]) == []


def test_a_check_problem_carries_the_check_name_and_a_fix():
    problem, = run_checks({"w": torch.tensor([float("nan")])}, [FINITE])
    assert problem["kind"] == "value_check"
    assert problem["detail"] == "finite: 1 NaN and 0 Inf among 1 values"
    assert "--allow-nonfinite" in problem["fix"]


def test_an_unknown_check_kind_is_a_usage_error():
    with pytest.raises(UsageError, match="sometimes"):
        run_checks({}, [ValueCheck("x", ("*",), "sometimes")])


def test_allow_nonfinite_drops_the_default_check():
    assert (default_checks(), default_checks(allow_nonfinite=True)) == ((FINITE,), ())


# -- through the CLI ----------------------------------------------------------------------------


def _pair(tmp_path):
    import torch
    from safetensors.torch import save_file

    base = {"perceiver.w": torch.arange(64.0).reshape(8, 8), "vision.w": torch.ones(4, 4)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["perceiver.w"] += 1e-3
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "tuned.safetensors", tmp_path / "base.safetensors"


def test_diff_values_rolls_changes_up_per_module_and_keeps_the_key_verdict(tmp_path, run_cli):
    tuned, base = _pair(tmp_path)
    result = run_cli("diff", tuned, "--against", base, "--values", "--format", "json")
    assert result.exit_code == 0
    modules = {m["name"]: m["identical"] for m in json.loads(result.stdout)["value_diff"]["modules"]}
    assert modules == {"perceiver": 0, "vision": 1}


def test_max_change_turns_a_large_change_into_a_problem(tmp_path, run_cli):
    tuned, base = _pair(tmp_path)
    result = run_cli("diff", tuned, "--against", base, "--max-change", "1e-6", "--format", "json")
    assert result.exit_code == 1
    assert [(p["kind"], p["key"]) for p in json.loads(result.stdout)["problems"]] == [("value_change", "perceiver.w")]


def test_values_need_another_checkpoint(tmp_path, run_cli):
    tuned, _ = _pair(tmp_path)
    result = run_cli("diff", tuned, "--model", "openflamingo-tiny", "--values")
    assert result.exit_code == 2
    assert "values can only be compared with another checkpoint" in result.stderr


def test_inspect_stats_in_json_names_the_all_zero_tensors(tmp_path, run_cli):
    import torch
    from safetensors.torch import save_file

    save_file({"gate": torch.zeros(3), "w": torch.ones(2)}, str(tmp_path / "g.safetensors"))
    data = json.loads(run_cli("inspect", tmp_path / "g.safetensors", "--stats", "--format", "json").stdout)
    assert data["stats"]["all_zero"] == ["gate"]

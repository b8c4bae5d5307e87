"""torch.distributed.checkpoint (DCP) folders as a SOURCE, conversion both ways, and loading into
models sharded across ranks.

The folders are written by torch itself from an FSDP2 model on 2 and 3 CPU ranks (gloo) by
``dcp_ranks.py`` under ``torch.distributed.run``, once per module; that run also loads them back
every way on every rank and leaves what each rank found in ``result-<rank>.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _torchrun(work: Path, ranks: int) -> Path:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           str(HERE / "dcp_ranks.py"), str(work)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return _torchrun(tmp_path_factory.mktemp("two-ranks"), 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    return _torchrun(tmp_path_factory.mktemp("three-ranks"), 3)


def _results(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob("result-*.json"))]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _bitwise_equal(a: dict, b: dict) -> bool:
    import torch

    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# on the ranks

@pytest.mark.parametrize("world", ["two", "three"])
def test_torchs_own_loader_reads_our_dcp_into_an_fsdp2_model(world, request):
    results = _results(request.getfixturevalue(world))
    assert [r["torch_loads_ours"]["equal"] for r in results] == [True] * len(results)


@pytest.mark.parametrize("world", ["two", "three"])
@pytest.mark.parametrize("scenario", ["fsdp_from_safetensors", "fsdp_from_dcp", "tp_from_safetensors", "tp_from_dcp"])
def test_every_rank_loads_its_blocks_bit_for_bit_and_verifies_them(world, scenario, request):
    results = [r[scenario] for r in _results(request.getfixturevalue(world))]
    assert len(results) == {"two": 2, "three": 3}[world]
    assert [r["equal"] for r in results] == [True] * len(results)
    assert [(r["verdict"], r["verified"]) for r in results] == [("ok", True)] * len(results)
    assert [r["world"] for r in results] == [len(results)] * len(results)


@pytest.mark.parametrize("world", ["two", "three"])
@pytest.mark.parametrize("scenario", ["fsdp_from_safetensors", "tp_from_safetensors"])
def test_from_safetensors_a_rank_reads_exactly_the_bytes_of_its_blocks(world, scenario, request):
    results = [r[scenario] for r in _results(request.getfixturevalue(world))]
    assert [r["bytes_read"] for r in results] == [r["owned"] for r in results]
    share = results[0]["state_bytes"] / len(results)
    assert max(r["bytes_read"] for r in results) < 1.05 * share  # about 1/N (the buffer is whole on each)


@pytest.mark.parametrize("world", ["two", "three"])
@pytest.mark.parametrize("scenario", ["fsdp_from_dcp", "tp_from_dcp"])
def test_from_dcp_a_rank_reads_its_blocks_plus_the_zip_directories_of_the_chunks_it_touches(world, scenario, request):
    results = [r[scenario] for r in _results(request.getfixturevalue(world))]
    assert [r["verify_bytes_read"] for r in results] == [r["owned"] for r in results]  # tensor bytes: its own
    assert all(0 < r["bytes_read"] - r["owned"] < 20_000 for r in results)  # ~1.1 KB per chunk zip touched


@pytest.mark.parametrize("world", ["two", "three"])
def test_fsdp2_from_dcp_reads_about_one_nth_per_rank(world, request):
    results = [r["fsdp_from_dcp"] for r in _results(request.getfixturevalue(world))]
    share = results[0]["state_bytes"] / len(results)
    assert max(r["bytes_read"] for r in results) < 1.2 * share


def test_the_report_says_what_each_rank_read(two):
    result = _results(two)[1]["fsdp_from_safetensors"]
    first, second = result["all_ranks_bytes"]
    assert f"bytes read of {result['state_bytes']:,}: rank 0 {first:,}, rank 1 {second:,}" in result["markdown"]


def test_tensor_parallel_model_covers_shard0_shard1_and_replicate(two):
    placements = _results(two)[0]["tp_from_dcp"]["placements"]
    assert placements == {"embed.weight": ["S(1)"], "body.0.weight": ["S(0)"], "body.0.bias": ["S(0)"],
                          "body.2.weight": ["S(1)"], "body.2.bias": ["R"]}


@pytest.mark.parametrize("world", ["two", "three"])
def test_a_failing_key_report_refuses_the_load_on_every_rank(world, request):
    results = [r["refused"] for r in _results(request.getfixturevalue(world))]
    assert results == [{"refused": True, "verdict": "fail", "shape_mismatch": 1}] * len(results)


# ---------------------------------------------------------------------------------------------
# a DCP folder as a SOURCE

def test_inspect_lists_the_model_state_from_the_metadata(two, run_cli):
    done = run_cli("inspect", two / "dcp-full", "--format", "json")
    report = json.loads(done.stdout)
    original = _tensors(two / "original.safetensors")
    assert done.exit_code == 0
    assert (report["format"], report["wrapper"]) == ("dcp", "model")
    assert {k: (tuple(v["shape"]), v["dtype"]) for k, v in report["tensors"].items()} == \
        {k: (tuple(t.shape), "F32") for k, t in original.items()}
    assert report["extras"] == {"optim": "dict"}
    assert report["chunks"]["embed.weight"] == [
        {"file": "__0_0.distcp", "rank": 0, "offsets": [0, 0], "sizes": [129, 64], "nbytes": 129 * 64 * 4},
        {"file": "__1_0.distcp", "rank": 1, "offsets": [129, 0], "sizes": [128, 64], "nbytes": 128 * 64 * 4}]


def test_the_html_inspect_page_shows_each_tensors_chunks(two, run_cli, tmp_path):
    done = run_cli("inspect", two / "dcp-full", "--format", "html", "--output", tmp_path / "r.html")
    assert done.exit_code == 0, done.stderr
    assert "chunks (rank: range) 0: 0-129, 1: 129-257" in (tmp_path / "r.html").read_text()


def test_inspect_accounts_for_the_optimizer_state_beside_the_model(two, run_cli):
    report = json.loads(run_cli("inspect", two / "dcp-full", "--format", "json").stdout)
    buckets = {b["kind"]: b["tensors"] for b in report["selection"]["accounting"]["buckets"]}
    assert buckets == {"selected": 6, "optimizer": 15}  # AdamW: exp_avg, exp_avg_sq, step per parameter


def test_inspect_of_the_metadata_file_itself_and_of_a_flat_model_folder(two, run_cli):
    by_file = json.loads(run_cli("inspect", two / "dcp-full" / ".metadata", "--format", "json").stdout)
    flat = json.loads(run_cli("inspect", two / "dcp-model", "--format", "json").stdout)
    assert by_file["tensors"] == flat["tensors"]
    assert flat["wrapper"] is None


def test_select_takes_another_entry_of_the_folder(two, run_cli):
    done = run_cli("inspect", two / "dcp-full", "--select", "optim.state.embed.weight", "--format", "json")
    assert sorted(json.loads(done.stdout)["tensors"]) == ["exp_avg", "exp_avg_sq", "step"]


def test_diff_against_the_unsharded_original_is_ok(two, run_cli):
    done = run_cli("diff", two / "dcp-full", "--against", two / "original.safetensors", "--format", "json")
    assert done.exit_code == 0
    assert json.loads(done.stdout)["counts"]["matched"] == 6


def test_validate_loads_a_dcp_folder_into_the_model_its_config_builds(two, run_cli, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(HERE))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"factory": "dcp_ranks:Tiny"}))
    done = run_cli("validate", two / "dcp-full", "--model-config", config, "--load", "--device", "cpu",
                   "--format", "json")
    report = json.loads(done.stdout)
    assert done.exit_code == 0, done.stderr
    assert (report["verdict"], report["load"]["verified"], report["load"]["loaded"]) == ("ok", True, 6)


def test_scan_walks_the_metadata_and_every_pickled_chunk(two, run_cli):
    done = run_cli("scan", two / "dcp-full", "--format", "json")
    report = json.loads(done.stdout)
    assert (done.exit_code, report["verdict"], report["format"]) == (0, "safe", "dcp")
    assert report["pickles"][0] == ".metadata:pickle 0"
    assert "__1_0.distcp:optim.param_groups.0.lr:archive/data.pkl" in report["pickles"]
    assert len(report["pickles"]) == 1 + 36 + 12  # .metadata, the tensor chunks, the objects


# ---------------------------------------------------------------------------------------------
# conversion both ways

def test_convert_dcp_to_safetensors_is_the_original_bit_for_bit(two, run_cli, tmp_path):
    done = run_cli("convert", two / "dcp-full", tmp_path / "model.safetensors", "--format", "json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["verified_tensors"] == 6
    assert _bitwise_equal(_tensors(tmp_path / "model.safetensors"), _tensors(two / "original.safetensors"))


def test_convert_dcp_written_by_three_ranks_to_shards(three, run_cli, tmp_path):
    from ckpt_tools import open_checkpoint

    done = run_cli("convert", three / "dcp-model", tmp_path / "out", "--max-shard-size", "40KB")
    assert done.exit_code == 0, done.stderr
    with open_checkpoint(tmp_path / "out") as written:
        got = {k: written.tensor(k) for k in written.keys()}
    assert _bitwise_equal(got, _tensors(three / "original.safetensors"))


def test_convert_to_dcp_and_back_is_the_original_bit_for_bit(two, run_cli, tmp_path):
    assert run_cli("convert", two / "original.safetensors", tmp_path / "dcp", "--to", "dcp").exit_code == 0
    assert run_cli("convert", tmp_path / "dcp", tmp_path / "back.safetensors").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    assert _bitwise_equal(_tensors(tmp_path / "back.safetensors"), _tensors(two / "original.safetensors"))


def test_convert_to_dcp_casts_and_refuses_to_replace_without_force(two, run_cli, tmp_path):
    from ckpt_tools import open_checkpoint

    assert run_cli("convert", two / "dcp-full", tmp_path / "dcp", "--to", "dcp", "--dtype", "bf16").exit_code == 0
    again = run_cli("convert", two / "dcp-full", tmp_path / "dcp", "--to", "dcp")
    with open_checkpoint(tmp_path / "dcp") as written:
        dtypes = {m.dtype for m in written.metas().values()}
    assert dtypes == {"BF16"}
    assert again.exit_code == 2
    assert "already holds a DCP checkpoint" in again.stderr


def test_convert_to_dcp_takes_no_shard_size(two, run_cli, tmp_path):
    done = run_cli("convert", two / "original.safetensors", tmp_path / "dcp", "--to", "dcp", "--max-shard-size", "1MB")
    assert done.exit_code == 2
    assert not (tmp_path / "dcp").exists()


def test_a_dcp_folder_written_as_safetensors_is_read_too(tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    from ckpt_tools import open_checkpoint

    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int64)}
    writer = FileSystemWriter(tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=writer)
    with open_checkpoint(tmp_path / "st") as read:
        assert _bitwise_equal({k: read.tensor(k) for k in read.keys()}, state)
        assert torch.equal(read.read_slice("w", (1, 1), (2, 2)), state["w"][1:3, 1:3])


def _safetensors_dcp(folder: Path, state: dict) -> Path:
    """``state`` saved by torch's dcp.save in its safetensors serialization (every chunk of a file
    then points at the file's start)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FileSystemWriter(folder, serialization_format=SerializationFormat.SAFETENSORS))
    return folder


def test_tensors_of_one_shape_in_a_safetensors_dcp_keep_their_own_values(tmp_path):
    import torch

    from ckpt_tools import open_checkpoint

    state = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0, 6.0]), "c": torch.zeros(3)}
    with open_checkpoint(_safetensors_dcp(tmp_path / "st", state)) as read:
        assert _bitwise_equal({k: read.tensor(k) for k in read.keys()}, state)


def test_a_safetensors_dcp_file_with_a_damaged_header_is_refused(run_cli, tmp_path):
    import torch

    folder = _safetensors_dcp(tmp_path / "st", {"a": torch.ones(3), "b": torch.zeros(3)})
    with open(folder / "__0_0.distcp", "r+b") as handle:
        handle.write(b"\xff" * 8)
    done = run_cli("convert", folder, tmp_path / "out.safetensors")
    assert (done.exit_code, "no valid safetensors header" in done.stderr) == (2, True)


def test_one_ranks_file_alone_is_refused_with_the_folder_as_the_fix(two, run_cli):
    done = run_cli("inspect", two / "dcp-model" / "__0_0.distcp")
    assert done.stderr.strip().endswith(f"fix: pass the folder: {(two / 'dcp-model').as_posix()}/")


def test_a_folder_of_distcp_files_without_metadata_says_so(two, run_cli, tmp_path):
    folder = _copy(two / "dcp-model", tmp_path / "ckpt")
    (folder / ".metadata").unlink()
    done = run_cli("inspect", folder)
    assert "without its .metadata" in done.stderr


def test_convert_never_writes_into_the_dcp_folder_it_reads(two, run_cli, tmp_path):
    folder = _copy(two / "dcp-model", tmp_path / "ckpt")
    before = sorted(p.name for p in folder.iterdir())
    done = run_cli("convert", folder, folder)
    assert (done.exit_code, sorted(p.name for p in folder.iterdir())) == (2, before)


def test_an_unreadable_extra_stops_a_conversion_before_anything_is_written(run_cli, tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "cfg": _Hostile()}, checkpoint_id=tmp_path / "evil")
    done = run_cli("convert", tmp_path / "evil", tmp_path / "out.safetensors", "--extras", tmp_path / "x.json")
    assert (done.exit_code, sorted(p.name for p in tmp_path.iterdir())) == (2, ["evil"])


# ---------------------------------------------------------------------------------------------
# damaged and hostile folders: one line, exit 2

def test_a_missing_distcp_file_is_one_line(two, run_cli, tmp_path):
    folder = _copy(two / "dcp-model", tmp_path / "ckpt")
    (folder / "__1_0.distcp").unlink()
    done = run_cli("inspect", folder)
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {folder}: the .metadata names __1_0.distcp, which is missing; fix: copy __1_0.distcp into the "
        "folder with the rest of the checkpoint"]


def test_a_truncated_distcp_file_is_one_line(two, run_cli, tmp_path):
    folder = _copy(two / "dcp-model", tmp_path / "ckpt")
    data = folder / "__1_0.distcp"
    os.truncate(data, data.stat().st_size - 100)
    done = run_cli("convert", folder, tmp_path / "out.safetensors")
    assert done.exit_code == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "truncated: __1_0.distcp is" in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_hostile_metadata_is_refused_read_inertly_with_inert_and_scanned_unsafe(two, run_cli, tmp_path):
    folder = _copy(two / "dcp-model", tmp_path / "ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(_Hostile()))
    refused, inert, scanned = run_cli("inspect", folder), run_cli("inspect", folder, "--inert"), run_cli("scan", folder)
    assert (refused.exit_code, len(refused.stderr.strip().splitlines())) == (2, 1)
    assert "posix.system" in refused.stderr and "nothing was executed" in refused.stderr
    assert (inert.exit_code, len(inert.stderr.strip().splitlines())) == (2, 1)
    assert "not a DCP Metadata" in inert.stderr
    assert scanned.exit_code == 1
    assert "UNSAFE, imports or calls posix.system" in scanned.stdout


def test_a_hostile_object_in_a_distcp_file_is_found_by_scan_and_never_run(run_cli, tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "trap": _Hostile()}, checkpoint_id=tmp_path / "ckpt")
    scanned = run_cli("scan", tmp_path / "ckpt", "--format", "json")
    listed = run_cli("inspect", tmp_path / "ckpt", "--format", "json")
    extras = run_cli("convert", tmp_path / "ckpt", tmp_path / "out.safetensors", "--extras", tmp_path / "extras.json")
    assert (scanned.exit_code, json.loads(scanned.stdout)["offenders"]) == (1, ["posix.system"])
    assert re.fullmatch(r"object \([\d,]+-byte pickle in __0_0\.distcp\)", json.loads(listed.stdout)["extras"]["trap"])
    assert extras.exit_code == 2
    assert "posix.system" in extras.stderr
    assert not (tmp_path / "extras.json").exists()


# ---------------------------------------------------------------------------------------------
# the pieces

def test_runs_of_a_column_block_are_one_per_row():
    from ckpt_tools.formats.ranges import runs

    # rows 1-2, columns 2-3 of a 4x5 float32 tensor, into a 2x2 block
    assert list(runs(4, (2, 2), (4, 5), (1, 2), (2, 2), (0, 0))) == [(28, 0, 8), (48, 8, 8)]


def test_runs_of_a_row_block_are_one():
    from ckpt_tools.formats.ranges import runs

    assert list(runs(2, (3, 5), (4, 5), (1, 0), (3, 5), (0, 0))) == [(10, 0, 30)]


def test_a_key_report_survives_its_trip_between_ranks():
    import dataclasses

    from ckpt_tools.diff import diff_keys
    from ckpt_tools.load import report_from_dict
    from ckpt_tools.meta import TensorMeta

    ckpt = {"a.weight": TensorMeta.of("a.weight", (3, 4), "F32"), "extra": TensorMeta.of("extra", (2,), "F16")}
    model = {"a.weight": TensorMeta.of("a.weight", (3, 5), "F32"), "b": TensorMeta.of("b", (1,), "BF16")}
    report = diff_keys(ckpt, model)
    assert report_from_dict(json.loads(json.dumps(dataclasses.asdict(report)))) == report

"""load_checkpoint(checkpoint, model) -> KeyReport: ``strict=False`` done right.

The key report comes first and a failing verdict refuses the load (``force=True`` loads what
fits anyway). Then only tensors whose shapes agree are copied, one at a time from the lazy reader,
so no second copy of the state dict is ever in memory: into the existing tensor (``copy_`` casts
the dtype) for a real model, or into a fresh tensor set on the owning module for a tensor on the
meta device (every name of a tied tensor gets the same new tensor, so ties survive). Afterwards
every loaded tensor is read back through the model and compared with its source (after the same
cast), NaN and Inf are looked for, and the preset's value checks run (OpenFlamingo: gates still all zero means the
cross-attention never landed). The report's ``load`` says what happened.

On a sharded model (DTensor parameters) under ``torch.distributed`` every rank calls
``load_checkpoint``: rank 0 computes the key report and hands it to the others as JSON, each rank
reads only the byte ranges of the blocks it holds (a safetensors tensor's rows by offset, a DCP
tensor's chunks), copies them into its local tensors and verifies them, and the ranks exchange
what each read (``distributed`` has the collectives).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .diff import CoverageRow, Entry, KeyReport, Problem, compare
from .distributed import (
    agree,
    fits,
    gather_json,
    is_sharded,
    on_first_rank,
    owned_box,
    rank_and_size,
    read_slice,
)
from .errors import LoadRefusedError, UsageError
from .formats import open_checkpoint
from .fs import same_bytes
from .infer import Inference
from .meta import TensorMeta, torch_dtype
from .presets import ModelPreset, get_preset
from .provenance import WeightSource, record
from .remap import coerce_rules
from .stats import ValueCheck, default_checks, run_checks
from .targets import TargetOptions, build_model, checkpoint_side, is_module, module_side


def _resolve_preset(preset):
    if preset is None:
        return None
    return preset if isinstance(preset, ModelPreset) else get_preset(str(preset))


def load_checkpoint(checkpoint, model, *, remap=None, expect_missing: Sequence[str] = (),
                    require: Sequence[str] = (), force: bool = False, preset=None, verify: bool = True,
                    device: str | None = None, provenance=None, select: str | None = None,
                    inert: bool = False, model_class: str | None = None, trust_remote_code: bool = False,
                    endpoint: str | None = None, token: str | bool | None = None, auto_remap: bool = False,
                    allow_nonfinite: bool = False) -> KeyReport:
    """Diff ``checkpoint`` against ``model``, then load every tensor that fits and verify it landed.

    ``checkpoint``: a path, hf:// reference or open Checkpoint (the same first argument as
    ``diff_keys``). ``model``: an nn.Module, or a target string as ``diff_keys`` takes (a preset, a
    transformers folder, config.json or hf://ORG/NAME, timm:NAME, open_clip:NAME,
    package.module:callable; ``model_class``, ``trust_remote_code``, ``endpoint``, ``token`` as
    there): the model is then built on the meta device, filled from the checkpoint, and returned
    as ``report.model`` (what the checkpoint does not hold stays on meta: ``load["still_on_meta"]``).
    ``preset``: a preset name or
    ModelPreset whose remap, expectations, hints and value checks apply. ``force``: load even
    when the verdict fails (shape mismatches are still skipped). ``device``: where tensors of a
    meta-device model are materialised (default ``cpu``). ``provenance``: the WeightSource recorded
    for every tensor loaded (default: the checkpoint's file name). Raises LoadRefusedError
    (carrying the report) when the verdict fails and ``force`` is not set. ``auto_remap``: apply the
    remap rules inferred when keys do not match (the report names them). After the load every
    loaded tensor is checked for NaN and Inf (a problem unless ``allow_nonfinite``) and the
    preset's value checks run on the model (``stats.run_checks``).

    A model sharded across ranks (DTensor parameters: FSDP2's ``fully_shard``, tensor parallelism)
    under an initialised ``torch.distributed`` is loaded by every rank calling this together: the
    key report is computed once, on rank 0, and each rank reads and verifies only the blocks it
    holds (``report.load["ranks"]`` says what each read); NaN and Inf are looked for in each
    rank's blocks.
    """
    if is_module(checkpoint) and not is_module(model):
        raise UsageError("load_checkpoint takes the checkpoint first, then the model",
                         fix="call load_checkpoint(checkpoint, model), as diff_keys(checkpoint, target)")
    if is_sharded(model):
        return _load_sharded(checkpoint, model, remap=remap, expect_missing=expect_missing, require=require,
                             force=force, preset=preset, verify=verify, provenance=provenance, select=select,
                             inert=inert, auto_remap=auto_remap, allow_nonfinite=allow_nonfinite)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(
        checkpoint, select=select, inert=inert, endpoint=endpoint, token=token)
    built = None
    try:
        if not is_module(model):  # a target to build: after the checkpoint opened, so a bad path fails fast
            built = build_model(model, options=TargetOptions(model_class, trust_remote_code, endpoint, token))
            model, preset = built.model, preset if preset is not None else built.preset
        side = module_side(model, label=built.label if built else None)
        side.preset = _resolve_preset(preset)
        report = compare(checkpoint_side(ckpt), side, remap=remap, expect_missing=expect_missing,
                         require=require, auto_remap=auto_remap)
        report.model = model if built is not None else None
        if not report.ok and not force:
            raise LoadRefusedError(_refusal(report), report=report, path=str(ckpt.source), fix=_refusal_fix(report))
        report.load, bad = _load(model, ckpt, report, side.preset, device=device, verify=verify,
                                 forced=force and not report.ok, allow_nonfinite=allow_nonfinite)
        _record(model, report, provenance, ckpt)
    finally:
        if ckpt is not checkpoint:
            ckpt.close()
    return _with_load_problems(report, bad)


def _with_load_problems(report: KeyReport, bad: list[tuple[str, str, str]]) -> KeyReport:
    report.problems += [Problem(**check) for check in report.load["checks"]]
    for key, why, fix in bad:
        report.problems.append(Problem("load", key, why, fix))
    return report


def _record(model, report: KeyReport, provenance, ckpt) -> None:
    """Mark every loaded name (tied names too) as coming from this checkpoint."""
    source = provenance or WeightSource("checkpoint", Path(str(ckpt.source)).name)
    record(model, source, names=[name for entry in report.loadable() for name in entry.names])


def _refusal(report: KeyReport) -> str:
    counts = report.counts
    parts = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("shape_mismatch", "unexpected", "missing_unexpected")
             if counts[k]]
    return "refusing to load: the key report's verdict is fail (" + ", ".join(parts) + ")"


def _refusal_fix(report: KeyReport) -> str:
    """The way forward the key report already found, else the general one."""
    general = "fix the problems in the key report (ckpt diff), or pass force=True (--force) to load the tensors that fit"
    if report.inference is not None and report.inference.rules and (report.with_inferred or {}).get("verdict") == "ok":
        return f"the inferred remap rules make it fit: pass auto_remap=True (--auto-remap); or {general}"
    fixes = [h["fix"] for h in report.hints if str(h.get("fix") or "").startswith("--")]
    if fixes:
        return f"try {fixes[0]} (as remap= rules in the library); or {general}"
    return general


def _load(model, ckpt, report: KeyReport, preset, *, device: str | None, verify: bool,
          forced: bool, allow_nonfinite: bool) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    import torch

    started = time.perf_counter()
    entries = report.loadable()
    nbytes = 0
    with torch.no_grad():
        for entry in entries:
            source = ckpt.tensor(entry.ckpt_key)
            nbytes += entry.ckpt.nbytes
            _assign(model, entry, source, device)
            del source
    loaded_s = time.perf_counter() - started
    bad = _verify(model, ckpt, entries) if verify else []
    mismatched = [name for name, _, _ in bad]
    checks = _value_checks(model, entries, preset, allow_nonfinite)
    still_meta = sum(1 for t in model.state_dict(keep_vars=True).values() if t.device.type == "meta")
    return {
        "loaded": len(entries),
        "bytes": nbytes,
        "cast": sum(1 for e in entries if e.status == "dtype_mismatch"),
        "skipped": [e.name for e in report.entries if e.status == "shape_mismatch"],
        "verified": bool(verify and entries and not mismatched and not checks),  # nothing loaded: nothing landed
        "compared": len(entries) if verify else 0,
        "mismatched": mismatched,
        "checks": checks,
        "forced": forced,
        "still_on_meta": still_meta,
        "seconds": round(time.perf_counter() - started, 3),
        "copy_seconds": round(loaded_s, 3),
    }, bad


def _value_checks(model, entries: list[Entry], preset, allow_nonfinite: bool) -> list[dict]:
    """Problems in the values: NaN/Inf in a loaded tensor (after its cast), then the preset's checks
    on the whole model (OpenFlamingo: its gates must not all be 0, or the cross-attention never landed)."""
    loaded = {entry.name: _current(model, entry.name) for entry in entries}
    found = run_checks(loaded, default_checks(allow_nonfinite=allow_nonfinite))
    preset_checks = [ValueCheck(**dict(check)) for check in (preset.value_checks if preset else ())]
    if preset_checks:
        found += run_checks(dict(model.state_dict(keep_vars=True)), preset_checks)
    return found


def _owner(model, name: str):
    module_path, _, attr = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def _current(model, name: str):
    module, attr = _owner(model, name)
    tensor = module._parameters.get(attr)
    return tensor if tensor is not None else module._buffers.get(attr)


def _assign(model, entry: Entry, source, device: str | None) -> None:
    import torch

    current = _current(model, entry.name)
    if current.device.type != "meta":
        current.copy_(source)  # casts to the model's dtype
        return
    fresh = torch.empty(current.shape, dtype=current.dtype, device=device or "cpu")
    fresh.copy_(source)
    if isinstance(current, torch.nn.Parameter):
        fresh = torch.nn.Parameter(fresh, requires_grad=current.requires_grad)
    for name in entry.names:  # every name of a tied tensor gets the same new tensor
        module, attr = _owner(model, name)
        slot = module._parameters if attr in module._parameters else module._buffers
        slot[attr] = fresh


def _verify(model, ckpt, entries: list[Entry]) -> list[tuple[str, str, str]]:
    """(name, why, fix) for each tensor in the model that differs from its checkpoint source (after the
    cast), that lost a tie, or whose tied names the checkpoint gives different values."""
    import torch

    def same(current, key) -> bool:
        source = ckpt.tensor(key).to(device=current.device, dtype=current.dtype)
        return torch.equal(current, source) or (
            current.is_floating_point() and torch.allclose(current, source, rtol=0, atol=0, equal_nan=True))

    bad: list[tuple[str, str, str]] = []
    with torch.no_grad():
        for entry in entries:
            current = _current(model, entry.name)
            if not same(current, entry.ckpt_key):
                bad.append((entry.name, f"differs from checkpoint key '{entry.ckpt_key}' after the load",
                            "something rewrote it during the load (a hook or a shared storage); load it alone"))
            elif not all(_current(model, n) is current for n in entry.names[1:]):
                bad.append((entry.name, "its tied names no longer share one tensor",
                            "re-tie the weights (model.tie_weights()) after the load"))
            else:
                conflicts = [k for k in entry.also if not same(current, k)]
                if conflicts:
                    bad.append((entry.name, f"the checkpoint holds other values for this tied tensor under "
                                            f"'{conflicts[0]}' (loaded '{entry.ckpt_key}')",
                                f"keep the right one: --drop '{conflicts[0]}' or --drop '{entry.ckpt_key}'"))
    return bad


# ---------------------------------------------------------------------------------------------
# a model sharded across ranks

def _load_sharded(checkpoint, model, *, remap, expect_missing, require, force, preset, verify, provenance,
                  select, inert, auto_remap, allow_nonfinite) -> KeyReport:
    """Every rank opens the checkpoint's listing; rank 0 alone diffs it against the model and
    hands the key report to the others (as JSON); each rank then reads only the blocks of the
    tensors it holds (a DTensor's local block, a plain tensor whole), copies them into its local
    tensors, reads them again to verify them, and the ranks exchange what each read. A step that
    fails on one rank fails on every rank. The report's ``load`` has ``ranks``: per rank, the
    bytes read, the slices and what differed."""
    ckpt = agree(lambda: checkpoint if isinstance(checkpoint, Checkpoint)
                 else open_checkpoint(checkpoint, select=select, inert=inert))
    try:
        preset = _resolve_preset(preset)

        def diff() -> dict:
            side = module_side(model)
            side.preset = preset
            return report_to_json(compare(checkpoint_side(ckpt), side, remap=remap, expect_missing=expect_missing,
                                          require=require, auto_remap=auto_remap))

        report = report_from_dict(on_first_rank(diff))
        if not report.ok and not force:
            raise LoadRefusedError(_refusal(report), report=report, path=str(ckpt.source), fix=_refusal_fix(report))
        mine = agree(lambda: _load_owned(model, ckpt, report.loadable(), verify, allow_nonfinite))
        ranks = gather_json(mine)
        report.load, bad = _sharded_summary(model, report, ranks, preset, verify=verify,
                                            forced=force and not report.ok)
        _record(model, report, provenance, ckpt)
    finally:
        if ckpt is not checkpoint:
            ckpt.close()
    return _with_load_problems(report, bad)


def _load_owned(model, ckpt, entries: list[Entry], verify: bool, allow_nonfinite: bool) -> dict:
    """Read this rank's block of every loadable tensor into it, then (``verify``) read each block
    again and compare, and look for NaN and Inf in the blocks; what this rank read and found, as JSON."""
    import torch

    started = time.perf_counter()
    nbytes = slices = 0
    with torch.no_grad():
        for entry in entries:
            offsets, sizes, local = _owned(model, entry.name)
            if fits(local, sizes, entry.ckpt.dtype):  # read straight into the model's memory
                _, read = read_slice(ckpt, entry.ckpt_key, offsets, sizes, out=local)
            else:
                block, read = read_slice(ckpt, entry.ckpt_key, offsets, sizes)
                local.copy_(block)  # casts to the model's dtype
                del block
            nbytes, slices = nbytes + read, slices + 1
        copied = time.perf_counter() - started
        checked, mismatched, scratch = 0, [], {}
        for entry in entries if verify else []:
            offsets, sizes, local = _owned(model, entry.name)
            block, read = read_slice(ckpt, entry.ckpt_key, offsets, sizes,
                                     out=_scratch(scratch, sizes, entry.ckpt.dtype))
            checked += read
            exact = fits(local, sizes, entry.ckpt.dtype)  # read as it is: compared byte for byte
            if not (same_bytes(_bytes_of(local), _bytes_of(block)) if exact else _same(local, block)):
                mismatched.append(entry.name)
            del block
    rank, _ = rank_and_size()
    blocks = {entry.name: _owned(model, entry.name)[2] for entry in entries}
    checks = run_checks(blocks, default_checks(allow_nonfinite=allow_nonfinite))
    return {"rank": rank, "bytes_read": nbytes, "verify_bytes_read": checked, "slices": slices,
            "mismatched": mismatched, "checks": checks, "copy_seconds": round(copied, 3),
            "seconds": round(time.perf_counter() - started, 3)}


def _scratch(buffers: dict, sizes: tuple[int, ...], dtype: str):
    """A reused buffer (one per dtype, grown as needed) to read a block into for its check."""
    import torch

    need = math.prod(sizes)
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < need:
        buffer = buffers[dtype] = torch.empty(need, dtype=torch_dtype(dtype))
    return buffer[:need].view(sizes)


def _bytes_of(tensor):
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy()


def _owned(model, name: str):
    current = _current(model, name)
    if current.device.type == "meta":
        raise UsageError("the sharded model is still on the meta device", key=name,
                         fix="materialise it first (model.to_empty(device=...)), then load")
    return owned_box(current, name)


def _same(local, block) -> bool:
    import torch

    source = block.to(dtype=local.dtype, device=local.device)
    return torch.equal(local, source) or (
        local.is_floating_point() and torch.allclose(local, source, rtol=0, atol=0, equal_nan=True))


def _sharded_summary(model, report: KeyReport, ranks: list[dict], preset, *, verify: bool,
                     forced: bool) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    rank, world = rank_and_size()
    entries = report.loadable()
    where: dict[str, list[int]] = {}
    for part in ranks:
        for name in part["mismatched"]:
            where.setdefault(name, []).append(part["rank"])
    # NaN or Inf in any rank's block is a problem of the tensor, said once (with the ranks' counts)
    checks = list({(c["key"], c["detail"]): c for part in ranks for c in part["checks"]}.values())
    still_meta = sum(1 for t in model.state_dict(keep_vars=True).values() if t.device.type == "meta")
    load = {
        "loaded": len(entries),
        "bytes": sum(part["bytes_read"] for part in ranks),
        "cast": sum(1 for e in entries if e.status == "dtype_mismatch"),
        "skipped": [e.name for e in report.entries if e.status == "shape_mismatch"],
        "verified": bool(verify and not where and not checks),
        "compared": len(entries) if verify else 0,
        "mismatched": list(where),
        "checks": checks,
        "forced": forced,
        "still_on_meta": still_meta,
        "seconds": max(part["seconds"] for part in ranks),
        "copy_seconds": max(part["copy_seconds"] for part in ranks),
        "world_size": world,
        "rank": rank,
        "state_bytes": sum(e.ckpt.nbytes for e in entries),
        "ranks": ranks,
    }
    if preset is not None and preset.value_checks:
        # they judge whole tensors (a gate not all zero), which no rank holds alone
        load["value_checks_skipped"] = [dict(c).get("name", "") for c in preset.value_checks]
    bad = [(name, f"differs from the checkpoint after the load on rank {', '.join(map(str, on))}",
            "something rewrote it during the load (a hook or a shared storage); load it alone")
           for name, on in where.items()]
    return load, bad


def report_to_json(report: KeyReport) -> dict:
    """A key report as JSON-able data that ``report_from_dict`` turns back into one (how rank 0's
    report reaches the other ranks); the inferred rules travel as rules-file dicts."""
    data = {f.name: getattr(report, f.name) for f in dataclasses.fields(KeyReport)
            if f.name not in ("inference", "values", "model")}
    data = json.loads(json.dumps(dataclasses.asdict(KeyReport(**data))))
    inference = report.inference
    data["inference"] = None if inference is None else {
        **{f.name: getattr(inference, f.name) for f in dataclasses.fields(inference) if f.name != "rules"},
        "rules": [rule.to_dict() for rule in inference.rules]}
    return data


def report_from_dict(data: dict) -> KeyReport:
    """A KeyReport from ``dataclasses.asdict`` of one (after a JSON round trip): how rank 0's key
    report reaches the other ranks."""
    def meta(value):
        return None if value is None else TensorMeta(value["name"], tuple(value["shape"]), value["dtype"],
                                                     value["nbytes"])

    fields = {f.name: data[f.name] for f in dataclasses.fields(KeyReport) if f.name in data}
    fields["entries"] = [Entry(**{**e, "model": meta(e["model"]), "ckpt": meta(e["ckpt"])}) for e in data["entries"]]
    fields["problems"] = [Problem(**p) for p in data["problems"]]
    fields["coverage"] = [CoverageRow(**c) for c in data["coverage"]]
    fields["unexpected_metas"] = {k: meta(v) for k, v in data["unexpected_metas"].items()}
    inference = data.get("inference")
    if inference is not None:
        fields["inference"] = Inference(**{**inference, "rules": coerce_rules(inference["rules"])})
    return KeyReport(**fields)

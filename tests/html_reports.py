"""Report dicts for the HTML report's tests and benchmark, made by the library itself.

A diff's ``to_dict()`` carries the per-tensor ``"entries"`` that ``ckpt_tools.html`` reads: a target
tensor gives one entry (its first name as ``key``, the other names as ``aliases``); a checkpoint
tensor nothing takes gives one entry with status ``unexpected`` under its remapped name.
"""

from __future__ import annotations


def openflamingo_9b() -> dict:
    """The OpenFlamingo-9B published layout diffed against its preset (builds the meta skeleton)."""
    import json
    from pathlib import Path

    from ckpt_tools.diff import diff_keys
    from ckpt_tools.meta import TensorMeta
    from ckpt_tools.targets import preset_side

    reference = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "data" / "openflamingo-released-keys.json"
    tensors = json.loads(reference.read_text())["openflamingo/OpenFlamingo-9B-vitl-mpt7b"]["tensors"]
    metas = {k: TensorMeta.of(k, v["shape"], v["dtype"]) for k, v in tensors.items()}
    report = diff_keys(metas, preset_side("openflamingo-9b-vitl-mpt7b", cached=False))
    data = report.to_dict()
    data["source"] = "hf://openflamingo/OpenFlamingo-9B-vitl-mpt7b/checkpoint.pt"
    return data


def synthetic(tensors: int = 1000) -> dict:
    """A diff of ``tensors`` target tensors in numbered blocks, with every status present: a few shape
    and dtype mismatches, a missing block, expected-missing buffers and unexpected checkpoint keys."""
    from ckpt_tools.diff import diff_keys
    from ckpt_tools.meta import TensorMeta

    names = ["q.weight", "k.weight", "v.weight", "o.weight", "ln.weight", "ln.bias", "mlp.up.weight",
             "mlp.down.weight", "mlp.up.bias", "mlp.down.bias"]
    model: dict[str, TensorMeta] = {}
    for i in range(tensors // len(names)):
        for n in names:
            key = f"model.blocks.{i}.{n}"
            model[key] = TensorMeta.of(key, (64,) if "ln" in n or "bias" in n else (64, 64), "F32")
    ckpt = dict(model)
    for i in range(3):
        key = f"model.blocks.{i}.q.weight"
        ckpt[key] = TensorMeta.of(key, (32, 64), "F32")  # shape mismatches
    for n in names:
        ckpt.pop(f"model.blocks.7.{n}")  # one block missing
    key = "model.blocks.9.ln.weight"
    ckpt[key] = TensorMeta.of(key, (64,), "F16")  # a cast
    for i in range(5):
        key = f"extra.head.{i}.weight"
        ckpt[key] = TensorMeta.of(key, (64, 64), "F32")
    report = diff_keys(ckpt, model, expect_missing=["model.blocks.7.ln.*"])
    data = report.to_dict()
    data["source"] = "synthetic.safetensors"
    return data

"""Synthetic checkpoints with the key layout of the published OpenFlamingo checkpoint.pt files.

Key names, shapes and dtypes come from data/openflamingo-released-keys.json (a copy of the
project's reference file). Values are cheap but distinct: tensor number i holds
``i + arange(numel) / numel``, so no two tensors are equal and the gates are non-zero.

Memory: tensors are streamed into a raw file first and the .pt is saved from memory-mapped views
of it, so the generator's anonymous memory stays near one tensor even for the 4.19 GB 3B layout
(the page cache holds the rest). The output is written to ``OUT.<pid>.tmp`` and renamed into place, so a
half-written file is never mistaken for a finished one.

Example:
    .venv/bin/python scripts/bench/gen_openflamingo.py --layout 3b --scale 0.01 --out /tmp/ckpt-bench/of3b.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "openflamingo-released-keys.json"
LAYOUTS = {
    "3b": "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
    "4b": "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
    "9b": "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
    "9b-deprecated": "openflamingo/OpenFlamingo-9B-deprecated",
}
FORMATS = {"pt": ".pt", "legacy-pt": "-legacy.pt", "safetensors": ".safetensors"}
WRAPPERS = ("none", "ddp")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
# v1 (9B-deprecated) files kept every cross-attention tensor a second time under this module.
V1_ALIAS_PREFIX = "lang_encoder.gated_cross_attn_layers."


def reference(layout: str) -> dict:
    return json.loads(REFERENCE.read_text())[LAYOUTS[layout]]


def scaled_shape(shape: list[int], scale: float) -> tuple[int, ...]:
    """Shrink (or grow) the first dimension; a 1-element gate stays 1 element."""
    if not shape:
        return ()
    return (max(1, round(shape[0] * scale)), *shape[1:])


def layout_specs(layout: str, scale: float = 1.0) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} in the reference file's order, shapes scaled."""
    tensors = reference(layout)["tensors"]
    return {name: (scaled_shape(t["shape"], scale), t["dtype"]) for name, t in tensors.items()}


def v1_alias(name: str, decoder_path: str) -> str | None:
    """``lang_encoder.model.layers.3.gated_cross_attn_layer.x`` -> ``lang_encoder.gated_cross_attn_layers.3.x``."""
    head = f"lang_encoder.{decoder_path}."
    if not name.startswith(head) or ".gated_cross_attn_layer." not in name:
        return None
    index, _, rest = name[len(head):].partition(".gated_cross_attn_layer.")
    return f"{V1_ALIAS_PREFIX}{index}.{rest}"


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


def make_tensor(index: int, shape: tuple[int, ...], dtype: str):
    import torch

    from_name = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    numel = math.prod(shape)
    if dtype in from_name:
        values = torch.arange(numel, dtype=torch.float64 if dtype == "F64" else torch.float32)
        values = values.div_(max(numel, 1)).add_(index).to(from_name[dtype])
    else:
        int_dtypes = {"I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
        values = (torch.arange(numel, dtype=torch.int64) + index).remainder_(100).to(int_dtypes[dtype])
    return values.reshape(shape)


def _raw_bytes(tensor) -> memoryview:
    import torch

    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def write_safetensors(specs: dict, path: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Stream tensors into a safetensors file one at a time; returns ({key: (begin, end)}, data start)."""
    header, offsets, position = {}, {}, 0
    for name, (shape, dtype) in specs.items():
        size = nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = (position, position + size)
        position += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for index, (shape, dtype) in enumerate(specs.values()):
            f.write(_raw_bytes(make_tensor(index, shape, dtype)))
    return offsets, 8 + len(blob)


def mapped_state_dict(specs: dict, raw: Path):
    """Tensors as read-only-in-practice views of ``raw`` (copy-on-write maps, never written)."""
    import numpy as np
    import torch

    offsets, data_start = write_safetensors(specs, raw)
    state = {}
    for name, (shape, dtype) in specs.items():
        begin, end = offsets[name]
        array = np.memmap(raw, dtype=np.uint8, mode="c", offset=data_start + begin, shape=(end - begin,))
        tensor = torch.from_numpy(array) if end > begin else torch.empty(0, dtype=torch.uint8)
        state[name] = tensor.view(_torch_dtype(dtype)).reshape(shape)
    return state


def _torch_dtype(dtype: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[dtype]


def wrap(state: dict, wrapper: str) -> dict:
    if wrapper == "none":
        return state
    # The layout OpenFlamingo's training script saves: DDP-prefixed weights, optimizer, epoch.
    return {
        "model_state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer_state_dict": {
            "state": {},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
                              "params": list(range(len(state)))}],
        },
        "epoch": 1,
    }


def default_name(layout: str, scale: float, fmt: str, wrapper: str = "none") -> str:
    suffix = "-ddp" if wrapper == "ddp" else ""
    return f"openflamingo-{layout}-s{scale:g}{suffix}{FORMATS[fmt]}"


def generate(layout: str = "3b", scale: float = 1.0, fmt: str = "pt", wrapper: str = "none",
             out: str | Path | None = None, v1_aliases: bool = False) -> Path:
    """Write one synthetic checkpoint and return its path."""
    if fmt == "safetensors" and (wrapper != "none" or v1_aliases):
        raise SystemExit("safetensors holds a flat dict of unshared tensors: use --wrapper none, no --v1-aliases")
    specs = layout_specs(layout, scale)
    out = Path(out or Path("/tmp/ckpt-bench") / default_name(layout, scale, fmt, wrapper))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # unique: two benchmarks may generate at once
    try:
        if fmt == "safetensors":
            write_safetensors(specs, tmp)
        else:
            _write_torch(specs, tmp, layout, fmt, wrapper, v1_aliases)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_torch(specs: dict, path: Path, layout: str, fmt: str, wrapper: str, v1_aliases: bool) -> None:
    import torch

    raw = path.with_name(path.name + ".raw")
    try:
        state = mapped_state_dict(specs, raw)
        if v1_aliases:
            decoder = reference(layout)["decoder_layers_attr_name"]
            state.update({alias: state[name] for name in list(state)
                          if (alias := v1_alias(name, decoder)) is not None})
        torch.save(wrap(state, wrapper), path, _use_new_zipfile_serialization=(fmt == "pt"))
        del state
    finally:
        raw.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, default="3b",
                        help="which published checkpoint to imitate (default 3b: 4.19 GB at scale 1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="factor on every tensor's first dimension (total size scales about linearly)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="pt",
                        help="pt: zip torch.save; legacy-pt: pre-1.6 pickle; safetensors: streamed")
    parser.add_argument("--wrapper", choices=WRAPPERS, default="none",
                        help="ddp: {model_state_dict: {module.<key>: ...}, optimizer_state_dict, epoch}")
    parser.add_argument("--v1-aliases", action="store_true",
                        help="also store every cross-attention tensor under "
                             "lang_encoder.gated_cross_attn_layers.N.* (shared storage, as v1 files did)")
    parser.add_argument("--out", help="output path (default /tmp/ckpt-bench/<generated name>)")
    args = parser.parse_args(argv)
    path = generate(args.layout, args.scale, args.fmt, args.wrapper, args.out, args.v1_aliases)
    print(f"{path} {os.path.getsize(path)} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

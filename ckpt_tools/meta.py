"""TensorMeta: what planning code knows about a tensor without its bytes.

Dtype names follow safetensors (``F32``, ``BF16``, ...) everywhere. This module never imports
torch at load time, so the safetensors path stays torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# safetensors dtype name -> (itemsize in bytes, torch dtype attribute name)
DTYPES: dict[str, tuple[float, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "C64": (8, "complex64"),
    "C128": (16, "complex128"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_BY_TORCH_NAME = {torch_name: name for name, (_, torch_name) in DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape, dtype and size of one tensor; the currency of planning code."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def of(cls, name: str, shape, dtype: str) -> TensorMeta:
        shape = tuple(int(s) for s in shape)
        return cls(name, shape, dtype, int(math.prod(shape) * itemsize(dtype)))

    @classmethod
    def from_tensor(cls, name: str, tensor) -> TensorMeta:
        return cls.of(name, tuple(tensor.shape), dtype_name(tensor.dtype))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def renamed(self, name: str) -> TensorMeta:
        return TensorMeta(name, self.shape, self.dtype, self.nbytes)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes}


def itemsize(dtype: str) -> float:
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(torch_dtype) -> str:
    """``torch.float32`` -> ``"F32"`` (accepts the dtype object or its string)."""
    text = str(torch_dtype).removeprefix("torch.")
    try:
        return _BY_TORCH_NAME[text]
    except KeyError:
        raise ValueError(f"dtype {torch_dtype} has no safetensors name") from None


def torch_dtype(name: str):
    """``"F32"`` -> ``torch.float32`` (imports torch)."""
    import torch

    return getattr(torch, DTYPES[name][1])


def metas_from_state_dict(state_dict) -> dict[str, TensorMeta]:
    """TensorMeta for every tensor of a mapping (works for meta-device tensors)."""
    return {k: TensorMeta.from_tensor(k, v) for k, v in state_dict.items()}

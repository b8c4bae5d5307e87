"""References to tensor bytes inside a torch archive, made without torch: the leaves the shallow
zip reader puts where ``torch.load`` would put tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def contiguous(self) -> bool:
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        return all(s == e for s, e, n in zip(self.stride, reversed(expected), self.shape, strict=True) if n != 1)

    def identity(self) -> tuple:
        return (self.storage.key, self.offset, self.shape, self.stride, self.dtype)

"""Byte ranges of local files: boxes of row-major tensors, and windows onto part of a file.

A box is ``(offsets, sizes)`` inside a tensor's shape: a DCP chunk inside its global tensor, the
slice one rank owns of a DTensor. ``runs`` pairs the bytes of a box in one row-major layout with
the same elements in another, merged into the longest runs contiguous in both, so a ``Shard(0)``
chunk is one run and a ``Shard(1)`` chunk one run per row. ``read_runs`` fills a tensor from a
file with ``os.preadv`` straight into the tensor's memory: no temporary copy, and only the bytes
of the box are read. ``FileWindow`` shows a byte range of a file as a file of its own (a DCP chunk
that is a whole ``torch.save`` zip stored inside a ``.distcp`` file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from itertools import product

from ..errors import InvalidCheckpointError, UsageError
from ..meta import torch_dtype
from ..rawio import SizedReader

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= size
    return tuple(reversed(out))


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of one tensor, or None when they do not overlap."""
    offsets, sizes = [], []
    for a_at, a_n, b_at, b_n in zip(a[0], a[1], b[0], b[1], strict=True):
        start, stop = max(a_at, b_at), min(a_at + a_n, b_at + b_n)
        if stop <= start:
            return None
        offsets.append(start)
        sizes.append(stop - start)
    return tuple(offsets), tuple(sizes)


def runs(itemsize: int, sizes: Sequence[int], src_shape: Sequence[int], src_at: Sequence[int],
         dst_shape: Sequence[int], dst_at: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(source byte offset, destination byte offset, nbytes) covering a box of ``sizes`` that sits
    at ``src_at`` in a row-major ``src_shape`` and at ``dst_at`` in a row-major ``dst_shape``."""
    ndim = len(sizes)
    if ndim == 0:
        yield 0, 0, itemsize
        return
    if any(n == 0 for n in sizes):
        return
    whole = ndim  # dims from here on are whole in the box, the source and the destination
    while whole > 0 and sizes[whole - 1] == src_shape[whole - 1] == dst_shape[whole - 1]:
        whole -= 1
    lead = max(whole - 1, 0)  # the dim a run starts partway along; the dims before it are looped over
    run = math.prod(sizes[lead:]) * itemsize
    src_strides, dst_strides = strides(src_shape), strides(dst_shape)
    src_base = src_at[lead] * src_strides[lead]
    dst_base = dst_at[lead] * dst_strides[lead]
    for index in product(*(range(n) for n in sizes[:lead])):
        src = src_base + sum((src_at[i] + k) * src_strides[i] for i, k in enumerate(index))
        dst = dst_base + sum((dst_at[i] + k) * dst_strides[i] for i, k in enumerate(index))
        yield src * itemsize, dst * itemsize, run


def slice_buffer(out, sizes: tuple[int, ...], dtype: str, source: str, key: str):
    """Where a block of ``sizes`` and ``dtype`` (a safetensors name) is read to: ``out`` if given (it
    must fit exactly and be contiguous), else a new tensor."""
    want = torch_dtype(dtype)
    if out is None:
        import torch

        return torch.empty(sizes, dtype=want)
    if tuple(out.shape) != tuple(sizes) or out.dtype != want or not out.is_contiguous() or out.device.type != "cpu":
        raise UsageError(f"the buffer for a {dtype} block {list(sizes)} is a {out.dtype} tensor "
                         f"{list(out.shape)}{'' if out.is_contiguous() else ', not contiguous'} on {out.device}",
                         path=source, key=key, fix="pass a contiguous CPU tensor of the block's shape and dtype")
    return out


def byte_view(tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor's memory."""
    import torch

    flat = tensor.reshape(-1) if tensor.dim() == 0 else tensor
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def read_runs(fd: int, base: int, pieces, out, *, source: str, key: str | None = None) -> int:
    """Read each (source offset, destination offset, nbytes) of ``pieces`` from ``fd`` at ``base`` +
    source offset into the bytes of the contiguous tensor ``out``; returns the bytes read."""
    view = byte_view(out)
    total = 0
    for src, dst, nbytes in pieces:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[dst + done:dst + nbytes]], base + src + done)
            if got <= 0:
                raise InvalidCheckpointError(f"truncated: the file ends before byte {base + src + nbytes:,}",
                                             path=source, key=key,
                                             fix="the file is damaged or was cut short: copy or save it again")
            done += got
        total += nbytes
    return total


class FileWindow(SizedReader):
    """Bytes ``[start, start + length)`` of an open file, read as a file of their own (seekable,
    positional reads, so windows on one descriptor do not disturb each other). ``bytes_read``
    counts what was read through it."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__(length)
        self._fd, self._start = fd, start
        self.bytes_read = 0

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer).cast("B")[:n]], self._start + self._pos)
        self._pos += got
        self.bytes_read += got
        return got

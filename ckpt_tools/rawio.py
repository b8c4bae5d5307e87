"""A read-only, seekable raw file of known size whose bytes come from elsewhere.

Subclasses (an HTTP range reader, a window onto part of a local file) implement ``readinto`` at
``self._pos``; seeking and telling are the same for all of them and live here.
"""

from __future__ import annotations

import io


class SizedReader(io.RawIOBase):
    """``size`` bytes, read through ``readinto`` from position ``_pos``; seek anywhere, even past the
    end (a read there returns nothing), never before the start."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + offset
        return self._pos

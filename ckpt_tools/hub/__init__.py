"""Pinned, resumable, verified downloads into the standard Hugging Face cache.

``plan_download`` pins the commit and says what would be fetched (``ckpt download --dry-run``);
``download`` plans and then fetches (``download.py``), each file through the resumable, hashing
transfer of ``transfer.py`` (a big file in ranges over several connections, ``ranges.py``) into a
``layout.py`` layout; ``lockfile.py`` records and enforces exactly what was fetched.
"""

from __future__ import annotations

from .download import DownloadedFile, DownloadResult, download, execute
from .lockfile import LockFile
from .plan import DownloadPlan, PlannedFile, plan_download
from .ranges import DEFAULT_CHUNK_SIZE
from .transfer import DEFAULT_CONNECTIONS

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_CONNECTIONS", "DownloadPlan", "DownloadResult", "DownloadedFile", "LockFile",
           "PlannedFile", "download", "execute", "plan_download"]

"""What a file is, from its first bytes: the one place that knows the formats' magic numbers.

Files are recognised by content, not by name (a ``.bin`` may be a torch zip, a legacy torch
pickle or safetensors); only sharded indexes (``*.index.json``) go by name, since JSON has no
magic. Torch decides zip-or-pickle by the local-header magic alone, so a pickle with a zip
appended is a pickle, and so it is here.
"""

from __future__ import annotations

import pickle
import pickletools
import struct

HEAD_BYTES = 32  # enough for every signature below
ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy format begins with the pickled magic number 0x1950a86a20f9469cfc6c
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
NUMPY_MAGIC = b"\x93NUMPY"
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_SUFFIX = ".index.json"


def is_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object: ``{`` is the first header byte."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def is_pickle(head: bytes) -> bool:
    """A pickle of protocol 2 or later: the PROTO opcode, then its version."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


def may_be_old_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no header; a file starting with an opcode might be one (a text
    file might too): only walking it to its STOP tells."""
    return bool(head) and head[:1].decode("latin-1") in pickletools.code2op


# name -> test, in the order they are tried (the legacy torch magic is also a pickle)
SIGNATURES = (
    ("zip", lambda head: head.startswith(ZIP_MAGIC)),
    ("numpy", lambda head: head.startswith(NUMPY_MAGIC)),
    ("safetensors", is_safetensors),
    ("torch-legacy", lambda head: head.startswith(TORCH_LEGACY_MAGIC)),
    ("pickle", is_pickle),
)


def detect(head: bytes) -> str | None:
    """``zip``, ``numpy``, ``safetensors``, ``torch-legacy``, ``pickle``, or None."""
    return next((name for name, test in SIGNATURES if test(head)), None)


def is_index_name(name: str) -> bool:
    return name.endswith(INDEX_SUFFIX)

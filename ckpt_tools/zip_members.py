"""Reading the members of a zip archive the way torch does.

``torch.serialization.set_crc32_options(False)`` makes torch.save write 0 as every record's CRC-32;
torch.load reads such files, and Python's zipfile would refuse every member as "Bad CRC-32". An
archive written that way (every stored record that holds bytes has CRC 0) is read unchecked: there
is nothing to check against. In any other archive a CRC of 0 is a damaged or patched record, and
every member is checked as zipfile always does.
"""

from __future__ import annotations

import copy
import zipfile


def written_without_crcs(infos: list[zipfile.ZipInfo]) -> bool:
    """Whether the archive recorded no CRC-32 at all (torch.save with CRC-32 turned off)."""
    holding = [i for i in infos if i.file_size]
    return bool(holding) and all(i.CRC == 0 and i.compress_type == zipfile.ZIP_STORED for i in holding)


def open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    """``archive.open(info)``, unchecked when the archive recorded no CRC-32."""
    if not written_without_crcs(archive.infolist()):
        return archive.open(info)
    unchecked = copy.copy(info)
    unchecked.CRC = None  # zipfile skips the check when it has no value to compare with
    return archive.open(unchecked)


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with open_member(archive, info) as member:
        return member.read()

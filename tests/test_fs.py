"""fs.AtomicFile: a file appears under its name whole on commit, and a discarded one leaves nothing,
both with O_TMPFILE (an unnamed file) and without it (a hidden named temporary, as on macOS)."""

from __future__ import annotations

import os

import pytest

from ckpt_tools.fs import AtomicFile


@pytest.fixture(params=["unnamed", "named"])
def mode(request, monkeypatch):
    if request.param == "named":
        monkeypatch.delattr(os, "O_TMPFILE")  # the filesystem or platform lacks it
    return request.param


def test_the_file_appears_only_on_commit(tmp_path, mode):
    final = tmp_path / "out.bin"
    with AtomicFile(final) as handle:
        handle.write(b"new bytes")
        assert not final.exists()
        handle.commit()
    assert final.read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_an_existing_file_keeps_its_content_until_the_commit(tmp_path, mode):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with AtomicFile(final) as handle:
        handle.write(b"new bytes")
        assert final.read_bytes() == b"old"
        handle.commit()
    assert final.read_bytes() == b"new bytes"


def test_a_discarded_file_leaves_nothing(tmp_path, mode):
    with AtomicFile(tmp_path / "out.bin") as handle:
        handle.write(b"half")
    assert os.listdir(tmp_path) == []


def test_an_error_in_the_block_leaves_nothing(tmp_path, mode):
    with pytest.raises(KeyError), AtomicFile(tmp_path / "out.bin") as handle:
        handle.write(b"half")
        raise KeyError("interrupted")
    assert os.listdir(tmp_path) == []

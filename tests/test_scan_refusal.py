"""No command executes a pickle: every reader refuses an unsafe one with exit 2 and one line
naming all its globals and pointing at ``ckpt scan``; the payload's file never appears."""

from __future__ import annotations

import builtins
import os

import pytest
import torch

from ckpt_tools.cli import cli

SYSTEM = f"{os.system.__module__}.system"


class Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payload_file(tmp_path, kind: str):
    target = tmp_path / "pwned"
    obj = {"w": torch.zeros(2, 3), "a": Reduce(os.system, f"touch {target}"),
           "b": Reduce(builtins.exec, f"open({str(target)!r}, 'w').write('x')")}
    path = tmp_path / f"evil-{kind}.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=(kind == "zip"))
    return path, target


# each command with the arguments that make it read SOURCE; outputs go under OUT
COMMANDS = {
    "inspect": lambda src, out, clean: ["inspect", src],
    "convert": lambda src, out, clean: ["convert", src, out / "model.safetensors"],
    "remap": lambda src, out, clean: ["remap", src, out / "model.safetensors"],
    "diff": lambda src, out, clean: ["diff", src, "--against", clean],
    "validate": lambda src, out, clean: ["validate", src, "--model", "openflamingo-tiny", "--load"],
}


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_refuse_unsafe_pickles(tmp_path, run_cli, command, kind):
    if command not in cli.commands:
        pytest.skip(f"`ckpt {command}` is not registered yet")
    src, target = _payload_file(tmp_path, kind)
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.zeros(2, 3)}, clean)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(*COMMANDS[command](src, out, clean))
    assert result.exit_code == 2, result.output
    line = result.stderr
    assert line.count("\n") == 1 and line.startswith("error: "), line
    assert SYSTEM in line and "builtins.exec" in line
    assert f"ckpt scan {src}" in line
    assert not target.exists()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_open_checkpoint_raises_unsafe_pickle_error(tmp_path, kind):
    from ckpt_tools.errors import UnsafePickleError
    from ckpt_tools.formats import open_checkpoint

    src, target = _payload_file(tmp_path, kind)
    with pytest.raises(UnsafePickleError) as info:
        open_checkpoint(src)
    assert info.value.globals == [SYSTEM, "builtins.exec"]
    assert not target.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_load_checkpoint_refuses(tmp_path, kind):
    load = pytest.importorskip("ckpt_tools.load")
    from ckpt_tools.errors import UnsafePickleError

    src, target = _payload_file(tmp_path, kind)
    with pytest.raises(UnsafePickleError):
        load.load_checkpoint(src, torch.nn.Linear(3, 2))
    assert not target.exists()

"""The README is a contract: its Quickstart is what CI runs, and every command is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ckpt_tools.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_is_two_commands_install_and_demo_then_pytest():
    first, second = quickstart_commands()
    assert "pip install -e '.[test]'" in first and first.endswith("ckpt demo")
    assert second == "pytest"


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e '.[test]'" in ci
    assert re.search(r"^pytest\b", ci, re.M)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_is_in_the_readme_with_help_and_example(name):
    command = cli.commands[name]
    assert f"ckpt {name}" in README, f"README has no section showing `ckpt {name}`"
    assert command.help and "Example" in command.help, f"`ckpt {name} --help` needs an example"


def test_every_command_of_the_design_exists():
    assert {"inspect", "remap", "convert", "diff", "validate", "download", "serve", "scan", "demo"} <= set(cli.commands)

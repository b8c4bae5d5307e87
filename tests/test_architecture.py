"""The layers hold: no import cycle (imports inside functions count), no import of another module's
private names, every module in a layer, and the import-linter contracts kept."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_graph_has_no_cycle_and_no_private_import():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_linter_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (it comes with the test extra)")
    result = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:]


def test_cli_help_imports_no_heavy_package():
    code = ("import sys; import ckpt_tools.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'safetensors', 'rich', "
            "'open_clip', 'numpy', 'requests') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

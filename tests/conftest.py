"""Test isolation: a temporary HF_HOME, no telemetry, no network beyond loopback.

huggingface_hub reads HF_HOME and HF_ENDPOINT at import time, so they are set here, before any
test module imports it.
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="ckpt-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["CKPT_CACHE"] = os.path.join(_HF_HOME, "ckpt-tools-cache")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "0")
os.environ.pop("CKPT_DEBUG", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def run_cli():
    """Run ``ckpt`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from ckpt_tools.cli import cli

    def invoke(*args: str, input: str | None = None):
        runner = CliRunner()
        return runner.invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: handing matmuls between threads costs more than it saves on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def root(tmp_path):
    """An empty folder for a hub mirror in the cache layout (see ckpt_tools.server.publish)."""
    root = tmp_path / "served"
    root.mkdir()
    return root

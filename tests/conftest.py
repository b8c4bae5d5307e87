"""Test isolation: a temporary HF_HOME, no telemetry, no network beyond loopback.

huggingface_hub reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE at import time, so they are set
here, before any test module imports it.

- ``HF_ENDPOINT`` points at a loopback port nothing listens on: a stray hub call (a test that
  forgot to pass its mirror's endpoint) is refused in milliseconds instead of reaching the real
  hub. Tests that talk to the local mirror pass ``endpoint=`` (or set HF_ENDPOINT) themselves.
- ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are removed, whatever the shell had: offline mode makes
  huggingface_hub refuse even the local mirror, so inheriting it would fail the mirror tests, or
  pass a test that expects an error for the wrong reason; a token would be sent to the mirror.
  The dead endpoint, not offline mode, is what keeps the suite off the network.

Hypothesis: the ``ci`` profile (chosen when ``CI`` is set, as ``.ci/run`` does) is derandomised,
so CI runs the same examples every time; the ``dev`` profile stays random, to keep finding new
cases locally (a failure prints the seed to reproduce it with).
"""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="ckpt-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["CKPT_CACHE"] = os.path.join(_HF_HOME, "ckpt-tools-cache")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
os.environ["HF_ENDPOINT"] = DEAD_ENDPOINT
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)
os.environ.pop("CKPT_DEBUG", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from ckpt_tools.server import HubServer  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


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


@pytest.fixture
def hub(root, commit):
    """The local hub server over ``root``, once the module's own ``commit`` fixture has published."""
    with HubServer(root) as server:
        yield server


@pytest.fixture
def cache(tmp_path):
    """An empty download cache folder."""
    return tmp_path / "cache"

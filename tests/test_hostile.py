"""Every command against the hostile corpus: exit 2 with one line, in bounded time and memory,
and nothing left behind (the NaN-only files are valid and pass)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_tools.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
import hostile_corpus  # noqa: E402

SECONDS = 30  # per command and case; real answers take well under a second


def _args(command: str, src: Path, out: Path) -> list:
    suffix = src.suffix if src.is_file() and src.suffix in (".pt", ".safetensors") else ".safetensors"
    return {
        "inspect": ["inspect", src],
        "scan": ["scan", src],
        "convert": ["convert", src, out / "converted.safetensors"],
        "remap": ["remap", src, out / f"remapped{suffix}", "--strip-prefix", "module."],
        "diff": ["diff", src, "--against", src],
        "validate": ["validate", src, "--model", "openflamingo-tiny"],
    }[command]


# the verdict commands judge keys: a valid NaN file that is not an OpenFlamingo checkpoint fails
VERDICT_ON_VALID = {"validate": 1}
COMMANDS = ["inspect", "scan", "convert", "remap", "diff", "validate"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return {case.name: case for case in hostile_corpus.build(tmp_path_factory.mktemp("hostile"))}


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 30
    assert sum(case.exit_code("inspect") == 0 for case in corpus.values()) == 3


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"no answer within {SECONDS} s")


def _case_names():
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        return [case.name for case in hostile_corpus.build(Path(root))]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", _case_names())
def test_every_command_refuses_cleanly(corpus, run_cli, tmp_path, command, name):
    if command not in cli.commands:
        pytest.skip(f"`ckpt {command}` is not registered yet")
    case = corpus[name]
    expected = case.exit_code(command)
    if expected == 0:
        expected = VERDICT_ON_VALID.get(command, 0)
    out = tmp_path / "out"
    out.mkdir()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        result = run_cli(*_args(command, case.path, out))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == expected, f"{command} {name}: {result.output}"
    if expected == 2:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output
        assert list(out.iterdir()) == [], f"{command} {name} left {list(out.iterdir())}"
    leftovers = [p.name for p in case.path.parent.iterdir() if ".tmp" in p.name or p.name.startswith(".")]
    assert leftovers == []


_DRIVER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from click.testing import CliRunner
from ckpt_tools.cli import cli
import hostile_corpus
from pathlib import Path
cases = hostile_corpus.build(Path(sys.argv[2]))
rows = []
for case in cases:
    for command in ("inspect", "scan"):
        start = time.monotonic()
        result = CliRunner().invoke(cli, [command, str(case.path)])
        rows.append([command, case.name, result.exit_code, time.monotonic() - start])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rows": rows, "peak": peak}))
"""


def test_bounded_time_and_memory_in_a_real_process(tmp_path):
    """One process answers the whole corpus (inspect and scan) with a bounded peak RSS: the zip
    bomb and the absurd lengths must not be inflated or allocated."""
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(Path(__file__).parent), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    slow = [row for row in report["rows"] if row[3] > 10]
    assert slow == []
    assert report["peak"] < 1.5 * 1024**3, report["peak"]

"""A mutation check of the safety-critical code: every guarantee must fail a test when its mechanism is removed.

Each entry of ``MUTANTS`` names one guarantee, the exact source text that implements it (which must
occur exactly once in its file) and a replacement that removes or weakens it. The script copies the
repository once into a temporary folder, then for each mutant: writes the mutated file into the copy,
runs only the test files listed for it there (``-x``: the first failure is enough), and puts the file
back. A mutant no test kills has survived: the guarantee is unguarded. A pattern that no longer
occurs exactly once means the code moved and the list must follow it.

Usage:
    python scripts/mutants.py                 # every mutant, then the table; exit 1 on a survivor
    python scripts/mutants.py --only range-start --only token-to-other-host
    python scripts/mutants.py --list          # the mutants and their test files, nothing run
    python scripts/mutants.py --markdown docs/mutants.md

Before the mutants run, the union of their test files runs once unmutated (``--no-baseline`` skips
it): a test that already fails would otherwise "kill" every mutant. Runs are sequential and single
process, so the whole list fits a 2-core machine in a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
                                 "*.egg-info", ".import_linter_cache")
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
# a failing or erroring test in pytest's short summary: "FAILED tests/x.py::test_y - AssertionError ..."
FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    pattern: str
    replacement: str
    guarantee: str
    tests: tuple[str, ...]


READER = ("tests/test_reader.py", "tests/test_properties.py")
PICKLE = ("tests/test_scan.py", "tests/test_scan_refusal.py", "tests/test_reader.py")
CONVERT = ("tests/test_convert.py",)
DOWNLOAD = ("tests/test_hub.py",)

MUTANTS: list[Mutant] = [
    # -- the safetensors header validator --------------------------------------------------------
    Mutant("st-unknown-dtype", "ckpt_tools/formats/safetensors.py",
           "    if dtype not in DTYPES:\n", "    if False:\n",
           "an unknown dtype is refused as an invalid checkpoint", READER),
    Mutant("st-size-vs-shape", "ckpt_tools/formats/safetensors.py",
           "    if offs[1] - offs[0] != expected:\n", "    if False:\n",
           "data_offsets must span exactly the bytes dtype and shape need", READER),
    Mutant("st-overlap", "ckpt_tools/formats/safetensors.py",
           "        if begin < position:\n", "        if False:\n",
           "tensors' data must not overlap", READER),
    Mutant("st-gap", "ckpt_tools/formats/safetensors.py",
           "        if begin > position:\n", "        if False:\n",
           "no gap between tensors' data", READER),
    Mutant("st-past-end", "ckpt_tools/formats/safetensors.py",
           "    if position > data_size:\n", "    if False:\n",
           "tensor data must not run past the end of the file", READER),
    Mutant("st-trailing-bytes", "ckpt_tools/formats/safetensors.py",
           "    if position < data_size:\n", "    if False:\n",
           "nothing after the last tensor", READER),
    Mutant("st-header-length", "ckpt_tools/formats/safetensors.py",
           "    if 8 + n > file_size:\n", "    if False:\n",
           "a header length past the end of the file is refused", READER),
    # -- the sharded index ------------------------------------------------------------------------
    Mutant("shard-dotdot", "ckpt_tools/sources.py",
           'if pure.is_absolute() or ".." in pure.parts or "\\\\" in shard:',
           'if pure.is_absolute() or "\\\\" in shard:',
           "a shard name with '..' cannot escape the index's folder", ("tests/test_reader.py", "tests/test_hostile.py")),
    Mutant("shard-absolute", "ckpt_tools/sources.py",
           'if pure.is_absolute() or ".." in pure.parts or "\\\\" in shard:',
           'if ".." in pure.parts or "\\\\" in shard:',
           "an absolute shard name cannot escape the index's folder", ("tests/test_reader.py", "tests/test_hostile.py")),
    # -- pickles: never run, the allow-list, the walker ------------------------------------------
    Mutant("inert-imports-nothing", "ckpt_tools/inert.py",
           "        if dotted not in self.placeholders:\n            self.placeholders[dotted] = placeholder_global(dotted)\n"
           "        return self.placeholders[dotted]",
           "        return super().find_class(module, name)",
           "a pickle is never executed: a global outside the stand-ins becomes an inert placeholder, never an import",
           ("tests/test_inert.py", "tests/test_scan_refusal.py", "tests/test_hostile.py")),
    Mutant("inert-hostile-refused", "ckpt_tools/inert.py",
           "    if hostile and not inert:\n        raise refusal(source, hostile)",
           "    if False:\n        raise refusal(source, hostile)",
           "a pickle naming code-running globals is refused unless the user opts in (inert)",
           ("tests/test_inert.py", "tests/test_scan_refusal.py", "tests/test_hostile.py")),
    Mutant("inert-code-globals", "ckpt_tools/inert.py",
           'status = "hostile" if is_code_global(module, name) else "not executed"',
           'status = "not executed"',
           "os.system, eval and the like count as hostile, not as data to read inertly",
           ("tests/test_inert.py", "tests/test_scan_refusal.py")),
    Mutant("allow-list", "ckpt_tools/pickle_safety.py",
           'return module.split(".")[0] not in blocked and f"{module}.{name}" in allowed',
           'return module.split(".")[0] not in blocked',
           "scan: a global outside torch's weights-only allow-list makes the file unsafe", PICKLE),
    Mutant("block-list", "ckpt_tools/pickle_safety.py",
           'return module.split(".")[0] not in blocked and f"{module}.{name}" in allowed',
           'return f"{module}.{name}" in allowed',
           "scan: a global of a blocked module (os, sys) is unsafe even when registered as safe", PICKLE),
    Mutant("walker-stack-global", "ckpt_tools/pickle_safety.py",
           "        if isinstance(module, str) and isinstance(name, str):\n"
           "            self.stack.append(self.add_global(module, name))",
           "        if isinstance(module, str) and isinstance(name, str):\n"
           "            self.stack.append(_Global(module, name))",
           "scan: a STACK_GLOBAL import (protocol 4+) is recorded", PICKLE),
    Mutant("walker-memo", "ckpt_tools/pickle_safety.py",
           "self.stack.append(self.memo.get(arg, _UNKNOWN))", "self.stack.append(_UNKNOWN)",
           "scan: a global fetched back from the memo still names the call it makes", PICKLE),
    Mutant("walker-reduce", "ckpt_tools/pickle_safety.py",
           'self.stack.append(self.call("REDUCE", self.pop()))', "self.stack.append(self.pop())",
           "scan: every REDUCE call is recorded with its callable", PICKLE),
    Mutant("zip-bomb", "ckpt_tools/pickle_safety.py",
           "info.file_size > BOMB_RATIO * max(info.compress_size, 1):", "False:",
           "a zip record that inflates absurdly is refused before torch inflates it",
           ("tests/test_scan.py", "tests/test_hostile.py")),
    Mutant("hostile-named", "ckpt_tools/inert.py",
           "f\"the pickle needs globals that safe (weights_only) loading refuses: {', '.join(hostile)}; they would run \"",
           "f\"the pickle needs globals that safe (weights_only) loading refuses; they would run \"",
           "a refused pickle is reported as hostile, naming every offending global",
           ("tests/test_scan.py", "tests/test_scan_refusal.py")),
    Mutant("zip-flag-bits", "ckpt_tools/pickle_safety.py",
           "        if info.flag_bits & (1 << bit):", "        if False:",
           "a zip record flagged encrypted or patched (read differently by a loader and a scanner) is refused",
           ("tests/test_hostile.py",)),
    Mutant("zip-local-header", "ckpt_tools/pickle_safety.py",
           "flags_differ = any((flags ^ info.flag_bits) & (1 << bit) for bit in (3, *SUSPICIOUS_FLAG_BITS))",
           "flags_differ = False",
           "a pickle record whose local header disagrees with the central directory (its flags) is refused",
           ("tests/test_hostile.py",)),
    Mutant("output-name", "ckpt_tools/fs.py",
           "    if promised is not None and promised != kind:", "    if False:",
           "an output's name never lies about its bytes (.pt never holds safetensors, nor the reverse)",
           ("tests/test_convert_cli.py",)),
    Mutant("selection-minority", "ckpt_tools/convert.py",
           "    if not total or selected / total >= MIN_SELECTED_FRACTION:", "    if True:",
           "convert refuses a state dict chosen by content that leaves most tensor bytes behind",
           ("tests/test_convert_cli.py",)),
    # -- verification after writing ---------------------------------------------------------------
    Mutant("convert-verify-bytes", "ckpt_tools/convert.py",
           "if not np.array_equal(data[begin:begin + want.size], want):", "if False:",
           "convert: every written byte is compared with its (cast) source", CONVERT),
    Mutant("convert-verify-header", "ckpt_tools/convert.py",
           "if {n: (m.shape, m.dtype) for n, m in metas.items()} != "
           "{n: (m.shape, m.dtype) for n, m in expected.items()}:",
           "if False:",
           "convert: the written header lists exactly the planned tensors", CONVERT),
    Mutant("convert-verify-call", "ckpt_tools/convert.py",
           "                if self.verify:\n", "                if False:\n",
           "convert: every written file is reopened and verified before it is kept", CONVERT),
    Mutant("remap-verify-bytes", "ckpt_tools/remap_file.py",
           "if not torch.equal(_raw_bytes(a), _raw_bytes(b)):", "if False:",
           "remap (pickle): every rewritten tensor is compared with its source, bit for bit",
           ("tests/test_convert.py",)),
    Mutant("remap-verify-call", "ckpt_tools/remap_file.py",
           "            _verify_remapped(checkpoint, handle.path, remap.mapping, want, options, wrapper, shown=str(dst))\n",
           "",
           "remap (pickle): the written file is reopened and verified before it is kept",
           ("tests/test_convert.py",)),
    Mutant("remap-verify-listing", "ckpt_tools/remap_file.py",
           "\n        if {n: (m.shape, m.dtype) for n, m in written.metas().items()} != want:", "\n        if False:",
           "remap (pickle): the written file lists exactly the remapped names, shapes and dtypes",
           ("tests/test_convert.py",)),
    Mutant("remap-copy-verify-listing", "ckpt_tools/remap_file.py",
           "\n            if {n: (m.shape, m.dtype) for n, m in written.metas().items()} != want:",
           "\n            if False:",
           "remap (torch-free): the written file lists exactly the remapped names, shapes and dtypes",
           ("tests/test_convert.py",)),
    Mutant("remap-copy-verify-bytes", "ckpt_tools/remap_file.py",
           "if isinstance(copied, FileRange) and not ranges_equal(", "if False and not ranges_equal(",
           "remap (torch-free): every copied storage is compared with its source, byte for byte",
           ("tests/test_torch_free.py",)),
    Mutant("range-record-fits", "ckpt_tools/hub/ranges.py",
           "        return record if record.fits(expect, partial_size) else None", "        return record",
           "resume: a range record that does not fit its partial file is not trusted",
           ("tests/test_hub_ranges.py",)),
    Mutant("torch-zip-crc", "ckpt_tools/formats/torch_pickle.py",
           "            if crc32_range(self._storages.path, offset, size) != crc:",
           "            if False:",
           "convert/remap: a storage record whose bytes fail its CRC-32 is refused before anything is written",
           ("tests/test_convert.py",)),
    Mutant("cast-overflow", "ckpt_tools/safetensors_writer.py",
           "    if not cast.is_floating_point() or bool(torch.isfinite(cast).all()):\n        return",
           "    return",
           "convert: a cast that turns finite values into Inf (fp32 1e5 as F16) is refused",
           ("tests/test_convert.py",)),
    Mutant("dcp-chunk-identity", "ckpt_tools/formats/dcp.py",
           "        found = self._stored.get((entry.fqn, chunk))",
           "        found = next((v for (_, c), v in self._stored.items() if c == chunk), None)",
           "DCP: chunks of different tensors that look alike (torch's safetensors serialization) keep their "
           "own bytes", ("tests/test_dcp.py",)),
    Mutant("load-nonfinite", "ckpt_tools/stats.py",
           "return () if allow_nonfinite else (FINITE,)", "return ()",
           "load: a NaN or Inf in a loaded tensor fails the verdict unless allowed",
           ("tests/test_load.py",)),
    Mutant("load-verify-values", "ckpt_tools/load.py",
           "            if not same(current, entry.ckpt_key):\n", "            if False:\n",
           "load: every tensor in the model equals its checkpoint source after the load", ("tests/test_load.py",)),
    Mutant("load-verify-ties", "ckpt_tools/load.py",
           "elif not all(_current(model, n) is current for n in entry.names[1:]):", "elif False:",
           "load: tied names still share one tensor after the load", ("tests/test_load.py",)),
    Mutant("load-verify-tie-conflicts", "ckpt_tools/load.py",
           "conflicts = [k for k in entry.also if not same(current, k)]", "conflicts = []",
           "load: a checkpoint holding other values under a tied tensor's other name is reported",
           ("tests/test_load.py",)),
    # -- downloads --------------------------------------------------------------------------------
    Mutant("download-sha256", "ckpt_tools/hub/transfer.py",
           "if expect.sha256 is not None and digest != expect.sha256:", "if False:",
           "download: the bytes' sha256 must equal the promised one", DOWNLOAD),
    Mutant("download-git-sha1", "ckpt_tools/hub/transfer.py",
           "if self.sha1 is not None and self.sha1.hexdigest() != expect.git_sha1:", "if False:",
           "download: a small file's git blob sha1 must equal its ETag", DOWNLOAD),
    Mutant("download-bad-partial-removed", "ckpt_tools/hub/transfer.py",
           "        discard()\n",
           "",
           "download: bytes that failed verification are deleted, never a resume point", DOWNLOAD),
    Mutant("range-start", "ckpt_tools/hub/transfer.py",
           "return match is not None and int(match[1]) == self.offset and \\",
           "return match is not None and \\",
           "resume: a 206 is accepted only when its Content-Range starts where the partial file ends", DOWNLOAD),
    Mutant("range-check-call", "ckpt_tools/hub/transfer.py",
           'elif resp.status_code == 206 and not self._range_ok(resp.headers.get("Content-Range")):',
           "elif False:",
           "resume: a 206 with an unexpected Content-Range is refused at once", DOWNLOAD),
    Mutant("token-to-other-host", "ckpt_tools/hub/transfer.py",
           '            headers.pop("authorization", None)  # a signed CDN URL must not see the token\n',
           "            pass\n",
           "download: the token never goes to another host (a CDN redirect)", DOWNLOAD),
    Mutant("token-kept-on-the-hub", "ckpt_tools/hub/transfer.py",
           '        if not same_host:\n            headers.pop("authorization", None)',
           '        if True:\n            headers.pop("authorization", None)',
           "download: the token still goes to the hub itself (a private repo)", DOWNLOAD),
    Mutant("lock-differs", "ckpt_tools/hub/plan.py",
           "        if differs:\n", "        if False:\n",
           "download --locked: a server whose file differs from the lock is refused before any byte", DOWNLOAD),
    # -- atomic writers ---------------------------------------------------------------------------
    Mutant("atomic-file-in-place", "ckpt_tools/fs.py",
           "            self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)\n",
           "            self.fd = os.open(self.final, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)\n",
           "a file appears under its name only once committed (never half-written)",
           ("tests/test_fs.py", "tests/test_convert.py", "tests/test_interrupt.py")),
    Mutant("atomic-file-named-discard", "ckpt_tools/fs.py",
           "        if self._named is not None:\n            self._named.unlink(missing_ok=True)\n",
           "        if False:\n            self._named.unlink(missing_ok=True)\n",
           "a discarded file leaves no temporary behind (where the filesystem has no O_TMPFILE)",
           ("tests/test_fs.py", "tests/test_convert.py", "tests/test_interrupt.py")),
    Mutant("atomic-folder-discard", "ckpt_tools/fs.py",
           "    def discard(self) -> None:\n        if self.path is not None:\n"
           "            shutil.rmtree(self.path, ignore_errors=True)\n",
           "    def discard(self) -> None:\n        if self.path is not None:\n"
           "            pass\n",
           "a discarded folder leaves no staging folder behind", ("tests/test_convert.py", "tests/test_interrupt.py")),
    Mutant("atomic-folder-keeps-others", "ckpt_tools/fs.py",
           "            _link_entries(self.final, self.path, self.replaced)\n", "",
           "replacing a folder keeps the files the new output does not claim",
           ("tests/test_convert.py", "tests/test_interrupt.py")),
    # -- the chunked cast -------------------------------------------------------------------------
    Mutant("chunks-contiguous", "ckpt_tools/safetensors_writer.py",
           "        for start in range(0, flat.numel(), step):\n",
           "        for start in range(0, min(flat.numel(), step), step):\n",
           "a large contiguous tensor is written whole, one bounded chunk at a time", CONVERT),
    Mutant("chunks-strided", "ckpt_tools/safetensors_writer.py",
           "    for start in range(0, tensor.shape[0], step):\n",
           "    for start in range(0, min(tensor.shape[0], step), step):\n",
           "a large strided tensor is written whole, a few rows at a time", CONVERT),
    # -- remap rules ------------------------------------------------------------------------------
    Mutant("strip-leading-only", "ckpt_tools/remap.py",
           "return key[len(args[0]):] if key.startswith(args[0]) else key",
           'return key.replace(args[0], "")',
           "strip_prefix removes a leading prefix only, never the same text inside a key",
           ("tests/test_remap.py", "tests/test_properties.py")),
]


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | SURVIVED | error
    killed_by: str
    seconds: float


def check_patterns(root: Path, mutants: list[Mutant]) -> list[str]:
    problems = []
    for m in mutants:
        count = (root / m.file).read_text().count(m.pattern)
        if count != 1:
            problems.append(f"{m.name}: the pattern occurs {count} times in {m.file} (must be exactly once)")
        if m.pattern == m.replacement:
            problems.append(f"{m.name}: the replacement is the pattern")
    return problems


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "CI": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *PYTEST, *tests], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return done.returncode, done.stdout + done.stderr


def first_failure(output: str) -> str:
    match = FAILURE.search(output)
    return match[2] if match else "(no FAILED line; see the output)"


def run_mutant(copy: Path, m: Mutant, timeout: float) -> Outcome:
    target = copy / m.file
    original = target.read_text()
    target.write_text(original.replace(m.pattern, m.replacement, 1))
    started = time.monotonic()
    try:
        code, output = run_tests(copy, m.tests, timeout)
    finally:
        target.write_text(original)
    seconds = time.monotonic() - started
    if code == 0:
        return Outcome(m, "SURVIVED", "-", seconds)
    if code == 1:
        return Outcome(m, "killed", first_failure(output), seconds)
    # 2: interrupted (a collection error), 3-5: pytest itself failed, -1: timeout
    tail = " / ".join(output.strip().splitlines()[-3:])  # one line: it goes into a table cell
    return Outcome(m, "error", f"pytest exit {code}: {tail}", seconds)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | guarantee | killed by |", "|---|---|---|"]
    for o in outcomes:
        verdict = f"`{o.killed_by}`" if o.status == "killed" else f"**{o.status}** {o.killed_by}".rstrip(" -")
        lines.append(f"| `{o.mutant.name}` ({o.mutant.file}) | {o.mutant.guarantee} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test files")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pytest run (default 300)")
    parser.add_argument("--markdown", type=Path, help="also write the table, the command and the date here")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant {unknown[0]!r}; --list shows them")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:30} {m.file:38} {' '.join(m.tests)}\n{'':30} {m.guarantee}")
        return 0
    problems = check_patterns(ROOT, chosen)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckpt-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORED, symlinks=True)
        if not args.no_baseline:
            files = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            code, output = run_tests(copy, files, args.timeout * 3)
            if code != 0:
                print(f"the unmutated tests fail (exit {code}); fix them first:\n{output[-3000:]}", file=sys.stderr)
                return 1
            print(f"baseline: {len(files)} test files pass unmutated", flush=True)
        outcomes = []
        for m in chosen:
            outcome = run_mutant(copy, m, args.timeout)
            outcomes.append(outcome)
            print(f"{m.name:30} {outcome.status:9} {outcome.seconds:6.1f} s  {outcome.killed_by}", flush=True)
    elapsed = time.monotonic() - started

    survived = [o for o in outcomes if o.status != "killed"]
    summary = (f"{len(outcomes)} mutants: {len(outcomes) - len(survived)} killed, "
               f"{sum(o.status == 'SURVIVED' for o in outcomes)} survived, "
               f"{sum(o.status == 'error' for o in outcomes)} errors ({elapsed:.0f} s)")
    print()
    print(table(outcomes))
    print()
    print(summary)
    if args.markdown is not None:
        command = "python scripts/mutants.py" + "".join(f" --only {n}" for n in args.only)
        args.markdown.write_text(
            f"# Mutation check\n\n`{command}` on {datetime.date.today().isoformat()}: {summary}.\n\n"
            "Each mutant removes or weakens one safety mechanism in a temporary copy of the repository and "
            "runs only the listed test files there; \"killed by\" is the first test that failed. "
            "See `scripts/mutants.py` for the exact patterns and test files.\n\n" + table(outcomes) + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

"""Print the compatibility table of training-framework checkpoints as markdown.

Builds the checkpoint zoo of tests/zoo.py in a temporary folder (each framework's own save where it
is installed, else a reproduction of its save code), reads every case with ``inspect_checkpoint``
and prints one row per framework: who wrote it, which version, the file a user passes, what the
reader selects, what it lists beside it, and whether that matches what the zoo says the file holds.
The zoo's frameworks come with ``pip install -e '.[zoo]'`` (or ``.[test]``).

Example:
    .venv/bin/python scripts/zoo_table.py > docs/zoo.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402

from ckpt_tools import inspect_checkpoint  # noqa: E402
from ckpt_tools.errors import CkptError  # noqa: E402
from ckpt_tools.render import markdown_table  # noqa: E402

HEADERS = ["framework", "version", "file", "selected", "listed beside it", "as expected"]


def _code(items) -> str:
    return ", ".join(f"`{item}`" for item in items) or "nothing"


def _top_level(extras: dict[str, str]) -> list[str]:
    """The top-level names among the report's dotted extras, in file order."""
    return list(dict.fromkeys(name.split(".")[0] for name in extras))


def _file(case: zoo.ZooCase, root: Path) -> str:
    relative = str(case.path.relative_to(root / case.name))
    return relative + "/" if case.is_folder else relative


def _tensors(count: int) -> str:
    return f"{count} tensor" + ("" if count == 1 else "s")


def _where(case: zoo.ZooCase, wrapper: str | None, chosen_file: str | None) -> str:
    if case.is_folder:  # the file chosen in the folder; reports that do not name it get a plain note
        return f"`{Path(chosen_file).name}`" if chosen_file else "a file (not named)"
    return f"`{wrapper}`" if wrapper else "the root object"


def row(case: zoo.ZooCase, root: Path) -> list[str]:
    """One table row; a refusal is a row too, with the reader's own reason."""
    head = [case.framework, case.version, f"`{_file(case, root)}`"]
    try:
        report = inspect_checkpoint(case.path)
    except CkptError as exc:
        return head + [f"refused: {exc.message.split(';')[0]}", "", "no"]
    facts = report.to_dict()
    selection = facts.get("selection", {})
    selected = _where(case, report.wrapper, selection.get("file"))
    listed = []
    if selection.get("alternatives"):
        listed.append("alternatives: " + _code(a["path"] for a in selection["alternatives"]))
    if report.extras:
        listed.append("extras: " + _code(_top_level(report.extras)))
    if facts.get("not_executed"):
        listed.append("not executed: " + _code(facts["not_executed"]))
    if facts.get("other_files"):
        listed.append("other files: " + _code(facts["other_files"]))
    wanted_where = case.selected if not case.is_folder else None
    expected = sorted(report.tensors) == sorted(case.state) and report.wrapper == wanted_where
    return head + [f"{selected} ({_tensors(len(report.tensors))})", "; ".join(listed) or "nothing",
                   "yes" if expected else f"no: expected `{case.selected}` ({_tensors(len(case.state))})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(zoo.BUILDERS), help="build these cases only")
    parser.add_argument("--timings", action="store_true", help="print each build's seconds to stderr")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckpt-zoo-") as tmp:
        root = Path(tmp)
        rows = []
        for name in args.only or list(zoo.BUILDERS):
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # frameworks print progress; stdout is the table
                case = zoo.build_zoo(root, [name])[name]
            if args.timings:
                print(f"built {name} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
            rows.append(row(case, root))
    print(markdown_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

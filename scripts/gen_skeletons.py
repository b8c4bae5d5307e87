"""Write each model preset's skeleton key listing as package data, so a key diff against a preset
builds no model and imports neither torch, transformers nor open_clip.

For every preset registered under ``ckpt_tools.models`` whose ``listing`` is a file path (the
OpenFlamingo ones: ``model/data/skeletons/NAME.json``), the preset's skeleton is built on the meta
device and its listing (names, shapes, dtypes, trained names, names that are one tensor, what the
model re-creates) is written there, with the library versions it was built with.
``tests/test_skeleton_data.py`` checks the shipped files against freshly built skeletons: rerun
this script when a preset or a library it builds with changes.

Example:
    .venv/bin/python scripts/gen_skeletons.py                 # every preset with a listing path
    .venv/bin/python scripts/gen_skeletons.py openflamingo-tiny
    .venv/bin/python scripts/gen_skeletons.py --check         # exit 1 when a shipped listing is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ckpt_tools.fs import atomic_write
from ckpt_tools.presets import available_presets
from ckpt_tools.skeleton import to_json
from ckpt_tools.targets import preset_side

BUILT_WITH = ("torch", "transformers", "open_clip_torch")


def built_with() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in BUILT_WITH:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def listing_text(preset) -> str:
    """The listing of the preset's built skeleton as JSON text, one tensor per line (readable diffs)."""
    data = to_json(preset_side(preset, cached=False))
    data["built_with"] = built_with()
    lines = ["{"]
    for key, value in data.items():
        if key == "tensors":
            rows = [f"    {json.dumps(name)}: {json.dumps(meta)}" for name, meta in value.items()]
            lines.append('  "tensors": {\n' + ",\n".join(rows) + "\n  },")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines) + "\n}\n"


def shipped(names: list[str]) -> dict:
    presets = available_presets()
    unknown = sorted(set(names) - set(presets))
    if unknown:
        raise SystemExit(f"unknown presets: {', '.join(unknown)}")
    chosen = {n: p for n, p in presets.items() if (not names or n in names)}
    return {n: p for n, p in chosen.items() if isinstance(p.listing, str | Path)}


def same_listing(text: str, path: Path) -> bool:
    """Equal apart from the library versions recorded (a version bump that changes no key is not stale)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    new = json.loads(text)
    old.pop("built_with", None)
    new.pop("built_with", None)
    return old == new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="presets to write (default: every one with a listing path)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a shipped listing is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, preset in shipped(args.names).items():
        path = Path(preset.listing)
        text = listing_text(preset)
        if same_listing(text, path):
            print(f"{name}: up to date ({path})")
            continue
        stale.append(name)
        if not args.check:
            atomic_write(path, text.encode("utf-8"))
        print(f"{name}: {'stale' if args.check else 'written'} ({path})")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

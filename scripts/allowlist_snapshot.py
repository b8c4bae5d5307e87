"""Write the installed torch's weights-only allow-list into the snapshot ``ckpt scan`` ships.

``ckpt scan`` judges a pickle's globals against the allow-list of ``torch.load(weights_only=True)``.
Reading that list means importing torch (seconds), so the package ships it as data, one entry per
torch version (``ckpt_tools/data/weights_only_allowlist.json``). This script adds or replaces the
entry of the installed version with what a fresh ``import torch`` registers; entries of other
versions are kept. Run it after upgrading torch (``tests/test_scan.py`` fails until then, and scans
read torch itself meanwhile).

Example:
    .venv/bin/python scripts/allowlist_snapshot.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ckpt_tools.pickle_safety import ALLOWLIST_SNAPSHOT, installed_torch_version, live_allow_list  # noqa: E402

SNAPSHOT = REPO / "ckpt_tools" / ALLOWLIST_SNAPSHOT


def main() -> int:
    version = installed_torch_version()
    if version is None:
        print("torch is not installed: nothing to snapshot", file=sys.stderr)
        return 1
    allowed, blocked = live_allow_list()  # this process imported nothing else of torch's before
    data = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
    versions = data.get("versions", {})
    versions[version] = {"allowed": sorted(allowed), "blocked": list(blocked)}
    data = {"written_by": "scripts/allowlist_snapshot.py",
            "versions": {v: versions[v] for v in sorted(versions)}}
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{SNAPSHOT.relative_to(REPO)}: torch {version}, {len(allowed)} allowed globals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runs ``ckpt`` commands in forked children and kills them at chosen moments.

Importing torch and the CLI once and forking per run makes each interrupted run cost a fraction of
a second instead of a fresh interpreter, so many kill points fit in a short test. The parent never
runs torch code (a fork after thread pools start is unsafe); checking the results is left to the
caller. Usage: ``python interrupt_driver.py PLAN.json`` where the plan is
``{"runs": [{"args": [...], "delay": seconds or null, "signal": "KILL"|"INT"|null}]}`` (or
``"fraction"`` instead of ``"delay"``: that fraction of the first run's duration); prints one
JSON line ``{"results": [{"exit": code, "signal": n or null, "elapsed": s, "stderr": text}]}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time


def _child(args: list[str], stderr_path: str) -> None:
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    from ckpt_tools.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stderr.flush()
    os._exit(code)


def run(plan: dict) -> list[dict]:
    import torch  # noqa: F401

    import ckpt_tools.cli  # noqa: F401 - imported once, before forking
    import ckpt_tools.convert  # noqa: F401
    import ckpt_tools.reader  # noqa: F401

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for number, item in enumerate(plan["runs"]):
            stderr_path = os.path.join(scratch, f"{number}.err")
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(item["args"], stderr_path)
            if item.get("fraction") is not None:
                item["delay"] = item["fraction"] * results[0]["elapsed"]
            if item.get("delay") is not None:
                time.sleep(item["delay"])
                try:
                    os.kill(pid, getattr(signal, "SIG" + item["signal"]))
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(pid, 0)
            try:
                with open(stderr_path, encoding="utf-8", errors="replace") as handle:
                    stderr = handle.read()
            except FileNotFoundError:  # killed before the child opened it
                stderr = ""
            results.append({
                "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "elapsed": time.monotonic() - start, "stderr": stderr[-2000:], "delay": item.get("delay"),
            })
    return results


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        print(json.dumps({"results": run(json.load(handle))}))

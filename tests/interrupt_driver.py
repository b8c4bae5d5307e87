"""Runs ``ckpt`` commands in forked children and kills them at chosen moments.

Importing torch and the CLI once and forking per run makes each interrupted run cost a fraction of
a second instead of a fresh interpreter, so many kill points fit in a short test. The parent never
runs torch code (a fork after thread pools start is unsafe); checking the results is left to the
caller. Delays count from the moment the child is about to call the CLI: a signal that landed
during the fork itself would hit the driver's code, not the command under test. Usage: ``python interrupt_driver.py PLAN.json`` where the plan is
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


def _child(args: list[str], stderr_path: str, ready: int) -> None:
    """Never returns: the child must not run the driver's own code (or its cleanup) after fork."""
    code = 1
    try:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        from ckpt_tools.cli import main

        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.write(ready, b"1")
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        import traceback

        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def run(plan: dict) -> list[dict]:
    import torch  # noqa: F401

    import ckpt_tools.cli  # noqa: F401 - imported once, before forking
    import ckpt_tools.convert  # noqa: F401
    import ckpt_tools.formats  # noqa: F401

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for number, item in enumerate(plan["runs"]):
            stderr_path = os.path.join(scratch, f"{number}.err")
            read_end, write_end = os.pipe()
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the child unblocks it when ready
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _child(item["args"], stderr_path, write_end)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            os.close(write_end)
            os.read(read_end, 1)  # empty if the child died before it was ready
            os.close(read_end)
            start = time.monotonic()
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

"""Download progress: a rich bar on stderr, only on a terminal unless asked for; one row per file,
whatever the number of connections it uses (so its rate is the file's aggregate rate)."""

from __future__ import annotations

import sys


class Progress:
    """A rich progress bar on stderr (only on a terminal unless asked for)."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, name: str, total: int | None, done: int):
        return self._bar.add_task(name, total=total, completed=done) if self._bar is not None else None

    def advance(self, task, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(task, n)

    def remove(self, task) -> None:
        if self._bar is not None:
            self._bar.remove_task(task)

    def note(self, text: str) -> None:
        """A line on stderr (above the bar when there is one), whether or not the bar is shown."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

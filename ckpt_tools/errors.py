"""One error hierarchy for the toolkit.

Every error carries the file (``path``) and, where relevant, the ``key`` it is about, and a
``fix`` the user can act on. Each class also subclasses the matching built-in so callers can catch
``FileNotFoundError`` or ``ValueError`` without knowing this module. The CLI turns any of them
into one line on stderr and ``exit_code`` (2 unless a subclass says otherwise).
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class: a problem with user input that the user can fix."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 fix: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.key = key
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}:")
        if self.key is not None:
            parts.append(f"key '{self.key}':")
        parts.append(self.message.rstrip("."))
        line = " ".join(parts)
        if self.fix:
            line += f"; fix: {self.fix}"
        return line.replace("\n", " ")

    def located(self, path) -> CkptError:
        """This error, naming ``path`` when it names no file yet (raised by code that knew only a key)."""
        if self.path is None:
            self.path = str(path)
            self.args = (self.one_line(),)
        return self

    def __str__(self) -> str:
        return self.one_line()


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """The file, folder or shard does not exist."""


class InvalidCheckpointError(CkptError, ValueError):
    """The file exists but is not a readable checkpoint (truncated, corrupt, wrong layout)."""


class UnsupportedFormatError(CkptError, ValueError):
    """No registered format recognises the input."""


class UnsafePickleError(CkptError, ValueError):
    """A pickle needs globals that the weights-only loader refuses; it is never executed."""

    def __init__(self, message: str, *, globals_: list[str] | None = None, **kw) -> None:
        self.globals = list(globals_ or [])
        super().__init__(message, **kw)


class RemapError(CkptError, ValueError):
    """Remap rules are invalid or map two keys onto one name."""


class OutputExistsError(CkptError, FileExistsError):
    """The destination exists and ``--force`` was not given, or it is the source itself."""


class UsageError(CkptError, ValueError):
    """Arguments that contradict each other or name something unknown (a preset, a dtype)."""


class HubError(CkptError, OSError):
    """The hub (or a mirror) refused or failed a request after retries."""


class DiskFullError(CkptError, OSError):
    """A write was refused for lack of room (disk full, quota, file size limit); nothing was kept
    under its final name."""


class IntegrityError(CkptError, ValueError):
    """Bytes differ from what was promised (hash, size, lock file). The check ran and failed."""

    exit_code = 1


class LoadRefusedError(CkptError, RuntimeError):
    """``load_checkpoint`` refused to load because the key report's verdict is ``fail``."""

    exit_code = 1

    def __init__(self, message: str, *, report=None, **kw) -> None:
        self.report = report
        super().__init__(message, **kw)


def foreign_message(exc: BaseException | str, limit: int = 160) -> str:
    """Another library's error message fit for one line: its first line, then its first sentence,
    then cut at a word boundary with an ellipsis, never mid-word or mid-sentence without saying so."""
    text = (str(exc).strip().splitlines() or [""])[0].strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    end = text.find(". ")
    if 0 < end < limit:
        return text[:end + 1]
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "…"

"""User-facing errors: one clear line (what was wrong, what to do), non-zero exit."""

from __future__ import annotations

import errno
import signal


class UserError(Exception):
    """Bad input from the user: printed as one line on stderr by ``run.py``, exit code 2."""


class DataError(UserError):
    """Missing or malformed data files."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded (usually: no network for a hub id)."""


class ConfigError(UserError):
    """A configuration value that composes but cannot be used."""


class RunDirError(UserError):
    """The run directory cannot take this run: another process holds it, it belongs to another
    configuration, or a file in it is damaged."""


class DiskFullError(UserError):
    """A write into the run directory failed for lack of space (or quota)."""


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run.

    A ``BaseException`` (as ``KeyboardInterrupt``) so that no ``except Exception`` on the way up
    swallows it. ``run.py`` prints its message as one line and exits with ``128 + signum``, the
    shell's convention for a process ended by that signal.

    Args:
        signum: the signal number.
        message: what happened and how the run continues (filled in by the runner).
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        super().__init__(message or f"{self.signal_name} received before editing started; "
                         "re-running the same command continues the run")

    @property
    def signal_name(self) -> str:
        """``SIGINT``, ``SIGTERM``, ... (the number when the platform has no name for it)."""
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """``128 + signum`` (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


#: errno values that mean "the disk (or the user's quota) is full".
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How libraries that do not raise ``OSError`` (safetensors' Rust writer) word the same failure.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28",
                    "os error 122")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) reports a full disk or quota."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False

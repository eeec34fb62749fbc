"""Progress bars (tqdm, on stderr) and the log lines that share the terminal with them.

On a terminal a bar redraws in place and log lines are printed above it
(:func:`logs_above_bars`), so the two never mix on one line. Written to a file (a SLURM job's
output), a bar would add a line at every refresh: there the editing bar writes one line a minute
and the short-lived evaluation bars are left out.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")

#: Seconds between redraws written to a file (tqdm's default on a terminal: 0.1).
FILE_INTERVAL_S = 60.0


def on_terminal() -> bool:
    """Whether stderr (where the bars go) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: int, desc: str, unit: str, enabled: bool, transient: bool = False,
        initial: int = 0) -> tqdm:
    """A bar of ``total`` steps labelled ``desc``.

    Args:
        enabled: False gives a bar that draws nothing (the calls still work).
        transient: erased when closed, and drawn only on a terminal (an evaluation's bar).
        initial: steps already done (a resumed run).
    """
    terminal = on_terminal()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                leave=not transient, disable=not enabled or (transient and not terminal),
                mininterval=0.1 if terminal else FILE_INTERVAL_S)


def iterate(items: Iterable[T], total: int, desc: str | None, unit: str = "batch"
            ) -> Iterator[T]:
    """``items`` with a transient bar labelled ``desc`` (``None``: no bar)."""
    if desc is None:
        yield from items
        return
    with bar(total, desc, unit, enabled=True, transient=True) as progress:
        for item in items:
            yield item
            progress.update(1)


@contextlib.contextmanager
def logs_above_bars(enabled: bool = True) -> Iterator[None]:
    """Route the root logger's console lines through ``tqdm.write`` while bars may be drawn.

    File handlers (Hydra's run.log) are left as they are; without a console handler (logging
    not configured) nothing changes, so that no console output appears that was not there.
    """
    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.getLogger().handlers)
    if not (enabled and console):
        yield
        return
    with logging_redirect_tqdm():
        yield

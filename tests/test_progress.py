"""Progress bars and log lines (btp.progress): log lines go above the bars, evaluation bars only
on a terminal, nothing added where logging has no console handler."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from tqdm.contrib.logging import _TqdmLoggingHandler

from btp import progress


@pytest.fixture()
def root_handlers():
    """The root logger's handlers, put back after the test."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield root
    root.handlers, root.level = saved, level


def test_log_lines_go_through_tqdm_write_while_bars_may_be_drawn(root_handlers,
                                                                 monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root_handlers.handlers = [console]
    root_handlers.setLevel(logging.INFO)
    with progress.logs_above_bars():
        (handler,) = root_handlers.handlers
        assert isinstance(handler, _TqdmLoggingHandler) and handler.stream is stream
        logging.getLogger("btp.test").info("between two bar updates")
    assert root_handlers.handlers == [console]
    assert stream.getvalue() == "[INFO] between two bar updates\n"  # the console's format kept


def test_no_console_handler_no_console_output(root_handlers) -> None:
    """Without a console handler (logging not configured) nothing is added to the root logger."""
    file_like = logging.StreamHandler(io.StringIO())  # not stdout/stderr: a file-like handler
    root_handlers.handlers = [file_like]
    with progress.logs_above_bars():
        assert root_handlers.handlers == [file_like]
    with progress.logs_above_bars(enabled=False):
        assert root_handlers.handlers == [file_like]


@pytest.mark.parametrize("terminal", [True, False])
def test_evaluation_bars_only_on_a_terminal(monkeypatch, terminal: bool) -> None:
    stream = io.StringIO()
    stream.isatty = lambda: terminal  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress.iterate(iter(range(3)), 3, "eval upstream")) == [0, 1, 2]
    assert ("eval upstream" in stream.getvalue()) == terminal
    edits = progress.bar(4, "editing", "edit", enabled=True)  # the editing bar: also in a file
    edits.update(4)
    edits.close()
    assert "editing" in stream.getvalue()
    assert edits.mininterval == (0.1 if terminal else progress.FILE_INTERVAL_S)


def test_no_label_no_bar(monkeypatch) -> None:
    stream = io.StringIO()
    stream.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(progress.iterate(["a", "b"], 2, None)) == ["a", "b"]
    assert stream.getvalue() == ""

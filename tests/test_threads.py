"""The ``threads`` key: an explicit count is used as is; null takes the cores not busy now."""

from __future__ import annotations

import os

import pytest

from btp.runner import pick_threads


@pytest.mark.parametrize("cores,load,want", [(2, 0.1, 2), (2, 1.2, 1), (2, 7.5, 1), (16, 3.4, 13)])
def test_auto_threads_leave_the_busy_cores(monkeypatch, cores: int, load: float, want: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert pick_threads(None) == want


def test_explicit_threads_win(monkeypatch) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert pick_threads(3) == 3

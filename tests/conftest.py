"""Shared pytest fixtures. Keep each fixture small and documented; add new ones below."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The suite runs in parallel workers (pytest-xdist, ``addopts`` in pyproject.toml), one per core:
# OpenMP threads that spin while they wait would steal the other worker's core. Set before torch
# is first imported (here or in any subprocess a test starts).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Test files that take the longest, slowest first: each runs whole on one worker
#: (``--dist loadfile``), so starting them first keeps one long file from ending the suite alone.
#: Measured with ``--durations``; files not listed follow in their usual order.
SLOWEST_FILES = (
    "test_slurm.py", "test_runner_e2e.py", "test_baselines_e2e.py", "test_resume.py",
    "test_compare.py", "test_sweep.py", "test_lm_editors_e2e.py", "test_bad_input.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per xdist worker: two workers share the two cores of the CI machine."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the files of ``SLOWEST_FILES`` first, in that order (a stable sort: tests within a
    file keep their order, and every worker collects the same order, as xdist requires)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The shipped real data sample (``data/``), in the layout the loaders read."""
    return REPO_ROOT / "data"


#: The tiny stand-ins as model_cfg dicts, keyed by architecture.
TINY_MODEL_CFGS: dict[str, dict[str, Any]] = {
    "t5small": {"name": "tiny-t5small", "kind": "seq2seq", "tiny": {}},
    "t5large": {"name": "tiny-t5large", "kind": "seq2seq", "tiny": {}},
    "scotus-bert": {"name": "tiny-scotus-bert", "kind": "classification", "tiny": {},
                    "num_labels": 14},
    "gpt2xl": {"name": "tiny-gpt2xl", "kind": "causal_lm", "tiny": {}},
}


@pytest.fixture(scope="session")
def tiny_model() -> Callable[[str], tuple[Any, Any]]:
    """``tiny_model(arch) -> (model, tokenizer)``: a frozen tiny stand-in on CPU, built once per
    session (callers must not modify it; build your own with ``load_model_and_tokenizer`` if so).
    """
    from btp.models import load_model_and_tokenizer

    cache: dict[str, tuple[Any, Any]] = {}

    def get(arch: str) -> tuple[Any, Any]:
        if arch not in cache:
            cache[arch] = load_model_and_tokenizer(TINY_MODEL_CFGS[arch], "cpu")
        return cache[arch]

    return get


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: the machine's 2 cores are shared, and
    oversubscription made a 20-step edit of a tiny T5 take over a minute instead of ~2 s."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

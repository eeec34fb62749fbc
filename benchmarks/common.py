"""Shared measurement for the benchmarks: interleaved rounds, median ratio and spread, load.

A ratio of two timings taken one after the other moves with whatever else runs on the machine.
Here the two sides alternate (A, B, A, B, ...) after a warm-up, the ratio is taken per round and
its median and spread (min..max) are reported, with the machine's load average before and after:
a ratio measured while the load is above the core count is noise and says so.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("benchmarks")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_once(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` in seconds (the device synchronised around it)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Ratio:
    """Per-round ratios of A over B and the times behind them."""

    name: str
    ratios: list[float]
    a: list[float]
    b: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def describe(self) -> str:
        return (f"{self.name}: median {self.median:.3f} (min {min(self.ratios):.3f}, max "
                f"{max(self.ratios):.3f}, {len(self.ratios)} rounds); A median "
                f"{statistics.median(self.a) * 1e3:.1f} ms, B median {statistics.median(self.b) * 1e3:.1f} ms")


def interleaved(name: str, a: Callable[[], object], b: Callable[[], object], rounds: int,
                device: str, warmup: int = 1) -> Ratio:
    """Time ``a`` and ``b`` alternately for ``rounds`` rounds (after ``warmup`` of each)."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(rounds):
        # alternate which side goes first so that neither always follows the other
        if i % 2 == 0:
            ta.append(timed_once(a, device))
            tb.append(timed_once(b, device))
        else:
            tb.append(timed_once(b, device))
            ta.append(timed_once(a, device))
    result = Ratio(name, [x / y for x, y in zip(ta, tb)], ta, tb)
    log.info("%s", result.describe())
    return result


def load_line() -> str:
    """The 1-minute load average against the core count, flagged when the machine is busy."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = " (BUSY: ratios taken now are noise, measure again on an idle machine)" if load > cores else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


def setup(threads: int) -> None:
    """Logging, threads and denormal flushing as every benchmark uses them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)
    # With random weights an untied LM head gives huge logits whose gradients fill with
    # denormals; without flushing, one backward matmul can take 50x longer.
    torch.set_flush_denormal(True)
    log.info("torch %s, threads %d, OMP_WAIT_POLICY %s, flush_denormal on; %s", torch.__version__,
             torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "unset"), load_line())

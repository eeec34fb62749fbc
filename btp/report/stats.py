"""Seed statistics for the comparison report: cells, directions, order, and the bold rule."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from btp.report.runs import DB_STATS, Collection, Run, Skipped, is_number
from btp.tasks import TASKS

#: What each task's quality metrics measure and whether higher is better (its spec's
#: ``quality`` and ``higher_is_better``).
TASK_METRIC: dict[str, tuple[str, bool]] = {
    name: (spec.quality, spec.higher_is_better) for name, spec in TASKS.items()}
#: Summary keys that are never averaged as metrics.
NOT_METRICS = frozenset({"task", "alg", "model", "seed", "n_batches"})

#: Table order of tasks (their specs' ``table_rank``: the paper's SCOTUS, zsRE, hallucination, then
#: the decoder-LLM tasks) and of methods (baselines first, MELO last); anything unknown goes after
#: the known ones, alphabetically.
TASK_ORDER: tuple[str, ...] = tuple(sorted(TASKS, key=lambda name: TASKS[name].table_rank))
ALG_ORDER: tuple[str, ...] = ("ft", "ft_ewc", "plain_lora", "grace", "memit", "alphaedit", "wise",
                               "melo", "lora")

GroupKey = tuple[str, str, str]  # (task, model, method)
Kind = Literal["rate", "count", "nonnegative", "real"]


def higher_is_better(task: str, metric: str) -> bool | None:
    """Direction of ``metric`` on ``task``; None when unknown (no arrow, no bold)."""
    if metric == "locality":
        return True  # share of unedited behaviour kept
    if metric.startswith("edit_time"):
        return False
    if metric in DB_STATS or metric == "n_edits":
        return None
    quality = TASK_METRIC.get(task)
    if quality is None:
        return None
    if metric.endswith("_em"):
        return True  # exact match is a rate on every task that reports it
    return quality[1]


def metric_kind(task: str, metric: str) -> Kind:
    """The range of a metric's values: a rate in [0, 1], a count, another value >= 0, or any."""
    if metric in DB_STATS or metric == "n_edits":
        return "count"
    if metric == "locality" or metric.endswith("_em"):
        return "rate"
    if metric.startswith("edit_time"):
        return "nonnegative"
    spec = TASKS.get(task)
    return spec.quality_kind if spec is not None else "real"  # perplexity: nonnegative


def valid_range(kind: Kind) -> tuple[float, float]:
    """Where a metric of this kind can lie (bands are clipped to it)."""
    return {"rate": (0.0, 1.0), "count": (0.0, math.inf),
            "nonnegative": (0.0, math.inf)}.get(kind, (-math.inf, math.inf))


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


@dataclass(frozen=True)
class Cell:
    """Statistics of one metric over the runs of one cell.

    ``mean`` and ``std`` (sample standard deviation, NaN for n < 2) are over the ``n`` finite
    values; ``nonfinite`` counts the runs whose value was NaN or infinite (kept out of both).
    Runs where the metric is null or absent are not counted at all.
    """

    mean: float
    std: float
    n: int
    nonfinite: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, values: Iterable[object]) -> "Cell":
        finite: list[float] = []
        bad: Counter[str] = Counter()
        for value in values:
            if not is_number(value):
                continue  # null: the run could not compute it
            number = float(value)  # type: ignore[arg-type]
            if math.isfinite(number):
                finite.append(number)
            else:
                bad[_nonfinite_name(number)] += 1
        nonfinite = tuple(sorted(bad.items()))
        if not finite:
            return cls(math.nan, math.nan, 0, nonfinite)
        std = statistics.stdev(finite) if len(finite) > 1 else math.nan
        return cls(statistics.fmean(finite), std, len(finite), nonfinite)

    @property
    def empty(self) -> bool:
        """No run reported a value (finite or not)."""
        return self.n == 0 and not self.nonfinite

    @property
    def spread(self) -> float:
        """The std, or 0 where it is undefined (one run)."""
        return 0.0 if math.isnan(self.std) else self.std


def _rank(order: tuple[str, ...], name: str) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def _group_order(key: GroupKey, alg: str) -> tuple:
    task, model, method = key
    return (_rank(TASK_ORDER, task), model, _rank(ALG_ORDER, alg), method)


def seed_order(seed: int | str) -> tuple[int, int | str]:
    """Integers first, numerically; then any other seed labels."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))  # type: ignore[return-value]


def drop_duplicate_seeds(collection: Collection) -> None:
    """Keep one run per (task, model, method, seed); later ones become skipped duplicates.

    Two runs with the same seed (e.g. the same sweep given twice under different roots) would
    otherwise count twice and shrink the spread, so they are reported instead of averaged.
    """
    first: dict[tuple[str, str, str, object], Path] = {}
    kept: list[Run] = []
    for run in collection.runs:
        key = (run.task, run.model, run.method, run.seed)
        if key in first:
            collection.skipped.append(Skipped(run.path, f"duplicate seed {run.seed} of {first[key]}"))
        else:
            first[key] = run.path
            kept.append(run)
    collection.runs = kept


def group_runs(runs: list[Run]) -> dict[GroupKey, list[Run]]:
    """Runs per (task, model, method), in table order, each list sorted by seed."""
    groups: dict[GroupKey, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.task, run.model, run.method)].append(run)
    ordered = sorted(groups, key=lambda k: _group_order(k, groups[k][0].alg))
    return {key: sorted(groups[key], key=lambda r: seed_order(r.seed)) for key in ordered}


def metric_keys(runs: list[Run], first: Iterable[str] = ()) -> list[str]:
    """Numeric summary keys to aggregate: ``first`` (the table's columns) in order, then extras."""
    present: set[str] = set()
    for run in runs:
        present.update(k for k, v in run.summary.items() if k not in NOT_METRICS and is_number(v))
    ordered = [key for key in first if key in present]
    return ordered + sorted(present - set(ordered))


def aggregate(groups: dict[GroupKey, list[Run]], first: Iterable[str] = ()
              ) -> dict[GroupKey, dict[str, Cell]]:
    """Seed statistics of every metric for every group."""
    first = tuple(first)
    out: dict[GroupKey, dict[str, Cell]] = {}
    for key, runs in groups.items():
        out[key] = {m: Cell.of(r.summary.get(m) for r in runs) for m in metric_keys(runs, first)}
    return out


def best_beyond_spread(task: str, metric: str, cells: dict[GroupKey, Cell | None]
                       ) -> GroupKey | None:
    """The cell to set in bold in one column, or None.

    The best mean (by the metric's direction) is marked only when both it and the runner-up come
    from at least two runs and they are further apart than the sum of their standard deviations
    (their mean ± std intervals do not overlap): a difference inside the seed noise is not one.
    """
    direction = higher_is_better(task, metric)
    if direction is None:
        return None
    ranked = sorted(((key, cell) for key, cell in cells.items() if cell is not None and cell.n),
                    key=lambda kc: kc[1].mean, reverse=direction)
    if len(ranked) < 2:
        return None
    (best_key, best), (_, runner_up) = ranked[0], ranked[1]
    if best.n < 2 or runner_up.n < 2:
        return None
    if abs(best.mean - runner_up.mean) > best.spread + runner_up.spread:
        return best_key
    return None

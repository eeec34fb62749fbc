"""Seed statistics and the written tables (CSV long form, Markdown per task) for ``compare.py``."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from _compare_runs import Collection, Run, Skipped

#: The table's columns, in the MELO paper's Table 2 order, with their header labels.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TRR", "TRR"), ("ERR", "ERR"), ("ES", "ES"), ("holdout", "holdout"), ("ARR", "ARR"),
    ("locality", "locality"), ("edit_time_s", "edit time (s)"),
)
#: What the task's quality metrics measure and whether higher is better.
TASK_METRIC: dict[str, tuple[str, bool]] = {
    "qa": ("F1", True), "scotus": ("accuracy", True), "hallucination": ("perplexity", False),
}
#: Keys that are never averaged as metrics.
_NOT_METRICS = frozenset({"task", "alg", "model", "seed"})


def higher_is_better(task: str, metric: str) -> bool | None:
    """Direction of ``metric`` on ``task``; None when unknown (no arrow, no bold)."""
    if metric == "locality":
        return True  # share of unedited behaviour kept
    if metric.startswith("edit_time"):
        return False
    if metric in ("clusters", "conflicts", "forgotten", "n_edits"):
        return None
    quality = TASK_METRIC.get(task)
    if quality is None:
        return None
    if metric.endswith("_em"):
        return True  # exact match is a rate on every task that reports it
    return quality[1]


@dataclass(frozen=True)
class Cell:
    """Mean, sample standard deviation (NaN for n < 2) and number of runs of one metric."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Cell":
        clean = [float(v) for v in values if not math.isnan(float(v))]
        if not clean:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(clean) if len(clean) > 1 else math.nan
        return cls(statistics.fmean(clean), std, len(clean))


GroupKey = tuple[str, str, str]  # (task, model, method)

#: Table order of tasks and of methods (the paper's: SCOTUS, zsRE, hallucination; baselines first,
#: MELO last); anything unknown goes after the known ones, alphabetically.
TASK_ORDER: tuple[str, ...] = ("scotus", "qa", "hallucination")
ALG_ORDER: tuple[str, ...] = ("ft", "ft_ewc", "plain_lora", "grace", "melo", "lora")


def _rank(order: tuple[str, ...], name: str) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def _group_order(key: GroupKey, alg: str) -> tuple:
    task, model, method = key
    return (_rank(TASK_ORDER, task), model, _rank(ALG_ORDER, alg), method)


def drop_duplicate_seeds(collection: Collection) -> None:
    """Keep one run per (task, model, method, seed); later ones become skipped duplicates.

    Two runs with the same seed (e.g. the same sweep given twice under different roots) would
    otherwise count twice and shrink the spread, so they are reported instead of averaged.
    """
    first: dict[tuple[str, str, str, object], Path] = {}
    kept: list[Run] = []
    for run in collection.runs:
        key = (run.task, run.model, run.method, run.summary["seed"])
        if key in first:
            collection.skipped.append(
                Skipped(run.path, f"duplicate seed {run.summary['seed']} of {first[key]}"))
        else:
            first[key] = run.path
            kept.append(run)
    collection.runs = kept


def group_runs(runs: list[Run]) -> dict[GroupKey, list[Run]]:
    """Runs per (task, model, method), sorted by key and then seed."""
    groups: dict[GroupKey, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.task, run.model, run.method)].append(run)
    ordered = sorted(groups, key=lambda k: _group_order(k, str(groups[k][0].summary["alg"])))
    return {key: sorted(groups[key], key=lambda r: str(r.summary["seed"])) for key in ordered}


def metric_keys(runs: list[Run]) -> list[str]:
    """Numeric summary keys to aggregate: the table columns first, then extras (``*_em``...)."""
    present: set[str] = set()
    for run in runs:
        present.update(k for k, v in run.summary.items()
                       if k not in _NOT_METRICS and isinstance(v, (int, float))
                       and not isinstance(v, bool))
    ordered = [key for key, _ in TABLE_COLUMNS if key in present]
    return ordered + sorted(present - set(ordered))


def aggregate(groups: dict[GroupKey, list[Run]]) -> dict[GroupKey, dict[str, Cell]]:
    """Seed statistics of every metric for every group."""
    out: dict[GroupKey, dict[str, Cell]] = {}
    for key, runs in groups.items():
        out[key] = {m: Cell.of(r.summary[m] for r in runs if m in r.summary)
                    for m in metric_keys(runs)}
    return out


def write_csv(path: Path, groups: dict[GroupKey, list[Run]],
              cells: dict[GroupKey, dict[str, Cell]]) -> None:
    """Long form: one row per (task, model, method, metric)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "model", "method", "alg", "metric", "direction",
                         "mean", "std", "n", "seeds"])
        for key, by_metric in cells.items():
            task, model, method = key
            runs = groups[key]
            seeds = " ".join(str(r.summary["seed"]) for r in runs)
            for metric, cell in by_metric.items():
                direction = {True: "higher", False: "lower", None: ""}[
                    higher_is_better(task, metric)]
                writer.writerow([task, model, method, runs[0].summary["alg"], metric, direction,
                                 _num(cell.mean), _num(cell.std), cell.n, seeds])


def _num(value: float) -> str:
    return "" if math.isnan(value) else repr(round(value, 6))


def _fmt(value: float) -> str:
    """Compact number: perplexities and times can be large, F1/accuracy are in [0, 1]."""
    if math.isnan(value):
        return "–"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def _cell_text(cell: Cell | None) -> str:
    if cell is None or cell.n == 0:
        return "–"
    spread = "" if math.isnan(cell.std) else f" ± {_fmt(cell.std)}"
    return f"{_fmt(cell.mean)}{spread} (n={cell.n})"


def _md_escape(text: str) -> str:
    """Keep free text (error messages) from breaking a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _best(task: str, metric: str, cells: list[Cell | None]) -> float | None:
    """The best mean of a column (for bold), when the direction is known and >1 method exists."""
    direction = higher_is_better(task, metric)
    means = [c.mean for c in cells if c is not None and c.n > 0]
    if direction is None or len(means) < 2 or min(means) == max(means):
        return None  # nothing to single out
    return max(means) if direction else min(means)


def markdown(collection: Collection, groups: dict[GroupKey, list[Run]],
             cells: dict[GroupKey, dict[str, Cell]], plots: dict[tuple[str, str], list[str]],
             command: str | None = None) -> str:
    """The whole report: one Table-2-style table per (task, model), plots, skipped runs."""
    lines = ["# Method comparison", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += [
        "Cells: mean ± sample standard deviation over seeds (n = runs in the cell); "
        "↑ higher is better, ↓ lower is better; best mean per column in bold. "
        "Metrics are the final values of each run's `summary.json`.", "",
    ]
    for task, model in dict.fromkeys((t, m) for t, m, _ in groups):  # keeps group order
        keys = [k for k in groups if k[:2] == (task, model)]
        present = {m for k in keys for m, c in cells[k].items() if c.n > 0}
        columns = [(m, label) for m, label in TABLE_COLUMNS if m in present]
        quality = TASK_METRIC.get(task, ("?", None))[0]
        n_edits = sorted({int(r.summary["n_edits"]) for k in keys for r in groups[k]})
        lines += [f"## Task `{task}`, model `{model}`", "",
                  f"Quality metrics are {quality}; edits per run: "
                  f"{', '.join(map(str, n_edits))}.", ""]
        header = ["method"]
        for metric, label in columns:
            arrow = {True: " ↑", False: " ↓", None: ""}[higher_is_better(task, metric)]
            header.append(label + arrow)
        header.append("seeds")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        best = {m: _best(task, m, [cells[k].get(m) for k in keys]) for m, _ in columns}
        for key in keys:
            row = [key[2]]
            for metric, _ in columns:
                cell = cells[key].get(metric)
                text = _cell_text(cell)
                if cell is not None and cell.n > 0 and best[metric] is not None \
                        and cell.mean == best[metric]:
                    text = f"**{text}**"
                row.append(text)
            row.append(", ".join(str(r.summary["seed"]) for r in groups[key]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for name in plots.get((task, model), []):
            lines += [f"![{name}]({name})", ""]
    lines += ["## Skipped runs", ""]
    if collection.skipped:
        lines += ["| run directory | reason |", "|---|---|"]
        lines += [f"| `{s.path}` | {_md_escape(s.reason)} |" for s in collection.skipped]
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)

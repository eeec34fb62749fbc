"""Curves against the number of edits for ``compare.py`` (matplotlib, written as PNG)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from _compare_runs import CURVE_METRICS, DB_STATS, Run  # noqa: E402
from _compare_stats import GroupKey, higher_is_better  # noqa: E402

log = logging.getLogger("compare")


def seed_band(runs: list[Run], metric: str, band: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean curve and band over seeds for ``metric``, aligned on ``n_edits``.

    Runs are matched by the n_edits of their evaluations (the schedule is the same for every seed
    of a config); a point only some seeds reached averages those. ``band`` is ``"std"`` (mean ±
    sample std) or ``"minmax"``. Returns (x, mean, low, high) or None when no run logged it.
    """
    points: dict[float, list[float]] = {}
    for run in runs:
        for row in run.curve:
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not math.isnan(value):
                points.setdefault(float(row["n_edits"]), []).append(float(value))
    if not points:
        return None
    xs = np.array(sorted(points))
    mean = np.array([np.mean(points[x]) for x in xs])
    if band == "minmax":
        low = np.array([np.min(points[x]) for x in xs])
        high = np.array([np.max(points[x]) for x in xs])
    else:
        std = np.array([np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs])
        low, high = mean - std, mean + std
    return xs, mean, low, high


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _figure(groups: dict[GroupKey, list[Run]], task: str, metrics: tuple[str, ...], band: str,
            title: str, path: Path, colors: dict[str, str]) -> bool:
    """One subplot per metric, one line (+ band) per method; False when nothing to draw."""
    present = [m for m in metrics
               if any(seed_band(runs, m, band) is not None for runs in groups.values())]
    if not present:
        return False
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        for (_, _, method), runs in groups.items():
            curve = seed_band(runs, metric, band)
            if curve is None:
                continue
            xs, mean, low, high = curve
            color = colors[method]
            ax.plot(xs, mean, marker="o", markersize=3, color=color,
                    label=f"{method} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
        direction = {True: " ↑", False: " ↓", None: ""}[higher_is_better(task, metric)]
        ax.set_title(metric + direction)
        ax.set_xlabel("edits")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # edits are counts
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    legend: dict[str, object] = {}  # every method once, even one missing from the first panel
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center",
               ncol=min(6, max(1, len(legend))),
               fontsize="small", frameon=False)
    band_text = "min/max" if band == "minmax" else "±1 std"
    fig.suptitle(f"{title} (band: {band_text} over seeds)")
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return True


def plot_all(groups: dict[GroupKey, list[Run]], out_dir: Path, band: str = "std"
             ) -> dict[tuple[str, str], list[str]]:
    """Write the metric and database plots of every (task, model); returns file names per key."""
    written: dict[tuple[str, str], list[str]] = {}
    for task, model in dict.fromkeys((t, m) for t, m, _ in groups):
        subset = {k: v for k, v in groups.items() if k[:2] == (task, model)}
        stem = f"{_slug(task)}_{_slug(model)}"
        names = []
        # One color per method across both figures of this task.
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        colors = {key[2]: cycle[i % len(cycle)] for i, key in enumerate(subset)}
        if _figure(subset, task, CURVE_METRICS, band, f"{task} / {model}: metrics vs edits",
                   out_dir / f"{stem}_metrics.png", colors):
            names.append(f"{stem}_metrics.png")
        # Methods without a database report zeros; leave them out so the lines that matter show.
        with_db = {k: v for k, v in subset.items()
                   if any(row.get(stat) for run in v for row in run.curve for stat in DB_STATS)}
        if _figure(with_db, task, DB_STATS, band, f"{task} / {model}: vector database vs edits",
                   out_dir / f"{stem}_database.png", colors):
            names.append(f"{stem}_database.png")
        written[(task, model)] = names
    return written

"""Figures for the comparison report (matplotlib, written as PNG and PDF).

Every figure a report writes draws a method with the same colour, marker and line style
(:class:`StyleBook`; MELO and the four baselines keep theirs across reports), with hollow markers
so that methods with equal values stay visible. Rates (F1, accuracy, locality, exact match) are
drawn on [0, 1], counts from 0; bands over seeds are clipped to the metric's valid range. Values
measured on the batch just edited (ES, ES_alone) are points, one per evaluation, slightly
spread sideways per method, not lines: consecutive values come from different batches. The panels
of a figure share their x axis, with ticks on the evaluation points.

Figures per (task, model):

* ``<task>_<model>_metrics``: each metric against the number of edits, one series per method;
* ``<task>_<model>_database``: the vector database's clusters, conflicts and forgotten entries
  (methods that have one);
* ``<task>_<model>_ablation_<key>``: each final metric against a swept numeric hyperparameter,
  one line per method, as the MELO paper's ablation figures.

Only matplotlib's object API is used (no pyplot): nothing global changes, no display is needed.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from btp.report.runs import (CURVE_METRICS, DB_STATS, PER_BATCH_METRICS, Run, is_number,
                             normalize_value)
from btp.report.stats import (TASK_METRIC, Cell, GroupKey, Kind, higher_is_better,
                              metric_kind, valid_range)

log = logging.getLogger("btp.report")

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), with Tol's
#: wine in place of a yellow that is hard to see on white.
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
                            "#000000", "#882255")
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)),
                               (0, (1, 1)), (0, (8, 2)))
#: Slots of the eight methods, the same in every report.
FIXED_SLOTS: dict[str, int] = {"melo": 0, "grace": 1, "ft": 2, "ft_ewc": 3, "plain_lora": 4,
                               "wise": 5, "memit": 6, "alphaedit": 7}
DPI = 200
BAND_ALPHA = 0.12


@dataclass(frozen=True)
class Style:
    """How one method is drawn."""

    color: str
    marker: str
    linestyle: Any

    @classmethod
    def slot(cls, index: int) -> "Style":
        """The ``index``-th style; the first 8 differ in all three, later ones in marker/line."""
        turn = index // len(PALETTE)
        return cls(PALETTE[index % len(PALETTE)], MARKERS[(index + turn) % len(MARKERS)],
                   LINESTYLES[(index + 2 * turn) % len(LINESTYLES)])


class StyleBook:
    """One style per method label for every figure of a report.

    MELO and the baselines keep their slots; other labels (variants from a sweep) take the free
    slots in name order.
    """

    def __init__(self, labels: Iterable[str]):
        names = sorted(set(labels))
        self._slots: dict[str, int] = {n: FIXED_SLOTS[n] for n in names if n in FIXED_SLOTS}
        used = set(self._slots.values())
        free = (i for i in range(10_000) if i not in used)
        for name in names:
            if name not in self._slots:
                self._slots[name] = next(free)

    def __getitem__(self, label: str) -> Style:
        return Style.slot(self._slots[label])


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _save(fig: Figure, out_dir: Path, stem: str, formats: tuple[str, ...]) -> None:
    for fmt in formats:
        # No creation date in PDF metadata: regenerating the same report gives the same file.
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(out_dir / f"{stem}.{fmt}", dpi=DPI, metadata=metadata)
        log.info("wrote %s", out_dir / f"{stem}.{fmt}")


def seed_band(runs: list[Run], metric: str, band: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean curve and band over seeds for ``metric``, aligned on ``n_edits``.

    Runs are matched by the n_edits of their evaluations (the schedule is the same for every seed
    of a config); a point only some seeds reached averages those. Non-finite values are left
    out. ``band`` is ``"std"`` (mean ± sample std) or ``"minmax"``. Returns (x, mean, low, high),
    not clipped, or None when no run logged a finite value.
    """
    points: dict[float, list[float]] = {}
    for run in runs:
        for row in run.curve:
            value = row.get(metric)
            if is_number(value) and math.isfinite(value):
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


def _grid(fig: Figure, count: int, xlabel: str) -> list[Any]:
    """``count`` panels sharing x, in rows of at most three; x labelled under each column."""
    cols = min(3, count)
    rows = math.ceil(count / cols)
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    for i, ax in enumerate(flat[:count]):
        if i + cols >= count:  # the lowest panel of its column
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
    return flat[:count]


def panel_kind(task: str, metric: str, means: Iterable[float]) -> Kind:
    """The metric's kind, unless the values drawn leave its range: then any real value.

    A rate above 1 or a negative count means the files hold something else than the runner
    writes; drawing it unclipped on free axes shows that instead of hiding it.
    """
    kind = metric_kind(task, metric)
    low, high = valid_range(kind)
    outside = [m for m in means if not low <= m <= high]
    if outside:
        log.warning("%s on %s: values outside [%g, %g] (e.g. %g); drawn on a free axis",
                    metric, task, low, high, outside[0])
        return "real"
    return kind


def _errors(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Error bar lengths below/above ``mean`` (never negative)."""
    return np.vstack([np.maximum(mean - low, 0.0), np.maximum(high - mean, 0.0)])


def _y_axis(ax: Any, task: str, metric: str, kind: Kind, values: list[float]) -> None:
    """Range and label by the panel's kind: rates on [0, 1], counts from 0."""
    if kind == "rate":
        ax.set_ylim(-0.04, 1.04)
        ax.yaxis.set_major_locator(FixedLocator([0.0, 0.25, 0.5, 0.75, 1.0]))
        ax.set_ylabel("exact match" if metric.endswith("_em") else
                      "share kept" if metric == "locality" else TASK_METRIC[task][0])
    elif kind == "count":
        top = max([1.0] + values)
        ax.set_ylim(-0.04 * top, top * 1.08)  # from 0; a margin keeps zeros off the frame
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("count")
    elif kind == "nonnegative":
        low, high = ax.get_ylim()
        # Times compare as ratios: from 0. Perplexities keep a close-up (never below 0).
        ax.set_ylim(0.0 if metric.startswith("edit_time") else max(low, 0.0), high)
        ax.set_ylabel("seconds" if metric.startswith("edit_time")
                      else TASK_METRIC.get(task, ("",))[0])
    else:
        ax.set_ylabel("value")


def _title(task: str, metric: str) -> str:
    arrow = {True: " ↑", False: " ↓", None: ""}[higher_is_better(task, metric)]
    return metric + arrow


def _x_on_points(ax: Any, xs: list[float], margin: float) -> None:
    """Ticks on the evaluation points (every k-th when there are many); ``margin`` either side
    (at least 5% of the range) keeps sideways-spread points inside."""
    step = max(1, math.ceil(len(xs) / 10))
    ax.xaxis.set_major_locator(FixedLocator(xs[::step]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(lambda x, _: normalize_value(float(x)))
    pad = max(0.05 * ((xs[-1] - xs[0]) or 1.0), 1.5 * margin)
    ax.set_xlim(xs[0] - pad, xs[-1] + pad)


def _legend(fig: Figure, axes: list[Any]) -> None:
    handles: dict[str, Any] = {}  # every method once, even one missing from the first panel
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        # As many columns as the labels fit across the figure (about 0.075 in per character of a
        # small font, plus the handle).
        width = fig.get_figwidth()
        per_column = 0.075 * (max(len(label) for label in handles) + 6)
        ncol = max(1, min(len(handles), int(width // per_column)))
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=ncol, fontsize="small", frameon=False)


def curves_figure(groups: dict[GroupKey, list[Run]], task: str, metrics: tuple[str, ...],
                  band: str, title: str, styles: StyleBook) -> Figure | None:
    """One panel per metric against the number of edits, one series per method."""
    series = {m: {key: seed_band(runs, m, band) for key, runs in groups.items()} for m in metrics}
    present = [m for m in metrics if any(s is not None for s in series[m].values())]
    if not present:
        return None
    xs_all = sorted({float(x) for m in present for s in series[m].values() if s is not None
                     for x in s[0]})
    gaps = np.diff(xs_all)
    methods = list(groups)
    # Per-batch points of the methods at one evaluation spread over 30% of the smallest gap
    # between evaluations, in the methods' order.
    dodge_width = 0.3 * (float(gaps.min()) if len(gaps) else 1.0)
    offsets = {key: (i - (len(methods) - 1) / 2) * dodge_width / max(1, len(methods) - 1)
               for i, key in enumerate(methods)}
    # Earlier methods are drawn wider and with larger markers, so that series with equal values
    # show as nested outlines instead of hiding each other.
    depth = {key: (len(methods) - 1 - i) / max(1, len(methods) - 1)
             for i, key in enumerate(methods)}
    cols = min(3, len(present))
    fig = Figure(figsize=(4.2 * cols, 3.1 * math.ceil(len(present) / cols) + 0.9),
                 layout="constrained")
    axes = _grid(fig, len(present), "edits")
    for ax, metric in zip(axes, present):
        kind = panel_kind(task, metric, (m for s in series[metric].values() if s is not None
                                         for m in s[1]))
        low_valid, high_valid = valid_range(kind)
        drawn: list[float] = []
        for key in methods:
            curve = series[metric][key]
            if curve is None:
                continue
            xs, mean, low, high = curve
            low, high = np.clip(low, low_valid, high_valid), np.clip(high, low_valid, high_valid)
            drawn += list(high)
            style = styles[key[2]]
            label = f"{key[2]} (n={len(groups[key])})"
            if metric in PER_BATCH_METRICS:
                ax.errorbar(xs + offsets[key], mean, yerr=_errors(mean, low, high),
                            fmt=style.marker, color=style.color, mfc="none", markersize=5,
                            capsize=2, elinewidth=1, linestyle="none", label=label)
            else:
                ax.plot(xs, mean, color=style.color, marker=style.marker, mfc="none",
                        markersize=4 + 3 * depth[key], linestyle=style.linestyle,
                        linewidth=1.2 + 1.0 * depth[key], label=label)
                if len(groups[key]) > 1:
                    ax.fill_between(xs, low, high, color=style.color, alpha=BAND_ALPHA,
                                    linewidth=0)
        ax.set_title(_title(task, metric) + ("  (per batch)" if metric in PER_BATCH_METRICS
                                             else ""))
        ax.grid(alpha=0.3)
        _y_axis(ax, task, metric, kind, drawn)
        _x_on_points(ax, xs_all, max(abs(o) for o in offsets.values()))
    _legend(fig, axes)
    band_text = "min/max" if band == "minmax" else "±1 std"
    spread = "bands and bars" if any(m in PER_BATCH_METRICS for m in present) else "bands"
    fig.suptitle(f"{title} (mean over seeds; {spread}: {band_text})")
    return fig


def ablation_lines(runs: list[Run]) -> dict[str, dict[str, dict[float, list[Run]]]]:
    """``{key: {line label: {value: runs}}}`` for every swept numeric hyperparameter.

    A key qualifies when runs of one method differ only in it and it takes at least two numeric
    values; the line's label is the method without that key (``melo``, or ``melo (other=...)``
    when a second key was swept too).
    """
    out: dict[str, dict[str, dict[float, list[Run]]]] = {}
    for run in runs:
        for part in run.variant:
            key, _, value = part.partition("=")
            try:
                x = float(value)
            except ValueError:
                continue
            if not math.isfinite(x):
                continue
            others = [p for p in run.variant if p != part]
            label = run.alg + (f" ({', '.join(others)})" if others else "")
            out.setdefault(key, {}).setdefault(label, {}).setdefault(x, []).append(run)
    return {key: {label: points for label, points in lines.items() if len(points) > 1}
            for key, lines in out.items()
            if any(len(points) > 1 for points in lines.values())}


def ablation_figure(task: str, model: str, key: str, lines: dict[str, dict[float, list[Run]]],
                    metrics: list[str], styles: StyleBook) -> Figure | None:
    """Each final metric against the values of ``key``, one line per method (mean ± 1 std)."""
    present = [m for m in metrics
               if any(Cell.of(r.summary.get(m) for r in runs).n
                      for points in lines.values() for runs in points.values())]
    if not present:
        return None
    values = sorted({x for points in lines.values() for x in points})
    log_x = values[0] > 0 and values[-1] / values[0] >= 4
    cols = min(3, len(present))
    fig = Figure(figsize=(4.2 * cols, 3.1 * math.ceil(len(present) / cols) + 0.9),
                 layout="constrained")
    axes = _grid(fig, len(present), key)
    for ax, metric in zip(axes, present):
        cells = {label: {x: Cell.of(r.summary.get(metric) for r in runs)
                         for x, runs in sorted(points.items())}
                 for label, points in lines.items()}
        kind = panel_kind(task, metric, (c.mean for by_x in cells.values()
                                         for c in by_x.values() if c.n))
        low_valid, high_valid = valid_range(kind)
        drawn: list[float] = []
        if log_x:
            ax.set_xscale("log")
        for label, points in lines.items():
            xs, means, lows, highs = [], [], [], []
            for x, cell in cells[label].items():
                if not cell.n:
                    continue
                xs.append(x)
                means.append(cell.mean)
                lows.append(max(cell.mean - cell.spread, low_valid))
                highs.append(min(cell.mean + cell.spread, high_valid))
            if not xs:
                continue
            drawn += highs
            style = styles[label]
            seeds = {r.seed for pts in points.values() for r in pts}
            mean_arr = np.array(means)
            ax.errorbar(xs, mean_arr, yerr=_errors(mean_arr, np.array(lows), np.array(highs)),
                        color=style.color, marker=style.marker, mfc="none", markersize=5,
                        linestyle=style.linestyle, linewidth=1.5, capsize=2, elinewidth=1,
                        label=f"{label} (seeds: {len(seeds)})")
        ax.set_title(_title(task, metric))
        ax.grid(alpha=0.3)
        _y_axis(ax, task, metric, kind, drawn)
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(lambda x, _: normalize_value(float(x)))
        if not log_x:
            pad = 0.05 * ((values[-1] - values[0]) or 1.0)
            ax.set_xlim(values[0] - pad, values[-1] + pad)
    _legend(fig, axes)
    fig.suptitle(f"{task} / {model}: final metrics vs {key} (bars: ±1 std over seeds)")
    return fig


def style_labels(groups: dict[GroupKey, list[Run]]) -> list[str]:
    """Every label a report's figures draw: the methods and the ablation lines."""
    labels = [key[2] for key in groups]
    runs = [r for rs in groups.values() for r in rs]
    for lines in ablation_lines(runs).values():
        labels += list(lines)
    return labels


def plot_all(groups: dict[GroupKey, list[Run]], out_dir: Path, band: str = "std",
             formats: tuple[str, ...] = ("png", "pdf"), ablation_metrics: Iterable[str] = (),
             figures: Iterable[str] = ("curves", "database", "ablation"),
             failures: list[str] | None = None) -> dict[tuple[str, str], list[str]]:
    """Write the figures of every (task, model); returns the file stems per (task, model).

    A figure that cannot be drawn is logged and named in ``failures`` (``"stem: reason"``); the
    others are still written.
    """
    figures = set(figures)
    styles = StyleBook(style_labels(groups))
    written: dict[tuple[str, str], list[str]] = {}
    for task, model in dict.fromkeys((t, m) for t, m, _ in groups):
        subset = {k: v for k, v in groups.items() if k[:2] == (task, model)}
        stem = f"{slug(task)}_{slug(model)}"
        todo: list[tuple[str, Callable[[], Figure | None]]] = []
        if "curves" in figures:
            todo.append((f"{stem}_metrics", lambda subset=subset: curves_figure(
                subset, task, CURVE_METRICS, band, f"{task} / {model}: metrics vs edits", styles)))
        if "database" in figures:
            # Methods without a database report zeros; leave them out so the lines that matter
            # show.
            with_db = {k: v for k, v in subset.items()
                       if any(row.get(s) for run in v for row in run.curve for s in DB_STATS)}
            todo.append((f"{stem}_database", lambda with_db=with_db: curves_figure(
                with_db, task, DB_STATS, band, f"{task} / {model}: vector database vs edits",
                styles)))
        if "ablation" in figures:
            runs = [r for rs in subset.values() for r in rs]
            present = [m for m in ablation_metrics
                       if any(is_number(r.summary.get(m)) for r in runs)]
            for key, lines in sorted(ablation_lines(runs).items()):
                todo.append((f"{stem}_ablation_{slug(key)}",
                             lambda key=key, lines=lines, present=present: ablation_figure(
                                 task, model, key, lines, present, styles)))
        written[(task, model)] = []
        for name, draw in todo:
            try:
                fig = draw()
                if fig is not None:
                    _save(fig, out_dir, name, formats)
                    written[(task, model)].append(name)
            except Exception as exc:  # noqa: BLE001 - one figure must not cost the report
                log.error("figure %s not drawn: %s: %s", name, type(exc).__name__, exc)
                if failures is not None:
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return written

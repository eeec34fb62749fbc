"""The written tables: CSV (long form), Markdown (the report) and LaTeX (booktabs)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from btp.report.runs import Collection, Run
from btp.report.stats import (TASK_METRIC, Cell, GroupKey, best_beyond_spread,
                              higher_is_better)

#: The table's columns, in the MELO paper's Table 2 order (edits asked alone after their batched
#: counterparts), with their header labels.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TRR", "TRR"), ("ERR", "ERR"), ("ES", "ES"), ("holdout", "holdout"),
    ("ERR_alone", "ERR alone"), ("ES_alone", "ES alone"), ("holdout_alone", "holdout alone"),
    ("ARR", "ARR"), ("truth", "truth"), ("locality", "locality"),
    ("edit_time_s", "edit time (s)"),
)
COLUMN_KEYS: tuple[str, ...] = tuple(key for key, _ in TABLE_COLUMNS)

CELL_NOTE = (
    "Cells: mean ± sample standard deviation over seeds, with n = the runs with a finite value; "
    "↑ higher is better, ↓ lower is better. Bold: the best mean of a column, only where it is "
    "further from the next best than the sum of their standard deviations (both over at least "
    "two runs). Non-finite values (nan, inf) are listed after the statistics with their number "
    "of runs and kept out of mean and std; – = no run reported the metric. Metrics are the final "
    "values of each run's `summary.json`."
)


def _tables(groups: dict[GroupKey, list[Run]], cells: dict[GroupKey, dict[str, Cell]]
            ) -> list[tuple[str, str, list[GroupKey], list[tuple[str, str]]]]:
    """(task, model, row keys, columns present) per table, in report order."""
    out = []
    for task, model in dict.fromkeys((t, m) for t, m, _ in groups):  # keeps group order
        keys = [k for k in groups if k[:2] == (task, model)]
        present = {m for k in keys for m, c in cells[k].items() if not c.empty}
        out.append((task, model, keys, [(m, lbl) for m, lbl in TABLE_COLUMNS if m in present]))
    return out


def _seeds(runs: list[Run]) -> str:
    return ", ".join(str(r.seed) for r in runs)


def _num(value: float) -> str:
    return "" if math.isnan(value) else repr(round(value, 6))


def _nonfinite_text(cell: Cell) -> str:
    return " ".join(f"{name}:{count}" for name, count in cell.nonfinite)


def write_csv(path: Path, groups: dict[GroupKey, list[Run]],
              cells: dict[GroupKey, dict[str, Cell]]) -> None:
    """Long form: one row per (task, model, method, metric).

    ``n`` counts the finite values behind ``mean``/``std``; ``nonfinite`` lists the others
    (``inf:1 nan:2``).
    """
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "model", "method", "alg", "metric", "direction",
                         "mean", "std", "n", "nonfinite", "seeds"])
        for key, by_metric in cells.items():
            task, model, method = key
            runs = groups[key]
            seeds = " ".join(str(r.seed) for r in runs)
            for metric, cell in by_metric.items():
                direction = {True: "higher", False: "lower", None: ""}[
                    higher_is_better(task, metric)]
                writer.writerow([task, model, method, runs[0].alg, metric, direction,
                                 _num(cell.mean), _num(cell.std), cell.n, _nonfinite_text(cell),
                                 seeds])


def fmt(value: float) -> str:
    """Compact number: perplexities and times can be large, F1/accuracy are in [0, 1]."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def cell_text(cell: Cell | None) -> str:
    """``0.907 ± 0.080 (n=3)``; non-finite values follow as ``inf (1 run)``."""
    if cell is None or cell.empty:
        return "–"
    parts = []
    if cell.n:
        spread = "" if math.isnan(cell.std) else f" ± {fmt(cell.std)}"
        parts.append(f"{fmt(cell.mean)}{spread} (n={cell.n})")
    parts += [f"{name} ({_runs(count)})" for name, count in cell.nonfinite]
    return ", ".join(parts)


def _md_escape(text: str) -> str:
    """Keep free text (error messages, paths) from breaking a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def markdown(collection: Collection, groups: dict[GroupKey, list[Run]],
             cells: dict[GroupKey, dict[str, Cell]], figures: dict[tuple[str, str], list[str]],
             command: str | None = None, latex_name: str | None = None,
             formats: tuple[str, ...] = ("png", "pdf"), failures: list[str] | None = None
             ) -> str:
    """The whole report: one Table-2-style table per (task, model), figures, skipped runs."""
    lines = ["# Method comparison", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += [CELL_NOTE, ""]
    if latex_name:
        lines += [f"The same tables for a paper: [{latex_name}]({latex_name}) (LaTeX, booktabs).",
                  ""]
    for task, model, keys, columns in _tables(groups, cells):
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
        best = {m: best_beyond_spread(task, m, {k: cells[k].get(m) for k in keys})
                for m, _ in columns}
        for key in keys:
            row = [_md_escape(key[2])]
            for metric, _ in columns:
                text = cell_text(cells[key].get(metric))
                row.append(f"**{text}**" if best[metric] == key else text)
            row.append(_seeds(groups[key]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        shown = "png" if "png" in formats else formats[0]
        for stem in figures.get((task, model), []):
            lines += [f"![{stem}]({stem}.{shown})", ""]
            others = [f"[{fmt.upper()}]({stem}.{fmt})" for fmt in formats if fmt != shown]
            if others:
                lines += [f"({', '.join(others)})", ""]
    if failures:
        lines += ["## Figures not drawn", ""] + [f"- {_md_escape(f)}" for f in failures] + [""]
    lines += ["## Skipped runs", ""]
    if collection.skipped:
        lines += ["| run directory | reason |", "|---|---|"]
        lines += [f"| `{_md_escape(str(s.path))}` | {_md_escape(s.reason)} |"
                  for s in collection.skipped]
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text for LaTeX's text mode."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_number(value: float) -> str:
    if math.isinf(value):
        return r"\infty" if value > 0 else r"-\infty"
    return r"\mathrm{NaN}" if math.isnan(value) else fmt(value)


def latex_cell(cell: Cell | None, bold: bool = False) -> str:
    """``$0.907 \\pm 0.080$ (3)``, bold as ``$\\mathbf{...}$``; non-finite values as in Markdown."""
    if cell is None or cell.empty:
        return "--"
    parts = []
    if cell.n:
        body = _latex_number(cell.mean)
        if not math.isnan(cell.std):
            body += r" \pm " + _latex_number(cell.std)
        if bold:
            body = r"\mathbf{" + body + "}"
        parts.append(f"${body}$ ({cell.n})")
    name_tex = {"inf": r"$\infty$", "-inf": r"$-\infty$", "nan": "NaN"}
    parts += [f"{name_tex[name]} ({count})" for name, count in cell.nonfinite]
    return ", ".join(parts)


def latex(groups: dict[GroupKey, list[Run]], cells: dict[GroupKey, dict[str, Cell]],
          command: str | None = None) -> str:
    """One booktabs ``table`` per (task, model), the same cells and bold rule as the Markdown."""
    lines = ["% Method comparison tables; need \\usepackage{booktabs}."]
    if command:
        lines.append(f"% Generated by: {command}")
    for task, model, keys, columns in _tables(groups, cells):
        quality = TASK_METRIC.get(task, ("?", None))[0]
        best = {m: best_beyond_spread(task, m, {k: cells[k].get(m) for k in keys})
                for m, _ in columns}
        header = ["Method"]
        for metric, label in columns:
            arrow = {True: r" $\uparrow$", False: r" $\downarrow$", None: ""}[
                higher_is_better(task, metric)]
            header.append(latex_escape(label) + arrow)
        label_id = "".join(ch if ch.isalnum() else "-" for ch in f"{task}-{model}")
        lines += [
            "", r"\begin{table}[t]", r"\centering", r"\small",
            r"\caption{Task \texttt{" + latex_escape(task) + r"}, model \texttt{"
            + latex_escape(model) + "}: " + latex_escape(quality) + r" (mean $\pm$ sample "
            r"standard deviation over seeds; in parentheses the number of runs). Bold: best, "
            r"where it differs from the next best by more than the sum of their standard "
            r"deviations.}",
            r"\label{tab:" + label_id + "}",
            r"\begin{tabular}{l" + "c" * len(columns) + "}",
            r"\toprule",
            " & ".join(header) + r" \\",
            r"\midrule",
        ]
        for key in keys:
            row = [latex_escape(key[2])]
            row += [latex_cell(cells[key].get(m), best[m] == key) for m, _ in columns]
            lines.append(" & ".join(row) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines.append("")
    return "\n".join(lines)

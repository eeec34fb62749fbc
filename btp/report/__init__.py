"""Comparison reports from finished runs: tables (Markdown, CSV, LaTeX) and figures (PNG, PDF).

::

    python -m btp.report RUN_OR_SWEEP_DIR [RUN_OR_SWEEP_DIR ...] --out DIR
    python scripts/compare.py RUN_OR_SWEEP_DIR ... --out DIR      # the same

Modules: :mod:`btp.report.runs` (finding and validating run directories),
:mod:`btp.report.stats` (seed statistics, directions, the bold rule), :mod:`btp.report.tables`
(CSV, Markdown, LaTeX), :mod:`btp.report.plots` (figures), :mod:`btp.report.cli` (the command).
"""

from btp.report.cli import main

__all__ = ["main"]

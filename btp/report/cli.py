"""The report command: put MELO and the baselines side by side from finished runs.

Reads ``summary.json`` and ``metrics.jsonl`` of every run directory below the given directories
and writes into ``--out``:

* ``comparison.md``: one table per (task, model) laid out like the MELO paper's Table 2 (rows:
  methods; columns TRR, ERR, ES, holdout, the edits asked alone when the runs have them, ARR,
  locality, edit time), each cell mean ± sample standard deviation over seeds with the number of
  runs; then the figures and the skipped runs;
* ``comparison.csv``: the same statistics in long form (one row per task/model/method/metric);
* ``comparison.tex``: the tables in LaTeX (booktabs);
* the figures of :mod:`btp.report.plots`, each as PNG and PDF.

A run that cannot be used, whatever is wrong with it, is listed under "Skipped runs" with the
reason and the report is still written. The exit status is 1 when no run is usable (the report
with the skipped list is still written), 2 when the output folder cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from btp.report.runs import collect
from btp.report.stats import aggregate, drop_duplicate_seeds, group_runs
from btp.report.tables import COLUMN_KEYS, latex, markdown, write_csv

log = logging.getLogger("btp.report")

FIGURES = ("curves", "database", "ablation")
FORMATS = ("png", "pdf", "svg")


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Compare editing methods across runs/sweeps: Markdown, CSV and "
                               "LaTeX tables, PNG/PDF figures.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run directories or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--band", choices=("std", "minmax"), default="std",
                        help="band over seeds in the figures (default: ±1 sample std)")
    parser.add_argument("--ignore-override", action="append", default=[], metavar="KEY",
                        help="override key that does not make a separate method row "
                             "(repeatable; seed/alg/experiment/model/hydra.* are always ignored)")
    parser.add_argument("--figures", type=_choices(FIGURES), default=FIGURES,
                        help="which figures (comma-separated; default: all of "
                             f"{','.join(FIGURES)})")
    parser.add_argument("--formats", type=_choices(FORMATS), default=("png", "pdf"),
                        help="figure file formats (default: png,pdf)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--command-label", default=None,
                        help="command line to record in the report (default: the actual one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m btp.report") -> int:
    """Run the comparison; returns the process exit status."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        log.error("cannot write the report to %s (%s); give --out a writable folder",
                  args.out, exc.strerror or exc)
        return 2

    collection = collect(list(args.dirs), tuple(args.ignore_override))
    drop_duplicate_seeds(collection)
    groups = group_runs(collection.runs)
    cells = aggregate(groups, COLUMN_KEYS)
    log.info("%d usable runs in %d cells, %d skipped",
             len(collection.runs), len(groups), len(collection.skipped))

    command = args.command_label or prog + " " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_csv(args.out / "comparison.csv", groups, cells)
    (args.out / "comparison.tex").write_text(latex(groups, cells, command), encoding="utf-8")
    figures: dict[tuple[str, str], list[str]] = {}
    failures: list[str] = []
    if groups and not args.no_plots:
        from btp.report.plots import plot_all  # matplotlib only when figures are wanted

        figures = plot_all(groups, args.out, args.band, args.formats, COLUMN_KEYS, args.figures,
                           failures)
    (args.out / "comparison.md").write_text(
        markdown(collection, groups, cells, figures, command, "comparison.tex", args.formats,
                 failures), encoding="utf-8")
    log.info("wrote %s, %s and %s", args.out / "comparison.md", args.out / "comparison.csv",
             args.out / "comparison.tex")
    if not collection.runs:
        log.error("no usable run below %s", " ".join(map(str, args.dirs)))
        return 1
    return 0

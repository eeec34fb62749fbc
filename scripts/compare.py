#!/usr/bin/env python
"""Put MELO and the baselines side by side from finished runs.

Usage::

    python scripts/compare.py RUN_OR_SWEEP_DIR [RUN_OR_SWEEP_DIR ...] --out DIR

Reads ``summary.json`` and ``metrics.jsonl`` of every run directory below the given directories
and writes into ``DIR``:

* ``comparison.md``: one table per (task, model) laid out like the MELO paper's Table 2 (rows:
  methods; columns TRR, ERR, ES, holdout, ARR, locality, edit time), each cell mean ± sample
  standard deviation over seeds with the number of runs, then the plots and the skipped runs;
* ``comparison.csv``: the same statistics in long form (one row per task/model/method/metric);
* ``<task>_<model>_metrics.png`` and ``<task>_<model>_database.png``: metrics and the vector
  database's clusters/conflicts/forgotten against the number of edits, one line per method with a
  band over seeds.

Runs with a missing or corrupt file are listed under "Skipped runs" with the reason. The exit
status is 1 when no run is usable (the report with the skipped list is still written).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

# The helper modules live next to this script; make them importable however it is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _compare_plots import plot_all  # noqa: E402
from _compare_runs import collect  # noqa: E402
from _compare_stats import aggregate, drop_duplicate_seeds, group_runs, markdown, write_csv  # noqa: E402

log = logging.getLogger("compare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare editing methods across runs/sweeps: Markdown + CSV tables, PNG plots.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run directories or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--band", choices=("std", "minmax"), default="std",
                        help="band over seeds in the plots (default: ±1 sample std)")
    parser.add_argument("--ignore-override", action="append", default=[], metavar="KEY",
                        help="override key that does not make a separate method row "
                             "(repeatable; seed/alg/experiment/model/hydra.* are always ignored)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--command-label", default=None,
                        help="command line to record in comparison.md (default: the actual one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    collection = collect(list(args.dirs), tuple(args.ignore_override))
    drop_duplicate_seeds(collection)
    groups = group_runs(collection.runs)
    cells = aggregate(groups)
    log.info("%d usable runs in %d cells, %d skipped",
             len(collection.runs), len(groups), len(collection.skipped))

    plots = {} if args.no_plots or not groups else plot_all(groups, args.out, args.band)
    write_csv(args.out / "comparison.csv", groups, cells)
    command = args.command_label or "python scripts/compare.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    (args.out / "comparison.md").write_text(
        markdown(collection, groups, cells, plots, command), encoding="utf-8")
    log.info("wrote %s and %s", args.out / "comparison.md", args.out / "comparison.csv")
    if not collection.runs:
        log.error("no usable run below %s", " ".join(map(str, args.dirs)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

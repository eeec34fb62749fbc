#!/usr/bin/env python
"""Put MELO and the baselines side by side from finished runs (``btp.report``).

Usage::

    python scripts/compare.py RUN_OR_SWEEP_DIR [RUN_OR_SWEEP_DIR ...] --out DIR

The same as ``python -m btp.report ...``; see :mod:`btp.report.cli` for what it writes. Needs the
``btp`` package installed (``setup.sh`` installs it, editable).
"""

from __future__ import annotations

import sys

from btp.report.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/compare.py"))

#!/usr/bin/env python
"""Put MELO and the baselines side by side from finished runs (``btp.report``).

Usage::

    python scripts/compare.py RUN_OR_SWEEP_DIR [RUN_OR_SWEEP_DIR ...] --out DIR

The same as ``python -m btp.report ...``; see :mod:`btp.report.cli` for what it writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Importable without an installed package too (the repository root holds btp/).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btp.report.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/compare.py"))

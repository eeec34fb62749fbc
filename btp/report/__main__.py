"""``python -m btp.report RUN_OR_SWEEP_DIR ... --out DIR`` (see :mod:`btp.report.cli`)."""

import sys

from btp.report.cli import main

sys.exit(main())

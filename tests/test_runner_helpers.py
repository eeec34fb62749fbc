"""Helpers for the runner's end-to-end tests: run ``btp/run.py`` in this process or in a
subprocess.

Subprocesses use one CPU thread: on the shared 2-core machine, torch's default thread pool
oversubscribes and a tiny model's generation becomes ~100x slower.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

from btp.tasks import TASKS

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_PY = REPO_ROOT / "btp" / "run.py"

#: Keys every summary.json has plus the task-specific ones.
SUMMARY_KEYS = {"task", "alg", "model", "n_edits", "ES", "ERR", "TRR", "locality", "clusters",
                "conflicts", "forgotten", "edit_time_s"}
TASK_KEYS = {name: set(spec.summary_keys) for name, spec in TASKS.items()}
#: Small evaluation sets and short edits for tiny qa runs whose test is about the machinery (a
#: sweep, a queue, a resume), not the numbers: generation is most of a tiny run's time.
SMALL_EVAL = ("data.n_upstream=10", "eval.alone_records=0", "eval.max_length=8",
              "melo.num_iter=20")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a run: one thread, offline hub, no wandb account needed."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"})
    env.pop("BTP_TEST_KILL_AT", None)
    env.update(extra)
    return env


def run_cli(run_dir: Path, *overrides: str, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cd btp && python run.py <overrides> hydra.run.dir=<run_dir>`` (README's form)."""
    cmd = [sys.executable, str(RUN_PY), *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=str(cwd or RUN_PY.parent), env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_main(run_dir: Path, *overrides: str) -> int:
    """``python run.py <overrides> hydra.run.dir=<run_dir>`` in this process, the way the command
    runs it (``runpy`` as ``__main__``: Hydra composes and writes ``.hydra/`` before the runner
    starts), without a new interpreter's imports; the exit code."""
    from hydra.core.hydra_config import HydraConfig

    argv = sys.argv
    sys.argv = ["run.py", *overrides, f"hydra.run.dir={run_dir}"]
    try:
        runpy.run_path(str(RUN_PY), run_name="__main__")
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
        HydraConfig.instance().cfg = None  # later tests run without a Hydra context


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def explain(proc: subprocess.CompletedProcess) -> str:
    """The tail of a failed run's output, for assertion messages."""
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"

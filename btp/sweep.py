"""Sweep helpers: skip finished runs on re-submission, one wandb group per sweep.

A sweep is a Hydra multirun (``python run.py -m ...``), locally or on SLURM through
``hydra/launcher=slurm`` (``config/hydra/launcher/slurm.yaml``). Those launcher configs name each
job's directory after its overrides, so re-submitting the same command with the same
``hydra.sweep.dir`` reaches the same run directories. What a job then does there:

* ``summary.json`` present (:func:`finished`): the run completed; skip it and return that summary
  (:func:`finished_summary`), so that a re-submitted sweep only redoes what is missing.
* a checkpoint but no summary: the runner resumes from the checkpoint (``btp/checkpoint.py``).
* neither: a fresh run.

:func:`wandb_group` gives every run of one sweep the same wandb group (the sweep's name) unless
``wandb.group`` is set explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
_TIME_DIR = re.compile(r"\d{2}-\d{2}-\d{2}")  # Hydra's default ${now:%H-%M-%S} leaf


def finished_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The summary of a completed run in ``run_dir``, or None when the run must (re)start.

    A summary that is not a readable JSON object counts as unfinished: the run is redone rather
    than trusted (the runner writes it atomically, so this only happens if it was damaged later).
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is unreadable (%s); the run will be redone", path, exc)
        return None
    return summary if isinstance(summary, dict) else None


def finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a completed run (a valid ``summary.json``)."""
    return finished_summary(run_dir) is not None


def sweep_name(sweep_dir: str | Path) -> str:
    """A readable, stable name for a sweep directory.

    ``multirun/qa_radius`` -> ``qa_radius``; Hydra's default ``multirun/2024-05-01/12-30-00`` ->
    ``2024-05-01_12-30-00`` (the time alone would collide across days).
    """
    path = Path(str(sweep_dir))
    if _TIME_DIR.fullmatch(path.name) and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.name


def wandb_group(explicit: str | None = None) -> str | None:
    """The wandb group of this run: ``explicit`` if set, else the sweep's name in a multirun.

    Outside a Hydra multirun (a single run, or no Hydra at all) there is no sweep and the group
    stays None.
    """
    if explicit:
        return explicit
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        return sweep_name(hydra_cfg.sweep.dir)
    except (ImportError, ValueError, AttributeError):  # no Hydra context: not a sweep
        return None

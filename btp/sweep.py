"""Sweep helpers: skip finished runs on re-submission, one wandb group per sweep.

A sweep is a Hydra multirun (``python run.py -m ...``), locally or on SLURM through
``hydra/launcher=slurm`` (``config/hydra/launcher/slurm.yaml``). ``config/config.yaml`` names each
job's directory after its overrides (``hydra.sweep.subdir``), so re-submitting the same command
with the same ``hydra.sweep.dir`` reaches the same run directories. What a job then does there
(``btp.runner.run``, with the run directory locked by ``btp.rundir.RunDir``):

* ``summary.json`` present (:func:`finished_summary`): the run completed. If its recorded config
  (``run_config.json``) has the same result-changing values, the job is skipped and returns that
  summary, so that a re-submitted sweep only redoes what is missing; if not, the job is refused
  with the differing keys named (``btp.rundir.RunDir.check``).
* a checkpoint but no summary: the runner resumes from the checkpoint (``btp/checkpoint.py``),
  under the same rule.
* neither: a fresh run.

:func:`wandb_group` gives every run of one sweep the same wandb group (the sweep's name) unless
``wandb.group`` is set explicitly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from btp.errors import ConfigError

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
_TIME_DIR = re.compile(r"\d{2}-\d{2}-\d{2}")  # Hydra's default ${now:%H-%M-%S} leaf


#: Summary keys that identify a run; a finished run with other values is a different run.
IDENTITY_KEYS: tuple[str, ...] = ("task", "alg", "model", "seed")


def finished_summary(run_dir: str | Path, expected: Mapping[str, Any] | None = None
                     ) -> dict[str, Any] | None:
    """The summary of a completed run in ``run_dir``, or None when the run must (re)start.

    Args:
        run_dir: the job's run directory.
        expected: the identity of the run about to start (``task``, ``alg``, ``model``, ``seed``,
            as in summary.json). A finished run in ``run_dir`` that differs is not silently taken
            for this one (which a sweep directory reused for another sweep command would do):
            that raises ``ConfigError``. The runner compares the whole result-changing config
            instead (``btp.rundir``); this identity check serves callers without a config.

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
    if not isinstance(summary, dict):
        log.warning("%s is not a JSON object; the run will be redone", path)
        return None
    if expected is not None:
        differ = {k: (summary.get(k), expected[k]) for k in IDENTITY_KEYS
                  if k in expected and str(summary.get(k)) != str(expected[k])}
        if differ:
            detail = ", ".join(f"{k}: finished {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ConfigError(
                f"{run_dir} already holds a finished run of another configuration ({detail}); "
                "use a new hydra.sweep.dir for a different sweep command")
    log.info("%s: finished run found (summary.json); skipping it", run_dir)
    return summary


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


def hydra_sweep_dir() -> Path | None:
    """The sweep directory of the current Hydra multirun; None in a single run or without Hydra.

    Read once by the runner's entry (``btp.runner.run``), which passes it on.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        return Path(str(hydra_cfg.sweep.dir))
    except (ImportError, ValueError, AttributeError):  # no Hydra context: not a sweep
        return None


def wandb_group(explicit: str | None, sweep_dir: str | Path | None) -> str | None:
    """The wandb group of a run: ``explicit`` (``wandb.group``) if set, else the name of the
    sweep the run belongs to (:func:`sweep_name`), else None (a run outside a sweep)."""
    if explicit:
        return explicit
    return sweep_name(sweep_dir) if sweep_dir is not None else None

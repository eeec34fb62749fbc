"""What a run writes into its Hydra run directory, besides the checkpoint and the log.

* ``metrics.jsonl``: one JSON object per evaluation (``n_edits`` first). On resume it is rewritten
  from the checkpoint's records, so an evaluation logged after the last checkpoint (by a run that
  was then killed) is not duplicated.
* ``summary.json``: the final values, written atomically and only when the run finished.
* wandb (``wandb.mode``: ``disabled`` by default, ``offline``, ``online``): the same records,
  with ``n_edits`` as the step. ``offline`` needs no account; wandb is imported only when enabled.
  The runner gives the group: ``wandb.group`` when set, else the sweep's name in a multirun
  (``btp.sweep.wandb_group``), so that the runs of one sweep are grouped together.

NaN values are written as ``null`` so that the files are standard JSON and compare equal.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from btp.checkpoint import atomic_write_text
from btp.tasks import TASKS

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def clean(value: Any) -> Any:
    """JSON-safe copy: NaN -> None, enum -> its value, tuples -> lists, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "value") and type(value).__module__ != "builtins" and isinstance(
            value, str):
        return str(value.value)  # str-Enum members
    return value


class MetricsLog:
    """``metrics.jsonl`` plus the optional wandb run.

    Args:
        run_dir: the Hydra run directory.
        wandb_cfg: the ``wandb`` section.
        config: the resolved config (logged to wandb).
        run_name: a readable name (task/alg/model).
        wandb_id: the id of a previous wandb run of this run dir (resume), or None.
        group: the wandb group (:func:`btp.sweep.wandb_group`), or None.
    """

    def __init__(self, run_dir: Path, wandb_cfg: Any, config: dict[str, Any], run_name: str,
                 wandb_id: str | None = None, group: str | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb_run = None
        mode = str(wandb_cfg.mode)
        if mode != "disabled":
            import wandb  # imported only when asked for: slow import, optional service

            self.wandb_run = wandb.init(
                mode=mode, project=wandb_cfg.project, group=group,
                entity=wandb_cfg.entity, dir=str(run_dir), config=config, name=run_name,
                id=wandb_id, resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def reset(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the file with exactly ``records`` (start or resume)."""
        atomic_write_text(self.path, "".join(json.dumps(clean(r)) + "\n" for r in records))

    def append(self, record: dict[str, Any]) -> None:
        """Add one evaluation; flushed to disk so that a kill keeps what was logged."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb_run is not None:
            numbers = {k: v for k, v in clean(record).items()
                       if isinstance(v, (int, float)) and k != "n_edits"}
            self.wandb_run.log(numbers, step=int(record["n_edits"]))

    def finish(self, summary: dict[str, Any] | None) -> None:
        """Close the wandb run (with the summary when the run finished)."""
        if self.wandb_run is None:
            return
        if summary is not None:
            for k, v in clean(summary).items():
                if isinstance(v, (int, float, str)):
                    self.wandb_run.summary[k] = v
        self.wandb_run.finish(exit_code=0 if summary is not None else 1)
        self.wandb_run = None


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically; returns its path."""
    path = Path(run_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(clean(summary), indent=2, sort_keys=False) + "\n")
    return path


#: The summary's headline values in reading order: the edit stream's and upstream's, then every
#: registered task's extra evaluation sets (:mod:`btp.tasks`); a run shows those its summary has,
#: and ``*_alone`` follows its batched value.
SUMMARY_LINE_KEYS: tuple[str, ...] = ("ES", "ERR", "TRR", "locality") + tuple(dict.fromkeys(
    s.name for spec in TASKS.values() for s in spec.eval_sets))


def summary_line(summary: dict[str, Any]) -> str:
    """One readable line of a run's final values, e.g.
    ``ES 1.000 (alone 1.000) | ERR 0.970 (alone 0.211) | TRR 0.000 | locality 1.000 | ...``."""
    def num(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    parts = []
    for key in SUMMARY_LINE_KEYS:
        if key not in summary:
            continue
        text = f"{key} {num(summary[key])}"
        if f"{key}_alone" in summary:
            text += f" (alone {num(summary[f'{key}_alone'])})"
        parts.append(text)
    parts.append(f"clusters {summary.get('clusters')}, conflicts {summary.get('conflicts')}")
    parts.append(f"{summary.get('n_edits')} edits in {float(summary.get('edit_time_s') or 0):.1f} s")
    return " | ".join(parts)

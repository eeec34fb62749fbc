"""Finding and validating run directories for ``scripts/compare.py``.

A *run directory* is what one Hydra job writes: ``summary.json``, ``metrics.jsonl`` and
``.hydra/``. Every candidate found below the given roots ends up either as a :class:`Run` or as a
:class:`Skipped` with a human-readable reason, so a broken run is reported, never silently lost.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btp.schema import ALG_SECTIONS  # config sections each algorithm reads (one table)

log = logging.getLogger("compare")

#: Keys every ``summary.json`` must carry (the runner's fixed output format).
REQUIRED_SUMMARY_KEYS: tuple[str, ...] = (
    "task", "alg", "model", "n_edits", "ES", "ERR", "TRR", "locality",
    "clusters", "conflicts", "forgotten", "edit_time_s", "seed",
)
#: Extra keys required per task (generality for qa, accuracy retention for hallucination).
TASK_KEYS: dict[str, tuple[str, ...]] = {"qa": ("holdout",), "hallucination": ("ARR",)}
#: Metrics plotted against the number of edits (when a run's metrics.jsonl has them).
CURVE_METRICS: tuple[str, ...] = ("TRR", "ERR", "ES", "holdout", "ARR", "locality")
#: Vector-database statistics plotted against the number of edits.
DB_STATS: tuple[str, ...] = ("clusters", "conflicts", "forgotten")
#: Overrides that identify the cell rather than a variant of the method: the task/model/alg
#: selection and the seed (which is what we average over), plus Hydra/launcher/logging knobs that
#: do not change results.
_NON_VARIANT_PREFIXES: tuple[str, ...] = (
    "seed", "alg", "experiment", "model", "hydra.", "hydra/", "wandb", "device", "output_dir",
    "checkpoint.",
)
ALL_ALG_SECTIONS = frozenset(s for secs in ALG_SECTIONS.values() for s in secs)
#: Files whose presence marks a directory as a (possibly broken) run directory.
_RUN_MARKERS: tuple[str, ...] = ("summary.json", "metrics.jsonl", ".hydra/config.yaml")


@dataclass
class Run:
    """One usable run: its summary, evaluation curve and method label."""

    path: Path
    summary: dict[str, Any]
    curve: list[dict[str, Any]]
    overrides: dict[str, str] = field(default_factory=dict)
    variant: tuple[str, ...] = ()  # set by assign_variants

    @property
    def task(self) -> str:
        return str(self.summary["task"])

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def method(self) -> str:
        """The row label: the algorithm plus any non-default overrides (sweep variant)."""
        alg = str(self.summary["alg"])
        return f"{alg} ({', '.join(self.variant)})" if self.variant else alg


@dataclass
class Skipped:
    """A run directory that could not be used, and why."""

    path: Path
    reason: str


@dataclass
class Collection:
    """Everything found below the roots."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """All run directories at or below ``roots`` (sorted, de-duplicated by real path).

    Submitit's own folders (``.submitit``) and Hydra's ``.hydra`` are not descended into: they hold
    logs and pickles, not runs.
    """
    found: dict[Path, Path] = {}
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in (".submitit", ".hydra"))
            here = Path(dirpath)
            if any((here / marker).is_file() for marker in _RUN_MARKERS):
                found.setdefault(here.resolve(), here)
    return [found[key] for key in sorted(found)]


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) as ``{key: value}``.

    Without the file (a run not started by Hydra) the run has no overrides.
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml  # PyYAML comes with Hydra/OmegaConf

        items = yaml.safe_load(path.read_text()) or []
    except Exception as exc:  # noqa: BLE001 - a bad overrides file only loses the variant label
        log.warning("%s: unreadable overrides.yaml (%s); treating as plain algorithm", run_dir, exc)
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).lstrip("+~").partition("=")
        out[key] = value
    return out


def _relevant(key: str, alg: str, ignored: tuple[str, ...]) -> bool:
    """Whether an override can change this algorithm's results (and so name a variant)."""
    if key.startswith(ignored):
        return False
    section = key.split(".", 1)[0]
    # Another algorithm's hyperparameters (e.g. grace.init_radius on a MELO run of a joint
    # `+alg=lora,grace` sweep) do not change this run.
    return not (section in ALL_ALG_SECTIONS and section not in ALG_SECTIONS.get(alg, (section,)))


def assign_variants(runs: list[Run], extra_ignored: tuple[str, ...] = ()) -> None:
    """Label runs of one (task, model, alg) by the overrides that differ between them.

    Overrides shared by all those runs (e.g. a sweep-wide ``max_n_edits=50``) are not part of the
    label; seeds and launcher/logging settings never are. Runs whose labels are equal form one
    table row, averaged over their seeds.
    """
    ignored = _NON_VARIANT_PREFIXES + extra_ignored
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.model, str(run.summary["alg"])), []).append(run)
    for (_, _, alg), members in groups.items():
        relevant = [{k: v for k, v in r.overrides.items() if _relevant(k, alg, ignored)}
                    for r in members]
        keys = sorted({k for ov in relevant for k in ov})
        varying = [k for k in keys if len({ov.get(k) for ov in relevant}) > 1]
        for run, ov in zip(members, relevant):
            run.variant = tuple(f"{k}={ov.get(k, 'default')}" for k in varying)


def _check_summary(summary: Any) -> str | None:
    """Why this summary is unusable, or None when it is fine."""
    if not isinstance(summary, dict):
        return f"summary.json: expected a JSON object, got {type(summary).__name__}"
    required = REQUIRED_SUMMARY_KEYS + TASK_KEYS.get(str(summary.get("task")), ())
    missing = [key for key in required if key not in summary]
    if missing:
        return f"summary.json: missing keys {', '.join(missing)}"
    # Metric values must be numbers; null is allowed (a metric the run could not compute).
    for key in required:
        if key in ("task", "alg", "model"):
            continue
        value = summary[key]
        if value is not None and not _is_number(value):
            return f"summary.json: {key} is not a number ({value!r})"
    return None


def _read_curve(path: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Parse metrics.jsonl; returns (rows, None) or (None, reason)."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return None, f"metrics.jsonl: corrupt line {number} ({exc.msg})"
            if not isinstance(row, dict) or not _is_number(row.get("n_edits")):
                return None, f"metrics.jsonl: corrupt line {number} (no numeric n_edits)"
            rows.append(row)
    if not rows:
        return None, "metrics.jsonl: empty"
    rows.sort(key=lambda r: r["n_edits"])
    return rows, None


def load_run(run_dir: Path) -> Run | Skipped:
    """Load and validate one run directory."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        # Typical for a job that is still running, crashed or was killed before finishing.
        return Skipped(run_dir, "missing summary.json (unfinished or failed run)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Skipped(run_dir, f"summary.json: invalid JSON ({exc})")
    reason = _check_summary(summary)
    if reason:
        return Skipped(run_dir, reason)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        return Skipped(run_dir, "missing metrics.jsonl")
    curve, reason = _read_curve(metrics_path)
    if curve is None:
        return Skipped(run_dir, reason or "metrics.jsonl: unreadable")
    # NaN metrics are kept as NaN; the statistics ignore them per cell and report n accordingly.
    summary = {k: (math.nan if v is None and k not in ("task", "alg", "model") else v)
               for k, v in summary.items()}
    return Run(run_dir, summary, curve, read_overrides(run_dir))


def collect(roots: list[Path], extra_ignored: tuple[str, ...] = ()) -> Collection:
    """Find, load and validate every run below ``roots``."""
    result = Collection()
    for root in roots:
        if not root.exists():
            result.skipped.append(Skipped(root, "path does not exist"))
    for run_dir in find_run_dirs([r for r in roots if r.exists()]):
        loaded = load_run(run_dir)
        if isinstance(loaded, Run):
            result.runs.append(loaded)
        else:
            log.warning("skipping %s: %s", loaded.path, loaded.reason)
            result.skipped.append(loaded)
    assign_variants(result.runs, extra_ignored)
    return result

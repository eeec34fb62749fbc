"""Finding and validating run directories for the comparison report.

A *run directory* is what one job writes: ``summary.json``, ``metrics.jsonl`` and ``.hydra/``.
Every candidate found below the given roots ends up either as a :class:`Run` or as a
:class:`Skipped` with a one-line reason, whatever is wrong with it (missing or unreadable files,
bytes that are not UTF-8, invalid JSON, missing keys, values of the wrong type): a broken run is
reported, never silently lost, and never stops the report.

Values are kept as the files hold them: ``null`` (a metric the run could not compute) stays
``None``; ``NaN`` and ``Infinity`` stay non-finite floats, which the statistics count separately
instead of averaging.
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
from btp.tasks import TASKS

log = logging.getLogger("btp.report")

#: Keys every ``summary.json`` must carry (the runner's fixed output format).
REQUIRED_SUMMARY_KEYS: tuple[str, ...] = (
    "task", "alg", "model", "n_edits", "ES", "ERR", "TRR", "locality",
    "clusters", "conflicts", "forgotten", "edit_time_s", "seed",
)
#: Summary keys that name the run rather than measure it.
IDENTITY_KEYS: tuple[str, ...] = ("task", "alg", "model")
#: Metrics drawn against the number of edits (when a run's metrics.jsonl has them).
CURVE_METRICS: tuple[str, ...] = ("TRR", "ERR", "ES", "holdout", "ERR_alone", "ES_alone",
                                  "holdout_alone", "ARR", "truth", "locality")
#: Metrics measured on the edit batch just made: one value per batch, not a trend.
PER_BATCH_METRICS: frozenset[str] = frozenset({"ES", "ES_alone"})
#: Vector-database statistics drawn against the number of edits.
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
_MISSING = object()


class BadRun(Exception):
    """A run directory that cannot be used; the message is the reason shown in the report."""


@dataclass
class Run:
    """One usable run: its summary, evaluation curve and method label."""

    path: Path
    summary: dict[str, Any]
    curve: list[dict[str, Any]]
    overrides: dict[str, str] = field(default_factory=dict)
    variant: tuple[str, ...] = ()  # ("key=value", ...), set by assign_variants
    _config: Any = field(default=_MISSING, repr=False)

    @property
    def task(self) -> str:
        return str(self.summary["task"])

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def alg(self) -> str:
        return str(self.summary["alg"])

    @property
    def seed(self) -> int | str:
        return self.summary["seed"]

    @property
    def method(self) -> str:
        """The row label: the algorithm plus the settings that tell its variants apart."""
        return f"{self.alg} ({', '.join(self.variant)})" if self.variant else self.alg

    def setting(self, key: str) -> str | None:
        """The run's value of a dotted config key: its override, else its saved config.

        Numbers are normalized (``1`` and ``1.0`` are the same setting); None when the run has
        neither (a run not started by Hydra, or an unreadable config).
        """
        if key in self.overrides:
            return normalize_value(self.overrides[key])
        if self._config is _MISSING:
            self._config = _read_yaml(self.path / ".hydra" / "config.yaml")
        node: Any = self._config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if isinstance(node, (dict, list)):
            return None
        return normalize_value(node)


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


def is_number(value: Any) -> bool:
    """A JSON number (bool excluded); may be non-finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_value(value: Any) -> str:
    """A setting as text, with numbers in one spelling (``1``, ``1.0`` -> ``1``; ``5e-1`` -> ``0.5``)."""
    if isinstance(value, str):
        try:
            import yaml

            parsed = yaml.safe_load(value)
        except Exception:  # noqa: BLE001 - not YAML: keep the text as it is
            return value
        if not is_number(parsed):
            return value
        value = parsed
    if is_number(value):
        number = float(value)
        if math.isfinite(number) and number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return repr(number)
    return str(value)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        import yaml  # PyYAML comes with Hydra/OmegaConf

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - an unreadable file only loses labels
        log.warning("%s: unreadable (%s); settings from it are unknown", path, exc)
        return None


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

    Without the file (a run not started by Hydra) the run has no overrides; an unreadable one
    only loses the variant label (a warning).
    """
    items = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    if not isinstance(items, list):
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
    """Label runs of one (task, model, alg) by the settings that differ between them.

    A key overridden in some runs is looked up in the saved config of the others, so that a run
    with the default value and one with the same value given explicitly are one variant.
    Settings shared by all those runs (e.g. a sweep-wide ``max_n_edits=50``) are not part of the
    label; seeds and launcher/logging settings never are. Runs whose labels are equal form one
    table row, averaged over their seeds.
    """
    ignored = _NON_VARIANT_PREFIXES + extra_ignored
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.model, run.alg), []).append(run)
    for (_, _, alg), members in groups.items():
        keys = sorted({k for r in members for k in r.overrides if _relevant(k, alg, ignored)})
        values = [{k: (r.setting(k) or "default") for k in keys} for r in members]
        varying = [k for k in keys if len({v[k] for v in values}) > 1]
        for run, value in zip(members, values):
            run.variant = tuple(f"{k}={value[k]}" for k in varying)


def _read_text(path: Path) -> str:
    """A file's text; bytes that are not UTF-8 are a :class:`BadRun` naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadRun(f"{path.name}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})"
                     ) from None


def _check_summary(summary: Any) -> None:
    """Raise :class:`BadRun` unless ``summary`` has the runner's keys with usable values."""
    if not isinstance(summary, dict):
        raise BadRun(f"summary.json: expected a JSON object, got {type(summary).__name__}")
    spec = TASKS.get(str(summary.get("task")))  # its extra keys (holdout, ARR); none if unknown
    required = REQUIRED_SUMMARY_KEYS + (spec.summary_keys if spec is not None else ())
    missing = [key for key in required if key not in summary]
    if missing:
        raise BadRun(f"summary.json: missing keys {', '.join(missing)}")
    for key in IDENTITY_KEYS:
        if not isinstance(summary[key], str) or not summary[key]:
            raise BadRun(f"summary.json: {key} is not a name ({summary[key]!r})")
    seed = summary["seed"]
    if not ((isinstance(seed, int) and not isinstance(seed, bool))
            or (isinstance(seed, str) and seed)):
        raise BadRun(f"summary.json: seed is not an integer ({seed!r})")
    n_edits = summary["n_edits"]
    if not is_number(n_edits) or not math.isfinite(n_edits) or n_edits < 0:
        raise BadRun(f"summary.json: n_edits is not a count ({n_edits!r})")
    # Metric values must be numbers; null is allowed (a metric the run could not compute) and so
    # are NaN and Infinity (shown as such, kept out of the means).
    for key in required:
        if key in IDENTITY_KEYS or key == "seed":
            continue
        value = summary[key]
        if value is not None and not is_number(value):
            raise BadRun(f"summary.json: {key} is not a number ({value!r})")


def _read_curve(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as records sorted by n_edits (the last record of an n_edits wins)."""
    by_edits: dict[float, dict[str, Any]] = {}
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRun(f"metrics.jsonl: line {number} is not UTF-8 text "
                         f"(byte 0x{raw[exc.start]:02x})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = getattr(exc, "msg", type(exc).__name__)
            raise BadRun(f"metrics.jsonl: corrupt line {number} ({msg})") from None
        if not isinstance(row, dict):
            raise BadRun(f"metrics.jsonl: corrupt line {number} (not a JSON object)")
        n_edits = row.get("n_edits")
        if not is_number(n_edits) or not math.isfinite(n_edits) or n_edits < 0:
            raise BadRun(f"metrics.jsonl: corrupt line {number} (no numeric n_edits)")
        for key in CURVE_METRICS + DB_STATS:
            value = row.get(key)
            if value is not None and not is_number(value):
                raise BadRun(f"metrics.jsonl: line {number}: {key} is not a number ({value!r})")
        by_edits[float(n_edits)] = row
    if not by_edits:
        raise BadRun("metrics.jsonl: empty")
    return [by_edits[n] for n in sorted(by_edits)]


def load_run(run_dir: Path) -> Run:
    """Load and validate one run directory; raises :class:`BadRun` with the reason."""
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not summary_path.is_file():
        raise BadRun("summary.json is not a file")
    if not summary_path.is_file():
        # Typical for a job that is still running, crashed or was killed before finishing.
        raise BadRun("missing summary.json (unfinished or failed run)")
    try:
        summary = json.loads(_read_text(summary_path))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadRun(f"summary.json: invalid JSON ({exc})") from None
    _check_summary(summary)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists() and not metrics_path.is_file():
        raise BadRun("metrics.jsonl is not a file")
    if not metrics_path.is_file():
        raise BadRun("missing metrics.jsonl")
    curve = _read_curve(metrics_path)
    return Run(run_dir, summary, curve, read_overrides(run_dir))


def collect(roots: list[Path], extra_ignored: tuple[str, ...] = ()) -> Collection:
    """Find, load and validate every run below ``roots``; nothing in them raises."""
    result = Collection()
    for root in roots:
        if not root.exists():
            result.skipped.append(Skipped(root, "path does not exist"))
        elif not root.is_dir():
            result.skipped.append(Skipped(root, "not a directory (give a run or sweep directory)"))
    for run_dir in find_run_dirs([r for r in roots if r.is_dir()]):
        try:
            result.runs.append(load_run(run_dir))
            continue
        except BadRun as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - any other fault (permissions, I/O) skips it too
            reason = f"unreadable ({type(exc).__name__}: {exc})"
        log.warning("skipping %s: %s", run_dir, reason)
        result.skipped.append(Skipped(run_dir, reason))
    assign_variants(result.runs, extra_ignored)
    return result

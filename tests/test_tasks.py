"""The task registry (btp.tasks) is complete and agrees with the configs, the data layer, the
evaluators, the loop and the report."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from btp.data import Collator, load_task_data
from btp.errors import ConfigError
from btp.evaluation import TaskEvaluator
from btp.families import FAMILIES
from btp.report.runs import CURVE_METRICS, REQUIRED_SUMMARY_KEYS
from btp.schema import ModelKind, Task
from btp.tasks import TASKS, EvalSet, get_task, names_phrase
from btp.tasks.base import RECORD_FIELDS
from btp.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"
DATA = REPO / "data"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _model_configs() -> dict[str, dict]:
    return {p.stem: _yaml(p) for p in sorted((CONFIG / "model").glob("*.yaml"))}


def test_every_experiment_config_selects_a_registered_task() -> None:
    experiments = sorted((CONFIG / "experiment").glob("*.yaml"))
    assert experiments
    for path in experiments:
        task = _yaml(path).get("task")
        assert task in TASKS, f"{path.name} selects task {task!r}, which btp/tasks does not register"
        assert TASKS[task].experiment == path.stem, path.name


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_an_experiment_config_and_a_model(name: str) -> None:
    spec = TASKS[name]
    path = CONFIG / "experiment" / f"{spec.experiment}.yaml"
    assert path.is_file(), f"task {name}: no {path.relative_to(REPO)}"
    assert _yaml(path)["task"] == name
    values = CONFIG / "values" / "experiment" / f"{spec.experiment}.yaml"
    assert values.is_file(), f"task {name}: no {values.relative_to(REPO)} (its hyperparameters)"
    assert "task" not in _yaml(values)
    assert set(spec.model_kinds) <= {k.value for k in ModelKind}
    kinds = {cfg.get("kind") for cfg in _model_configs().values()}
    assert set(spec.model_kinds) & kinds, f"task {name}: no config/model file of kind {spec.model_kinds}"
    # an offline stand-in of a family of that kind exists, so the task's tests need no download
    offline = {cfg.get("kind") for cfg in _model_configs().values() if cfg.get("tiny") is not None}
    assert set(spec.model_kinds) & offline, f"task {name}: no tiny-* model of its kind"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_loads_collates_and_names_its_sets(name: str) -> None:
    """The loader reads the shipped sample, its records collate for the task's model kind, and
    the data's extra sets are exactly the ones the spec evaluates."""
    spec = TASKS[name]
    data = load_task_data(name, {"n_upstream": 3}, DATA, 2, 14)
    assert len(data.edits) == 2 and 1 <= len(data.upstream) <= 3
    provided = {f for f in RECORD_FIELDS if getattr(data, f) is not None}
    assert provided == {s.records for s in spec.eval_sets}, name
    family = next(f for f in FAMILIES.values() if f.kind in spec.model_kinds)
    collate = Collator(get_tokenizer(family.tokenizer), name, 64, 16)
    batch = collate(data.edits)
    assert {"input_ids", "attention_mask", "labels"} <= set(batch)
    assert batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluator_and_report_agree_with_the_spec(name: str) -> None:
    spec = TASKS[name]
    cls = spec.evaluator_class()
    assert issubclass(cls, TaskEvaluator)
    assert cls.higher_is_better == spec.higher_is_better, name
    # every metric the loop writes for the task's sets is drawn by the report
    for s in spec.eval_sets:
        assert s.name in CURVE_METRICS, f"report/runs.py CURVE_METRICS lacks {s.name}"
        if s.asked_alone:
            assert f"{s.name}_alone" in CURVE_METRICS
    assert set(spec.summary_keys) <= {s.name for s in spec.eval_sets}


def test_schema_report_and_runner_read_the_same_tasks() -> None:
    from btp.report.stats import TASK_METRIC, TASK_ORDER
    from btp.runner import SUMMARY_KEYS

    assert [t.value for t in Task] == list(TASKS)
    assert set(TASK_ORDER) == set(TASKS) == set(TASK_METRIC)
    assert TASK_ORDER[:3] == ("scotus", "qa", "hallucination")  # the MELO paper's order
    assert set(REQUIRED_SUMMARY_KEYS) == set(SUMMARY_KEYS)


def test_names_aliases_and_unknown_tasks() -> None:
    assert get_task("hallucinations") is TASKS["hallucination"]
    assert get_task(Task.qa) is TASKS["qa"]
    assert names_phrase() == "qa, scotus, hallucination, zsre or counterfact"
    with pytest.raises(ConfigError, match="unknown task 'qaa'; expected one of qa, scotus"):
        get_task("qaa")


def test_a_malformed_spec_is_refused() -> None:
    spec = TASKS["qa"]
    with pytest.raises(ValueError, match="summary keys \\['ARR'\\] name no evaluation set"):
        replace(spec, summary_keys=("ARR",))
    with pytest.raises(ValueError, match="reads TaskData.rephrases"):
        replace(spec, eval_sets=(EvalSet("holdout", "rephrases"),), summary_keys=())
    with pytest.raises(ValueError, match="collate 'text'"):
        replace(spec, collate="text")
    with pytest.raises(ValueError, match="at most one set is asked alone"):
        replace(spec, eval_sets=(EvalSet("a", "holdout", True), EvalSet("b", "truth", True)),
                summary_keys=())


def test_the_registry_and_the_schema_import_without_torch() -> None:
    """Composing a config (btp.schema reads the task names) and the report stay light."""
    code = ("import sys, btp.schema, btp.tasks; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0

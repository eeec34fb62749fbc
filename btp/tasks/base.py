"""What the runner, the loop and the reports know about one task: :class:`TaskSpec`.

A task module (``btp/tasks/<name>.py``) defines one ``SPEC``; :mod:`btp.tasks` collects them.
This module and the task modules import nothing heavy (no torch, no data loaders at import time):
the schema reads the task names from here when Hydra composes a config, and the report reads the
metric names and directions without loading a model. A spec points at its loader and evaluator;
both are imported when a run first asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from btp.data.common import TaskData
    from btp.evaluation import TaskEvaluator

#: How the collator turns records into tensors (:class:`btp.data.collate.Collator`): the three
#: model kinds' forms, and ``facts`` (``prompt + " " + target``, loss on the target tokens only).
CollateKind = Literal["seq2seq", "classification", "causal_lm", "facts"]
COLLATE_KINDS: tuple[str, ...] = ("seq2seq", "classification", "causal_lm", "facts")
#: The range of a task's headline metric, for the report's bands: a rate in [0, 1] (F1,
#: accuracy), another value >= 0 (perplexity), or any real number.
QualityKind = Literal["rate", "nonnegative", "real"]
#: The fields of :class:`btp.data.common.TaskData` an extra evaluation set can be read from.
RECORD_FIELDS: tuple[str, ...] = ("holdout", "accurate", "truth")


@dataclass(frozen=True)
class LoadArgs:
    """What a task's loader receives (validated by :func:`btp.data.load_task_data`).

    Attributes:
        data_cfg: the ``data`` section as ``btp.schema.DataCfg`` (a key the config lacks holds
            the schema's default).
        data_dir: root of the data layout.
        max_n_edits: cap on the edit stream; ``None``: the task's default.
        n_upstream: upstream records kept (first n); ``None``: all of them.
        num_labels: a classification model's label count, when known.
        get: ``get(key, default)`` reads ``data_cfg`` (``None`` values mean the default).
    """

    data_cfg: Any
    data_dir: Path
    max_n_edits: int | None
    n_upstream: int | None
    num_labels: int | None
    get: Callable[[str, Any], Any]


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set besides the edit stream and upstream.

    Attributes:
        name: the metric prefix in ``metrics.jsonl`` and ``summary.json`` (``holdout``,
            ``holdout_em``, ``holdout_alone``).
        records: the :class:`~btp.data.common.TaskData` field holding its records.
        asked_alone: also score each record in a batch of its own (``<name>_alone``,
            :mod:`btp.asked_alone`); at most one set per task.
        meaning: what it measures, in one line (docs and the report's legend).
    """

    name: str
    records: str
    asked_alone: bool = False
    meaning: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """One sequential-editing task.

    Attributes:
        name: the value of ``task`` (``config/experiment/<experiment>.yaml`` sets it).
        model_kinds: the ``model.kind`` values the task runs on (checked before loading).
        loader: ``LoadArgs -> TaskData``; imports its ``btp.data`` module when called.
        collate: how records become tensors (:data:`COLLATE_KINDS`).
        evaluator: the class name of its evaluator in :mod:`btp.evaluation`.
        quality: the headline metric as the report names it (``F1``, ``perplexity``).
        higher_is_better: the headline metric's direction (the evaluator's must agree).
        quality_kind: the headline metric's range (:data:`QualityKind`).
        eval_sets: the extra evaluation sets, in the order their metrics are written.
        summary_keys: keys of ``summary.json`` the report requires for this task, besides the
            ones every run writes (each is one of ``eval_sets``' names).
        table_rank: where the task's tables go in the report (the MELO paper's order: SCOTUS,
            zsRE QA, hallucination, then the decoder-LLM tasks).
        aliases: other names :func:`btp.tasks.get_task` accepts (older data loaders' spellings).
        experiment: the experiment config that selects it (``config/experiment/<name>.yaml``).
        description: one line for docs and error messages.
    """

    name: str
    model_kinds: tuple[str, ...]
    loader: Callable[[LoadArgs], "TaskData"]
    collate: CollateKind
    evaluator: str
    quality: str
    higher_is_better: bool
    quality_kind: QualityKind
    eval_sets: tuple[EvalSet, ...] = ()
    summary_keys: tuple[str, ...] = ()
    table_rank: int = 100
    aliases: tuple[str, ...] = ()
    experiment: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.experiment:
            object.__setattr__(self, "experiment", self.name)
        if self.collate not in COLLATE_KINDS:
            raise ValueError(f"task {self.name}: collate '{self.collate}' is not one of "
                             f"{COLLATE_KINDS}")
        if self.quality_kind not in ("rate", "nonnegative", "real"):
            raise ValueError(f"task {self.name}: quality_kind '{self.quality_kind}'")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name}: evaluation set names repeat: {names}")
        for s in self.eval_sets:
            if s.records not in RECORD_FIELDS:
                raise ValueError(f"task {self.name}: set {s.name} reads TaskData.{s.records}; "
                                 f"expected one of {RECORD_FIELDS}")
        if sum(s.asked_alone for s in self.eval_sets) > 1:
            raise ValueError(f"task {self.name}: at most one set is asked alone")
        unknown = set(self.summary_keys) - set(names)
        if unknown:
            raise ValueError(f"task {self.name}: summary keys {sorted(unknown)} name no "
                             "evaluation set")

    @property
    def alone_set(self) -> EvalSet | None:
        """The set whose records are also asked one at a time (``None``: none)."""
        return next((s for s in self.eval_sets if s.asked_alone), None)

    def evaluator_class(self) -> type["TaskEvaluator"]:
        """The evaluator class (imports :mod:`btp.evaluation`, which imports torch)."""
        module = importlib.import_module("btp.evaluation")
        return getattr(module, self.evaluator)

    def needs(self) -> str:
        """The model kinds as a phrase: ``seq2seq`` or ``seq2seq or causal_lm``."""
        return " or ".join(self.model_kinds)


__all__ = ["TaskSpec", "EvalSet", "LoadArgs", "COLLATE_KINDS", "RECORD_FIELDS", "CollateKind",
           "QualityKind"]

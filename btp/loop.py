"""The single editing loop, shared by every task and algorithm.

The edit stream arrives as consecutive chunks of the algorithm's edit batch size
(``btp.runner.edit_batch_size``: its section's ``batch_size``, else ``num_edit_per_block``);
each chunk is one edit (one ``Editor.edit`` call). Before the first edit the unedited model is evaluated once
(``n_edits = 0``): its upstream predictions become the locality references, and the record keeps
the pre-edit values (``TRR``, the extra sets' and ``stream_unedited``, the metric on the whole
edit stream before editing). After every ``metric_period`` edits and after the last chunk the
loop evaluates:

* ``ES``: the chunk just edited; ``ERR``: every chunk edited so far (mean of chunk means);
* ``TRR``: upstream; ``locality``: how much of the unedited model's upstream predictions is kept
  (the evaluator's rule: examples predicted exactly as before, or tokens for the fact tasks);
* the task's extra sets, named by its spec (:mod:`btp.tasks`): ``holdout`` (qa, zsre,
  counterfact), ``ARR`` (hallucination) and ``truth`` (zsre, counterfact: the edit prompts with
  their true answers);
* ``ES_alone``, ``ERR_alone`` and ``<set>_alone`` (``holdout_alone``): the same records each
  asked in a batch of its own (``btp.asked_alone``; off with ``eval.alone_records=0``);
* the editor's database ``clusters``/``conflicts``/``forgotten``; cumulative ``edit_time_s``.

For qa the headline values are token F1 and the ``*_em`` keys hold exact match. Each record goes
to ``metrics.jsonl`` (and wandb); after every chunk the caller's ``checkpoint`` callback saves the
state, so that a killed run resumes at the next chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from btp.asked_alone import AskedAlone
from btp.checkpoint import kill_hook
from btp.editors.base import Editor
from btp.data.collate import lazy_batches
from btp.evaluation import TaskEvaluator, evaluate_batches
from btp.outputs import MetricsLog
from btp.progress import bar, logs_above_bars

log = logging.getLogger(__name__)

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


@dataclass
class LoopState:
    """Everything the loop needs to continue after a restart (saved in the checkpoint)."""

    batches_done: int = 0
    n_edits: int = 0
    edit_time_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    refs: list[torch.Tensor] | None = None  # the unedited model's upstream predictions

    def to_json(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "n_edits": self.n_edits,
                "edit_time_s": self.edit_time_s, "records": self.records}

    @classmethod
    def from_json(cls, js: dict[str, Any], refs: list[torch.Tensor] | None) -> "LoopState":
        return cls(batches_done=int(js["batches_done"]), n_edits=int(js["n_edits"]),
                   edit_time_s=float(js["edit_time_s"]), records=list(js["records"]), refs=refs)


@dataclass
class EvalSets:
    """The evaluation sets as record chunks.

    Attributes:
        upstream: scored as ``TRR``; its predictions give ``locality``.
        extra: the task's other sets by metric name (``holdout``, ``ARR``, ``truth``; the
            task's ``eval_sets`` in :mod:`btp.tasks`), scored in this order.
        alone: the name of the extra set whose records :class:`AskedAlone` also scores one at
            a time (``<name>_alone``); ``None``: none.
    """

    upstream: list[list[dict]]
    extra: dict[str, list[list[dict]]] = field(default_factory=dict)
    alone: str | None = None


class EditingLoop:
    """Runs the stream through an editor and evaluates on schedule.

    Args:
        editor: the algorithm (already restored from a checkpoint when resuming).
        evaluator: the task's evaluator.
        collate: records -> tensors.
        stream: the edit chunks, in order.
        sets: upstream and the task's extra sets, as chunks.
        metric_period: evaluate when the edit count crosses a multiple of this.
        metrics_log: where records go.
        checkpoint: called with the state after the pre-edit evaluation and after every chunk.
        progress: show a bar over the edits and, on a terminal, one per evaluated set.
        alone: the records asked alone (``None``: no ``*_alone`` metrics).
    """

    def __init__(self, editor: Editor, evaluator: TaskEvaluator, collate: Collate,
                 stream: list[list[dict]], sets: EvalSets, metric_period: int,
                 metrics_log: MetricsLog, checkpoint: Callable[[LoopState], None],
                 progress: bool = True, alone: AskedAlone | None = None) -> None:
        self.editor = editor
        self.evaluator = evaluator
        self.collate = collate
        self.stream = stream
        self.sets = sets
        self.metric_period = max(1, int(metric_period))
        self.metrics_log = metrics_log
        self.checkpoint = checkpoint
        self.progress = progress
        self.alone = alone if alone is not None and alone.enabled else None
        self._edit_batches: list[dict[str, torch.Tensor]] = []  # tokenized once, reused by ERR

    # -- helpers ---------------------------------------------------------------------------
    def _edit_batch(self, k: int) -> dict[str, torch.Tensor]:
        while len(self._edit_batches) <= k:
            self._edit_batches.append(self.collate(self.stream[len(self._edit_batches)]))
        return self._edit_batches[k]

    def _named(self, prefix: str, means: dict[str, float]) -> dict[str, float]:
        """``{"f1": .., "em": ..}`` -> ``{"ES": f1, "ES_em": em}`` (headline metric unsuffixed).

        An empty set still yields its key (NaN, written as null) so that every record and the
        summary have the same keys.
        """
        means = means or {self.evaluator.main: float("nan")}
        out = {}
        for name, value in means.items():
            out[prefix if name == self.evaluator.main else f"{prefix}_{name}"] = value
        return out

    def _bar(self, label: str, n_batches: int) -> tuple[str, int] | None:
        """``evaluate_batches``'s progress argument (``None`` when bars are off)."""
        return (f"eval {label}", n_batches) if self.progress else None

    def _eval_sets(self, record: dict[str, Any], keep_refs: bool) -> list[torch.Tensor]:
        up = evaluate_batches(self.evaluator, self.editor,
                              lazy_batches(self.sets.upstream, self.collate), keep_preds=True,
                              progress=self._bar("upstream", len(self.sets.upstream)))
        record.update(self._named("TRR", up.means))
        for name, chunks in self.sets.extra.items():
            res = evaluate_batches(self.evaluator, self.editor, lazy_batches(chunks, self.collate),
                                   progress=self._bar(name, len(chunks)))
            record.update(self._named(name, res.means))
            if self.alone is not None and name == self.sets.alone:
                alone = self.alone.holdout_scores(self.evaluator, self.editor, self.collate,
                                                  progress=self.progress)
                record.update(self._named(f"{name}_alone", alone or {}))
        return up.preds

    # -- the two evaluations ------------------------------------------------------------------
    def pre_edit(self, state: LoopState) -> None:
        """Evaluate the unedited model; keep its upstream predictions as locality references."""
        record: dict[str, Any] = {"n_edits": 0}
        preds = self._eval_sets(record, keep_refs=True)
        state.refs = preds
        record["locality"] = 1.0
        stream = evaluate_batches(self.evaluator, self.editor,
                                  (self._edit_batch(k) for k in range(len(self.stream))),
                                  progress=self._bar("edit stream (unedited)", len(self.stream)))
        record.update(self._named("stream_unedited", stream.means))
        record.update(self.editor.stats())
        record["edit_time_s"] = 0.0
        state.records.append(record)
        self.metrics_log.append(record)
        log.info("before editing: %s", _fmt(record))

    def evaluate(self, state: LoopState) -> dict[str, Any]:
        """ES/ERR/TRR/locality/... after ``state.batches_done`` chunks."""
        record: dict[str, Any] = {"n_edits": state.n_edits, "batches": state.batches_done}
        err = evaluate_batches(self.evaluator, self.editor,
                               (self._edit_batch(k) for k in range(state.batches_done)),
                               progress=self._bar("edited batches", state.batches_done))
        # ES is the last chunk's own value; it is one of ERR's chunk means (same forward).
        record.update(self._named("ES", err.per_batch[-1]))
        record.update(self._named("ERR", err.means))
        if self.alone is not None:
            es_alone, err_alone = self.alone.edited(self.evaluator, self.editor, self.collate,
                                                    state.batches_done, progress=self.progress)
            record.update(self._named("ES_alone", es_alone))
            record.update(self._named("ERR_alone", err_alone))
        preds = self._eval_sets(record, keep_refs=False)
        assert state.refs is not None, "pre_edit() must run before evaluate()"
        record["locality"] = self.evaluator.locality(preds, state.refs)
        record.update(self.editor.stats())
        record["edit_time_s"] = state.edit_time_s
        return record

    # -- the loop -----------------------------------------------------------------------------
    def run(self, state: LoopState) -> LoopState:
        """Edit from ``state.batches_done`` to the end of the stream (log lines are printed
        above the bars, never into them)."""
        with logs_above_bars(self.progress):
            return self._run(state)

    def _run(self, state: LoopState) -> LoopState:
        total = sum(len(c) for c in self.stream)
        if state.refs is None:
            self.pre_edit(state)
            self.checkpoint(state)
        edits = bar(total, "editing", "edit", self.progress, initial=state.n_edits)
        try:
            for k in range(state.batches_done, len(self.stream)):
                batch = self._edit_batch(k)
                outcome = self.editor.edit(batch)
                if outcome.losses:
                    log.debug("edit batch %d: loss %.4g -> %.4g over %d steps", k + 1,
                              outcome.losses[0], outcome.losses[-1], len(outcome.losses))
                before = state.n_edits
                state.n_edits += len(self.stream[k])
                state.batches_done = k + 1
                state.edit_time_s += float(outcome.time_s)
                kill_hook("after_edit", state.batches_done)
                last = state.batches_done == len(self.stream)
                if last or state.n_edits // self.metric_period > before // self.metric_period:
                    record = self.evaluate(state)
                    state.records.append(record)
                    self.metrics_log.append(record)
                    log.info("after %d edits: %s", state.n_edits, _fmt(record))
                    edits.set_postfix(ES=_short(record.get("ES")), ERR=_short(record.get("ERR")),
                                      loc=_short(record.get("locality")))
                kill_hook("before_checkpoint", state.batches_done)
                self.checkpoint(state)
                kill_hook("after_checkpoint", state.batches_done)
                edits.update(len(self.stream[k]))
        finally:
            edits.close()
        return state


def _short(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items())

"""Per-task evaluators: how a task's batches are scored (a task's spec in :mod:`btp.tasks` names
its evaluator class here).

Each evaluator scores one tokenized batch with the (edited) ``Editor`` and returns the batch's
mean metrics plus one prediction per example (a 1-D integer tensor) for locality:

* ``qa``: greedy generation (``eval.max_length``); ``f1`` (token-id set F1) and ``em`` (decoded
  exact match); prediction = the generated ids without padding.
* ``scotus``: ``acc`` (argmax accuracy); prediction = the argmax class.
* ``hallucination``: ``ppl`` = exp(the HF loss of the batch); prediction = the per-token argmax
  over the real (attention-masked) positions.
* ``zsre`` and ``counterfact`` (decoder LLMs): ``acc`` = teacher-forced token accuracy on the
  target tokens (EasyEdit's and WISE's Rel./Gen.: the argmax at t - 1 equals token t, averaged
  over an example's target tokens, then over examples); prediction = those argmax tokens, and
  ``locality`` is the fraction of them equal to the unedited model's (EasyEdit's Loc.), averaged
  over examples.

:func:`evaluate_batches` averages batch means (NaN-tolerant), as the original does.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from btp import metrics
from btp.editors.base import Editor
from btp.progress import iterate


@dataclass
class SetResult:
    """Metrics of one evaluated set: mean of batch means per metric, per-batch values, preds."""

    means: dict[str, float]
    per_batch: list[dict[str, float]] = field(default_factory=list)
    preds: list[torch.Tensor] = field(default_factory=list)


class TaskEvaluator(abc.ABC):
    """Scores a batch; ``main`` names the headline metric (ES/ERR/TRR/... are its values)."""

    main: str = "value"
    higher_is_better: bool = True

    def __init__(self, tokenizer: Any, device: torch.device, gen_max_length: int = 20) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.gen_max_length = gen_max_length

    def _to(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    @abc.abstractmethod
    def score(self, editor: Editor, batch: dict[str, torch.Tensor]
              ) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Batch means by metric name, and one prediction tensor per example (on CPU)."""

    def locality(self, preds: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
        """How much of the unedited model's upstream predictions ``preds`` keep: by default the
        fraction of examples predicted exactly as before (:func:`btp.metrics.locality`)."""
        return metrics.locality(preds, refs)


class QAEvaluator(TaskEvaluator):
    main = "f1"

    def score(self, editor: Editor, batch: dict[str, torch.Tensor]
              ) -> tuple[dict[str, float], list[torch.Tensor]]:
        batch = self._to(batch)
        generated = editor.generate(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"],
                                    max_length=self.gen_max_length).cpu()
        labels = batch["labels"].cpu()
        tok = self.tokenizer
        special = set(tok.all_special_ids)
        pad = tok.pad_token_id
        f1s, ems, preds = [], [], []
        for row, gold in zip(generated, labels):
            gold = gold[gold != -100]
            f1s.append(metrics.token_f1(row.tolist(), gold.tolist(), special))
            ems.append(metrics.exact_match(tok.decode(row, skip_special_tokens=True),
                                           tok.decode(gold, skip_special_tokens=True)))
            # Padding after the end (and T5's start token, = pad) carries no prediction.
            preds.append(row[row != pad] if pad is not None else row)
        return {"f1": sum(f1s) / len(f1s), "em": sum(ems) / len(ems)}, preds


class ClassificationEvaluator(TaskEvaluator):
    main = "acc"

    def score(self, editor: Editor, batch: dict[str, torch.Tensor]
              ) -> tuple[dict[str, float], list[torch.Tensor]]:
        batch = self._to(batch)
        out = editor.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pred = out.logits.argmax(-1).cpu()
        acc = metrics.accuracy(pred, batch["labels"].cpu())
        return {"acc": acc}, [p.view(1) for p in pred]


class PerplexityEvaluator(TaskEvaluator):
    main = "ppl"
    higher_is_better = False

    def score(self, editor: Editor, batch: dict[str, torch.Tensor]
              ) -> tuple[dict[str, float], list[torch.Tensor]]:
        batch = self._to(batch)
        out = editor.forward(**batch)
        ppl = metrics.perplexity(out.loss.item())
        argmax = out.logits.argmax(-1).cpu()
        mask = batch["attention_mask"].cpu().bool()
        return {"ppl": ppl}, [a[m] for a, m in zip(argmax, mask)]


class TokenAccuracyEvaluator(TaskEvaluator):
    """Fact editing on decoder LLMs: teacher-forced accuracy on the target tokens."""

    main = "acc"

    def score(self, editor: Editor, batch: dict[str, torch.Tensor]
              ) -> tuple[dict[str, float], list[torch.Tensor]]:
        from btp.data.facts import target_token_predictions

        batch = self._to(batch)
        # labels go in too: they mark the prompt, which a key position may need (and cost one loss)
        out = editor.forward(**batch)
        preds, golds = target_token_predictions(out.logits, batch["labels"])
        accs = [float((p == g).float().mean()) if g.numel() else float("nan")
                for p, g in zip(preds, golds)]
        return {"acc": metrics.nanmean(accs)}, preds

    def locality(self, preds: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
        return metrics.token_agreement(preds, refs)


def make_evaluator(task: str, tokenizer: Any, device: torch.device,
                   gen_max_length: int) -> TaskEvaluator:
    """The evaluator of ``task`` (its spec's ``evaluator``, :mod:`btp.tasks`)."""
    from btp.tasks import get_task

    return get_task(task).evaluator_class()(tokenizer, device, gen_max_length)


@torch.no_grad()
def evaluate_batches(evaluator: TaskEvaluator, editor: Editor,
                     batches: Iterable[dict[str, torch.Tensor]],
                     keep_preds: bool = False, progress: tuple[str, int] | None = None
                     ) -> SetResult:
    """Score every batch; means are the NaN-tolerant mean of the batch means.

    ``progress``: ``(label, number of batches)`` of a transient bar (:mod:`btp.progress`);
    ``None``: no bar.
    """
    per_batch: list[dict[str, float]] = []
    preds: list[torch.Tensor] = []
    if progress is not None:
        batches = iterate(batches, progress[1], progress[0])
    for batch in batches:
        values, batch_preds = evaluator.score(editor, batch)
        per_batch.append(values)
        if keep_preds:
            preds.extend(batch_preds)
    names = per_batch[0].keys() if per_batch else []
    means = {n: metrics.nanmean([b[n] for b in per_batch]) for n in names}
    return SetResult(means=means, per_batch=per_batch, preds=preds)


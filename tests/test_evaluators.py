"""The evaluators (btp.evaluation) on hand-made logits, generations and labels whose scores are
worked out by hand: a stub editor returns them, so each test checks the scoring alone."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from btp.evaluation import (ClassificationEvaluator, PerplexityEvaluator, QAEvaluator,
                            TokenAccuracyEvaluator, evaluate_batches)

CPU = torch.device("cpu")


class StubEditor:
    """Answers ``forward`` with the given logits (and loss) and ``generate`` with given ids."""

    def __init__(self, logits: torch.Tensor | None = None, loss: float | None = None,
                 generated: torch.Tensor | None = None) -> None:
        self.logits, self.loss, self.generated = logits, loss, generated
        self.calls: list[dict[str, Any]] = []

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        self.calls.append(inputs)
        loss = None if self.loss is None else torch.tensor(self.loss)
        return SimpleNamespace(logits=self.logits, loss=loss)

    def generate(self, **inputs: Any) -> torch.Tensor:
        self.calls.append(inputs)
        return self.generated


def one_hot_logits(argmax: list[list[int]], vocab: int = 10) -> torch.Tensor:
    """``[n, L, vocab]`` logits whose argmax at each position is the given token."""
    ids = torch.tensor(argmax)
    return torch.nn.functional.one_hot(ids, vocab).float() * 5.0


class StubTokenizer:
    """Ids 0 (pad) and 1 (eos) are special; other ids decode to ``w<id>`` words."""

    pad_token_id = 0
    all_special_ids = [0, 1]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return " ".join(f"w{i}" for i in ids)


def test_classification_accuracy_and_predictions() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0]])
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long),
             "attention_mask": torch.ones(3, 4, dtype=torch.long),
             "labels": torch.tensor([0, 2, 2])}
    ev = ClassificationEvaluator(None, CPU)
    values, preds = ev.score(StubEditor(logits), batch)
    assert values == {"acc": pytest.approx(2 / 3)}  # rows 0 and 2 right, row 1 predicts 1
    assert [p.tolist() for p in preds] == [[0], [1], [2]]
    refs = [torch.tensor([0]), torch.tensor([2]), torch.tensor([2])]
    assert ev.locality(preds, refs) == pytest.approx(2 / 3)  # row 1 changed its class


def test_perplexity_is_exp_of_the_loss_and_predictions_skip_padding() -> None:
    logits = one_hot_logits([[3, 4, 5], [6, 7, 8]])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.ones(2, 3, dtype=torch.long)}
    ev = PerplexityEvaluator(None, CPU)
    values, preds = ev.score(StubEditor(logits, loss=math.log(4.0)), batch)
    assert values == {"ppl": pytest.approx(4.0)}
    assert [p.tolist() for p in preds] == [[3, 4, 5], [6, 7]]  # the pad position left out
    assert not ev.higher_is_better


def test_token_accuracy_is_teacher_forced_on_the_target_tokens() -> None:
    # Row 0: target tokens 5, 7 at positions 2, 3; the logits at 1 and 2 predict 5 and 9: 1/2.
    # Row 1: target token 4 at position 3; the logit at 2 predicts 4: 1/1.
    logits = one_hot_logits([[0, 5, 9, 2], [0, 0, 4, 3]])
    labels = torch.tensor([[-100, -100, 5, 7], [-100, -100, -100, 4]])
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long),
             "attention_mask": torch.ones(2, 4, dtype=torch.long), "labels": labels}
    ev = TokenAccuracyEvaluator(None, CPU)
    values, preds = ev.score(StubEditor(logits), batch)
    assert values == {"acc": pytest.approx(0.75)}  # mean over examples of 0.5 and 1.0
    assert [p.tolist() for p in preds] == [[5, 9], [4]]
    # locality: token agreement per example, averaged: row 0 keeps 1 of 2, row 1 its one token
    refs = [torch.tensor([5, 7]), torch.tensor([4])]
    assert ev.locality(preds, refs) == pytest.approx(0.75)


def test_qa_token_f1_exact_match_and_predictions_without_padding() -> None:
    # Row 0 generates the gold answer (after T5's start token 0): F1 1, EM 1.
    # Row 1 generates {5, 7} for gold {5, 6}: precision 1/2, recall 1/2, F1 1/2; EM 0.
    generated = torch.tensor([[0, 5, 6, 1, 0], [0, 5, 7, 1, 0]])
    labels = torch.tensor([[5, 6, 1], [5, 6, 1]])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long),
             "attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": labels}
    editor = StubEditor(generated=generated)
    ev = QAEvaluator(StubTokenizer(), CPU, gen_max_length=7)
    values, preds = ev.score(editor, batch)
    assert values == {"f1": pytest.approx(0.75), "em": pytest.approx(0.5)}
    assert [p.tolist() for p in preds] == [[5, 6, 1], [5, 7, 1]]
    assert editor.calls[0]["max_length"] == 7  # eval.max_length reaches generate


def test_qa_f1_ignores_label_padding() -> None:
    generated = torch.tensor([[0, 5, 1]])
    labels = torch.tensor([[5, 1, -100]])
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long),
             "attention_mask": torch.ones(1, 2, dtype=torch.long), "labels": labels}
    values, _ = QAEvaluator(StubTokenizer(), CPU).score(StubEditor(generated=generated), batch)
    assert values == {"f1": 1.0, "em": 1.0}


def test_evaluate_batches_averages_batch_means_and_skips_nan() -> None:
    """The original's mean of batch means: a batch of 1 counts as much as a batch of 3; a batch
    without a value (NaN) is left out."""
    ev = ClassificationEvaluator(None, CPU)

    class Editor(StubEditor):
        def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=next(results), loss=None)

    def batch(labels: list[int]) -> dict[str, torch.Tensor]:
        n = len(labels)
        return {"input_ids": torch.ones(n, 2, dtype=torch.long),
                "attention_mask": torch.ones(n, 2, dtype=torch.long),
                "labels": torch.tensor(labels)}

    empty = {"input_ids": torch.ones(0, 2, dtype=torch.long),
             "attention_mask": torch.ones(0, 2, dtype=torch.long),
             "labels": torch.zeros(0, dtype=torch.long)}
    results = iter([torch.tensor([[1.0, 0.0]] * 3), torch.zeros(0, 2), torch.tensor([[0.0, 1.0]])])
    res = evaluate_batches(ev, Editor(), [batch([0, 0, 1]), empty, batch([0])], keep_preds=True)
    assert [b["acc"] for b in res.per_batch][0] == pytest.approx(2 / 3)
    assert math.isnan(res.per_batch[1]["acc"]) and res.per_batch[2]["acc"] == 0.0
    assert res.means == {"acc": pytest.approx((2 / 3 + 0.0) / 2)}
    assert [p.tolist() for p in res.preds] == [[0], [0], [0], [1]]

"""Metric functions: token F1 and exact match (qa), accuracy (scotus), perplexity
(hallucination), locality, and the original's averaging (mean of batch means, NaN-tolerant).

All functions are pure (no model calls) so that they can be tested on hand-made inputs.

QA F1 follows the original's definition on token ids: the prediction and the gold answer are each
reduced to their *set* of token ids (special tokens such as pad/eos removed), and
``F1 = 2 P R / (P + R)`` with ``P = |common| / |pred|``, ``R = |common| / |gold|``.

Zero-overlap decision (a listed deviation): in the original, one example with no token in common
with its answer zeroes the F1 of its whole batch (the batch value is computed in a way that
collapses to 0 when any example has zero overlap; unverified at run time). We compute F1 per
example and average over the batch, so a zero-overlap example contributes 0 for itself only.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def token_f1(pred_ids: Iterable[int], gold_ids: Iterable[int], ignore: Iterable[int] = ()) -> float:
    """F1 between the sets of token ids of a prediction and its gold answer.

    Args:
        pred_ids: generated token ids of one example.
        gold_ids: gold label token ids of one example (``-100`` padding allowed; it is dropped).
        ignore: ids removed from both sides first (pad, eos, other special tokens).

    Returns:
        0.0 when there is no overlap or the prediction is empty; 1.0 when both sides are empty
        (nothing to predict and nothing predicted).
    """
    skip = set(int(i) for i in ignore) | {-100}
    pred = {int(i) for i in pred_ids} - skip
    gold = {int(i) for i in gold_ids} - skip
    if not pred and not gold:
        return 1.0
    common = len(pred & gold)
    if common == 0:
        return 0.0
    precision = common / len(pred)
    recall = common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the decoded strings are equal after stripping surrounding whitespace."""
    return float(pred.strip() == gold.strip())


def accuracy(pred_classes: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose predicted class equals the label."""
    if labels.numel() == 0:
        return float("nan")
    return (pred_classes.view(-1) == labels.view(-1).to(pred_classes.device)).float().mean().item()


def perplexity(mean_loss: float | torch.Tensor) -> float:
    """``exp`` of a batch's mean token loss (HF's loss), as the original; inf on overflow."""
    value = float(mean_loss)
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite-or-inf values, ignoring NaN; NaN when nothing is left.

    Used for the original's "mean of batch means": each batch contributes its own mean once.
    """
    kept = [float(v) for v in values if not math.isnan(float(v))]
    if not kept:
        return float("nan")
    return sum(kept) / len(kept)


def locality(preds: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Fraction of examples whose prediction equals the unedited model's, exactly.

    A prediction is a 1-D integer tensor per example: the generated ids (qa), the class (scotus)
    or the per-token argmax over the real tokens (hallucination).
    """
    if len(preds) != len(refs):
        raise ValueError(f"locality: {len(preds)} predictions vs {len(refs)} references")
    if not refs:
        return float("nan")
    same = sum(1 for p, r in zip(preds, refs) if torch.equal(p.cpu(), r.cpu()))
    return same / len(refs)


def token_agreement(preds: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Per example, the fraction of positions where the prediction equals the unedited model's
    token (EasyEdit's locality), averaged over examples.

    Each prediction is a 1-D tensor of the teacher-forced argmax tokens of one example; a
    prediction of another length than its reference counts as 0 for that example.
    """
    if len(preds) != len(refs):
        raise ValueError(f"locality: {len(preds)} predictions vs {len(refs)} references")
    if not refs:
        return float("nan")
    values = []
    for p, r in zip(preds, refs):
        p, r = p.cpu(), r.cpu()
        if p.shape != r.shape:
            values.append(0.0)
        elif r.numel() == 0:
            values.append(1.0)
        else:
            values.append(float((p == r).float().mean()))
    return sum(values) / len(values)


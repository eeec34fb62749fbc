"""Metric functions (btp/metrics.py) on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from btp import metrics


def test_token_f1_sets_and_specials() -> None:
    assert metrics.token_f1([5, 6, 1], [5, 6, 1, -100], ignore=[0, 1]) == 1.0
    # unique ids: a repeated token counts once on each side
    assert metrics.token_f1([5, 5, 6], [5, 7], ignore=[]) == pytest.approx(0.5)
    # pred {5, 6}, gold {5, 7, 8}: P = 1/2, R = 1/3 -> F1 = 0.4
    assert metrics.token_f1([5, 6], [5, 7, 8]) == pytest.approx(0.4)


def test_token_f1_zero_overlap_is_zero_for_that_example_only() -> None:
    assert metrics.token_f1([9], [5]) == 0.0
    assert metrics.token_f1([0, 1], [5, 1], ignore=[0, 1]) == 0.0  # only specials predicted
    # one example's 0 stays its own: the batch value is the mean of the examples' F1s
    # (QAEvaluator, tests/test_evaluators.py: rows of F1 1.0 and 0.5 give 0.75)
    assert metrics.token_f1([5], [5]) == 1.0
    assert metrics.token_f1([], [], ignore=[]) == 1.0


def test_exact_match_accuracy_perplexity() -> None:
    assert metrics.exact_match(" Paris ", "Paris") == 1.0
    assert metrics.exact_match("paris", "Paris") == 0.0
    assert metrics.accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == float("inf")


def test_nanmean_is_mean_of_batch_means() -> None:
    # batches of different sizes each count once (mean of batch means, as the original)
    assert metrics.nanmean([1.0, 0.0, float("nan")]) == 0.5
    assert math.isnan(metrics.nanmean([float("nan")]))
    assert math.isnan(metrics.nanmean([]))


def test_locality_and_pack_roundtrip() -> None:
    from btp.checkpoint import pack, unpack

    refs = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.long)]
    preds = [torch.tensor([1, 2]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    assert metrics.locality(preds, refs) == pytest.approx(2 / 3)
    flat, offsets = pack(refs)
    back = unpack(flat, offsets)
    assert all(torch.equal(a, b) for a, b in zip(back, refs)) and len(back) == 3
    with pytest.raises(ValueError, match="2 predictions vs 3 references"):
        metrics.locality(preds[:2], refs)

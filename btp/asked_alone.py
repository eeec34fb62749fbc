"""Edits asked alone: each edited (or holdout) record evaluated in a batch of its own.

The original evaluates an edit inside the padded batch it was edited with (ES, ERR). With the
faithful key (token -1 of the padded batch, often a pad) a question asked on its own has another
key and may miss its block, which those numbers cannot show. ``ES_alone`` (the chunk just
edited), ``ERR_alone`` (every chunk so far, mean of chunk means as ERR) and ``holdout_alone``
score the same records one at a time.

The cost is bounded by ``eval.alone_records``: a fixed subset of at most that many records of
the stream (and of the holdout set), drawn once with its own seeded generator so that the run's
global random state, and with it every other number, is unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from btp import metrics
from btp.editors.base import Editor
from btp.evaluation import TaskEvaluator, evaluate_batches

Collate = Callable[[list[dict]], dict[str, torch.Tensor]]


def fixed_subset(n: int, limit: int, seed: int) -> list[int]:
    """Sorted indices of at most ``limit`` of ``n`` items: all of them when ``n <= limit``."""
    if limit <= 0:
        return []
    if n <= limit:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


@dataclass
class AskedAlone:
    """Which records are asked alone, and their scores for one evaluation.

    Args:
        stream: the edit chunks, in order.
        holdout: the holdout records (``None`` where the task has none).
        limit: ``eval.alone_records``; 0 turns the metrics off.
        seed: the run's seed (the subset is the same on resume and across methods).
    """

    stream: Sequence[list[dict]]
    holdout: list[dict] | None
    limit: int
    seed: int

    def __post_init__(self) -> None:
        sizes = [len(chunk) for chunk in self.stream]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        chosen = set(fixed_subset(sum(sizes), self.limit, self.seed))
        # per chunk, the positions of its records in the subset
        self._stream_subset = [[i for i in range(size) if start + i in chosen]
                               for start, size in zip(starts, sizes)]
        self._holdout_subset = (fixed_subset(len(self.holdout), self.limit, self.seed + 1)
                                if self.holdout is not None else [])

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _scores(self, evaluator: TaskEvaluator, editor: Editor, collate: Collate,
                records: list[dict], label: str | None) -> list[dict[str, float]]:
        """One value dict per record, each scored in a batch of its own (``label``: the
        progress bar's, ``None``: no bar)."""
        bar = (label, len(records)) if label is not None else None
        return evaluate_batches(evaluator, editor, (collate([r]) for r in records),
                                progress=bar).per_batch

    def edited(self, evaluator: TaskEvaluator, editor: Editor, collate: Collate,
               batches_done: int, progress: bool = False
               ) -> tuple[dict[str, float], dict[str, float]]:
        """(ES_alone, ERR_alone) means by metric name after ``batches_done`` chunks.

        ES_alone: every record of the last chunk (at most ``limit`` of them). ERR_alone: the
        subset's records of every chunk so far, averaged per chunk, then over chunks (NaN-
        tolerant, as ERR); chunks without a subset record do not count. Every record is asked
        once, under one progress bar.
        """
        last_k = batches_done - 1
        last = self.stream[last_k]
        es_idx = fixed_subset(len(last), self.limit, self.seed + 2)
        chunks = [k for k in range(batches_done) if self._stream_subset[k]]
        # the last chunk's subset records were asked for ES_alone when all of them are there
        reuse_last = set(self._stream_subset[last_k]) <= set(es_idx)
        asked = [last[i] for i in es_idx] + [
            self.stream[k][i] for k in chunks if not (k == last_k and reuse_last)
            for i in self._stream_subset[k]]
        scores = self._scores(evaluator, editor, collate, asked,
                              "eval edits asked alone" if progress else None)
        es_scores = scores[:len(es_idx)]
        es_by_pos = dict(zip(es_idx, es_scores))
        rest = iter(scores[len(es_idx):])
        chunk_means: list[dict[str, float]] = []
        for k in chunks:
            picked = self._stream_subset[k]
            if k == last_k and reuse_last:
                chunk_means.append(_mean([es_by_pos[i] for i in picked]))
            else:
                chunk_means.append(_mean([next(rest) for _ in picked]))
        return _mean(es_scores), _mean(chunk_means)

    def holdout_scores(self, evaluator: TaskEvaluator, editor: Editor, collate: Collate,
                       progress: bool = False) -> dict[str, float] | None:
        """holdout_alone means by metric name, or ``None`` where the task has no holdout set."""
        if self.holdout is None:
            return None
        records = [self.holdout[i] for i in self._holdout_subset]
        return _mean(self._scores(evaluator, editor, collate, records,
                                  "eval holdout asked alone" if progress else None))


def _mean(values: list[dict[str, float]]) -> dict[str, float]:
    """NaN-tolerant mean per metric name (empty -> empty: the caller writes NaN)."""
    if not values:
        return {}
    return {name: metrics.nanmean([v[name] for v in values]) for name in values[0]}

"""Edits asked alone (``btp.asked_alone``): ES_alone / ERR_alone / holdout_alone in the loop,
the seeded subset that bounds their cost, and the global random state left untouched."""

from __future__ import annotations

import random

import pytest
import torch

from btp.asked_alone import AskedAlone, fixed_subset
from btp.loop import EditingLoop, EvalSets, LoopState
from btp.outputs import MetricsLog
from tests.test_runner_loop import MemoEditor, MemoEvaluator, collate


class PaddedKeyEditor(MemoEditor):
    """Knows an edited id when asked in its edit batch; asked alone it knows only even ids
    (like a padded key that changes with the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[frozenset[int]] = []
        self.alone_calls = 0

    def edit(self, batch):
        self.batches.append(frozenset(batch["ids"].tolist()))
        return super().edit(batch)


class PaddedKeyEvaluator(MemoEvaluator):
    def score(self, editor, batch):
        ids = batch["ids"].tolist()
        if len(ids) == 1:
            editor.alone_calls += 1
            right = [1.0 if (ids[0] in editor.known and ids[0] % 2 == 0) or ids[0] >= 1000 else 0.0]
        else:
            right = [1.0 if i in editor.known or i >= 1000 else 0.0 for i in ids]
        return {"acc": sum(right) / len(right)}, [torch.tensor([i]) for i in ids]


def _loop(tmp_path, stream, holdout, limit, seed=0):
    editor = PaddedKeyEditor()
    sets = EvalSets(upstream=[[{"id": 1000}, {"id": 1001}]],
                    extra={"holdout": [holdout]} if holdout is not None else {}, alone="holdout")
    alone = AskedAlone(stream, holdout, limit, seed)
    loop = EditingLoop(editor, PaddedKeyEvaluator(None, torch.device("cpu")), collate, stream, sets,
                       metric_period=4, metrics_log=MetricsLog(tmp_path, type("W", (), {"mode": "disabled"})(), {}, "t"),
                       checkpoint=lambda st: None, progress=False, alone=alone)
    return editor, loop


def test_alone_metrics_score_each_record_in_a_batch_of_its_own(tmp_path) -> None:
    # chunks [0,1,2,3] [4,5,6,7] [8,9]; asked alone only the even ids are right
    stream = [[{"id": i} for i in range(s, min(s + 4, 10))] for s in range(0, 10, 4)]
    holdout = [{"id": 1000}, {"id": 7}]
    editor, loop = _loop(tmp_path, stream, holdout, limit=500)
    state = loop.run(LoopState())
    first, final = state.records[1], state.records[-1]
    assert first["n_edits"] == 4 and first["ES"] == 1.0 and first["ES_alone"] == 0.5
    assert first["ERR_alone"] == 0.5
    assert final["ES"] == 1.0 and final["ES_alone"] == 0.5  # ids 8 (right) and 9 (wrong)
    assert final["ERR"] == 1.0 and final["ERR_alone"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert final["holdout_alone"] == 0.5  # 1000 right, 7 wrong
    assert state.records[0]["holdout_alone"] == 0.5  # the pre-edit record has it too
    assert "ES_alone" not in state.records[0]


def test_a_large_stream_is_asked_through_a_fixed_seeded_subset(tmp_path) -> None:
    stream = [[{"id": i} for i in range(s, s + 10)] for s in range(0, 40, 10)]
    editor, loop = _loop(tmp_path, stream, None, limit=6, seed=3)
    state = loop.run(LoopState())
    assert "holdout_alone" not in state.records[-1]
    # per evaluation at most ``limit`` records of the last chunk plus the subset of earlier chunks
    subset = fixed_subset(40, 6, 3)
    assert len(subset) == 6 and subset == fixed_subset(40, 6, 3) != fixed_subset(40, 6, 4)
    assert editor.alone_calls <= 4 * (6 + 6)
    final = state.records[-1]
    assert 0.0 <= final["ERR_alone"] <= 1.0 and 0.0 <= final["ES_alone"] <= 1.0


def test_alone_records_zero_turns_the_metrics_off(tmp_path) -> None:
    stream = [[{"id": 0}, {"id": 1}]]
    editor, loop = _loop(tmp_path, stream, [{"id": 1}, {"id": 2}], limit=0)
    state = loop.run(LoopState())
    assert editor.alone_calls == 0
    assert not [k for k in state.records[-1] if "alone" in k]


def test_the_subset_leaves_the_global_random_state_untouched() -> None:
    random.seed(5)
    torch.manual_seed(5)
    want_py, want_torch = random.random(), torch.rand(1)
    random.seed(5)
    torch.manual_seed(5)
    AskedAlone([[{"id": i} for i in range(50)]], [{"id": 0}] * 50, limit=7, seed=1)
    fixed_subset(1000, 10, 2)
    assert random.random() == want_py and torch.equal(torch.rand(1), want_torch)


@pytest.mark.parametrize("n,limit,want", [(5, 10, 5), (5, 5, 5), (50, 10, 10), (3, 0, 0)])
def test_fixed_subset_sizes(n: int, limit: int, want: int) -> None:
    picked = fixed_subset(n, limit, seed=0)
    assert len(picked) == want and picked == sorted(set(picked)) and all(0 <= i < n for i in picked)

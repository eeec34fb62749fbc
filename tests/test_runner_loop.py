"""The editing loop with a trivial in-test editor: evaluation schedule, ES/ERR/TRR/locality
definitions, mean of batch means, checkpoint calls, metrics records."""

from __future__ import annotations

from pathlib import Path

import torch

from btp.editors.base import EditOutcome, Editor
from btp.evaluation import TaskEvaluator
from btp.loop import EditingLoop, EvalSets, LoopState
from btp.outputs import MetricsLog


class MemoEditor(Editor):
    """Remembers edited ids; after ``forget_after`` edits it changes upstream id 100's output."""

    def __init__(self, forget_after: int = 10**9) -> None:
        super().__init__(torch.nn.Identity(), None, None)
        self.known: set[int] = set()
        self.forget_after = forget_after

    def edit(self, batch):
        self.known.update(batch["ids"].tolist())
        return EditOutcome(losses=[0.0], time_s=0.5)

    def forward(self, **inputs):
        return inputs["ids"]

    def generate(self, **inputs):
        raise NotImplementedError

    def stats(self):
        return {"clusters": len(self.known), "conflicts": 0, "forgotten": 0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def save_pretrained(self, directory):
        pass


class MemoEvaluator(TaskEvaluator):
    main = "acc"

    def score(self, editor, batch):
        ids = batch["ids"].tolist()
        right = [1.0 if i in editor.known or i >= 100 else 0.0 for i in ids]
        preds = [torch.tensor([i + (1 if i == 100 and len(editor.known) >= editor.forget_after
                                    else 0)]) for i in ids]
        return {"acc": sum(right) / len(right)}, preds


def collate(records):
    return {"ids": torch.tensor([r["id"] for r in records])}


def _loop(tmp_path: Path, editor: MemoEditor, period: int, saves: list):
    stream = [[{"id": i} for i in range(k, min(k + 3, 8))] for k in range(0, 8, 3)]  # 3, 3, 2
    sets = EvalSets(upstream=[[{"id": 100}, {"id": 101}], [{"id": 102}]],
                    extra={"holdout": [[{"id": 50}]]})
    log = MetricsLog(tmp_path, type("W", (), {"mode": "disabled"})(), {}, "test")
    log.reset([])
    return EditingLoop(editor, MemoEvaluator(None, torch.device("cpu")), collate, stream, sets,
                       period, log, lambda st: saves.append(st.batches_done), progress=False)


def test_schedule_and_definitions(tmp_path: Path) -> None:
    saves: list[int] = []
    state = _loop(tmp_path, MemoEditor(forget_after=6), period=6, saves=saves).run(LoopState())
    # pre-edit record, then n_edits crossing 6 (after batch 2) and the last batch (8 edits)
    assert [r["n_edits"] for r in state.records] == [0, 6, 8]
    assert saves == [0, 1, 2, 3]  # after the pre-edit evaluation and after every batch
    pre, mid, last = state.records
    assert pre["stream_unedited"] == 0.0 and pre["locality"] == 1.0
    assert mid["ES"] == 1.0 and mid["ERR"] == 1.0 and mid["batches"] == 2
    assert mid["holdout"] == 0.0
    # upstream: every id >= 100 counts as right; TRR is the mean of batch means
    assert mid["TRR"] == 1.0
    # id 100's prediction changed after 6 edits: 1 of 3 upstream examples differs
    assert mid["locality"] == 2 / 3 and last["locality"] == 2 / 3
    assert last["edit_time_s"] == 1.5 and last["clusters"] == 8
    assert state.n_edits == 8 and state.batches_done == 3


def test_resume_state_continues(tmp_path: Path) -> None:
    saves: list[int] = []
    editor = MemoEditor()
    loop = _loop(tmp_path, editor, period=100, saves=saves)
    first = loop.run(LoopState())
    assert [r["n_edits"] for r in first.records] == [0, 8]  # only pre-edit and the last batch
    # a state that already finished runs no batch again
    again = LoopState.from_json(first.to_json(), first.refs)
    saves.clear()
    loop.run(again)
    assert saves == [] and again.records == first.records

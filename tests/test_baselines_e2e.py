"""End-to-end: every baseline through ``btp.runner.run`` on the tiny models and shipped sample.

Each run differs from MELO's only in ``+alg=...`` (plus small iteration counts to keep the tests
short); the outputs must have MELO's summary/metrics keys, an ``adapter/`` written by the
editor's ``save_pretrained`` and a checkpoint from which an interrupted run resumes to the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from btp.editors.base import EDITORS

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
TASKS = {  # task -> tiny model
    "qa": "tiny-t5small",
    "scotus": "tiny-scotus-bert",
    "hallucination": "tiny-gpt2xl",
}
SMALL = ["max_n_edits=4", "num_edit_per_block=2", "metric_period=2", "eval.batch_size=4",
         "melo.num_iter=3", "grace.num_iter=3", "ft.num_iter=3", "plain_lora.num_iter=3",
         "ewc.fisher_n_batches=2", "data.n_upstream=8", "eval.max_length=8",
         "data.max_length=64"]
BASELINES = ("grace", "ft", "ft_ewc", "plain_lora")
METRIC_KEYS = ("ES", "ERR", "TRR", "locality")


def _compose(task: str, alg: str, extra: list[str] = ()):
    from hydra import compose, initialize_config_dir

    if not (CONFIG_DIR / "model" / f"{TASKS[task]}.yaml").exists():
        pytest.skip(f"config/model/{TASKS[task]}.yaml is not there yet")
    mine = {o.split("=", 1)[0] for o in extra}
    small = [o for o in SMALL if o.split("=", 1)[0] not in mine]  # ``extra`` wins
    overrides = [f"+alg={alg}", f"+experiment={task}", f"+model={TASKS[task]}", *small, *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _run(task: str, alg: str, run_dir: Path, extra: list[str] = ()) -> dict:
    from btp.runner import run

    return run(_compose(task, alg, extra), run_dir=run_dir, progress=False)


@pytest.fixture(scope="module")
def melo_keys(tmp_path_factory) -> dict[str, tuple[set, set]]:
    """Per task: MELO's summary keys and metrics.jsonl keys (computed on first use)."""
    cache: dict[str, tuple[set, set]] = {}

    def get(task: str) -> tuple[set, set]:
        if task not in cache:
            d = tmp_path_factory.mktemp(f"melo_{task}")
            summary = _run(task, "lora", d)
            lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            cache[task] = (set(summary), set(lines[-1]))
        return cache[task]

    return get


def _metric_keys(d: Path) -> set:
    return set(json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]))


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("alg", BASELINES)
def test_baseline_runs_like_melo(alg: str, task: str, tmp_path: Path, melo_keys) -> None:
    assert alg in EDITORS
    summary = _run(task, alg, tmp_path)
    want_summary, want_metrics = melo_keys(task)
    assert set(summary) == want_summary
    assert _metric_keys(tmp_path) == want_metrics
    assert json.loads((tmp_path / "summary.json").read_text())["alg"] == alg
    assert summary["n_edits"] == 4 and summary["edit_time_s"] > 0
    # The stream is cut by the algorithm's batch_size: GRACE's, FT's and FT+EWC's is 1 (the GRACE
    # repository edits one record at a time), plain LoRA's is null (num_edit_per_block=2).
    assert summary["n_batches"] == (2 if alg == "plain_lora" else 4)
    for key in METRIC_KEYS:  # a value for every metric; ES is NaN where the last chunk has no
        # target token left (a hallucination record cut to data.max_length=64), the others not
        assert isinstance(summary[key], float), key
        assert key == "ES" or math.isfinite(summary[key]), key
    assert 0.0 <= summary["locality"] <= 1.0
    if alg == "grace":
        assert summary["clusters"] >= 1 and summary["forgotten"] == 0
    else:
        assert summary["clusters"] == summary["conflicts"] == 0
    adapter = tmp_path / "adapter"
    assert adapter.is_dir() and any(p.suffix == ".safetensors" for p in adapter.iterdir())
    assert (tmp_path / "checkpoint").is_dir()


@pytest.mark.parametrize("alg", BASELINES)
def test_baseline_resumes_to_the_same_numbers(alg: str, tmp_path: Path, monkeypatch) -> None:
    """Interrupt after the first edit batch; the resumed run ends where an unbroken one does."""
    task = "qa"
    full = _run(task, alg, tmp_path / "full")
    cls = EDITORS[alg]
    real_edit = cls.edit
    calls = {"n": 0}

    def failing_edit(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_edit(self, batch)

    monkeypatch.setattr(cls, "edit", failing_edit)
    with pytest.raises(KeyboardInterrupt):
        _run(task, alg, tmp_path / "resumed")
    monkeypatch.setattr(cls, "edit", real_edit)
    resumed = _run(task, alg, tmp_path / "resumed")
    for key in (*METRIC_KEYS, "clusters", "conflicts", "forgotten", "n_edits"):
        assert resumed[key] == full[key], key


@pytest.mark.parametrize("alg", ["ft", "ft_ewc"])
def test_ft_learns_each_edit_and_forgets_earlier_ones(alg: str, tmp_path: Path) -> None:
    """With the GRACE repository's values (Adam 1e-2, up to 100 steps, early stop, one record at a
    time, GRACE's layer only) FT and FT+EWC learn every current edit on the shipped qa sample
    with the tiny T5, and forget: earlier edits (ERR) and upstream predictions (locality) go.
    TRR stays at the random stand-in's 0 (its upstream F1 is 0 before editing too)."""
    n = 6
    summary = _run("qa", alg, tmp_path, ["ft.num_iter=100", f"max_n_edits={n}", "metric_period=1",
                                         "ewc.fisher_n_batches=10", "eval.max_length=20",
                                         "eval.alone_records=0"])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    es = [r["ES"] for r in records if r["n_edits"] > 0]
    assert len(es) == n and sum(es) / n >= 0.9
    assert summary["pre_edit"]["stream_unedited"] < 0.1
    assert summary["ERR"] < 0.9 * (sum(es) / n)  # earlier edits are forgotten
    assert summary["locality"] < 1.0
    assert summary["TRR"] <= summary["pre_edit"]["TRR"] + 1e-9

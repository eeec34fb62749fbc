"""WISE, MEMIT and AlphaEdit through the runner on the tiny Llama stand-in with the shipped zsRE
and CounterFact samples: a ``summary.json`` with the fact tasks' keys, an ``adapter/`` written by
the editor, a run stopped after an edit that was not checkpointed that resumes to the same
summary and metrics (stopped in this process; the real SIGKILL of a subprocess is
tests/test_resume.py's), and the runs in ``python -m btp.report``'s tables. Everything runs in
this process (``python run.py`` through runpy), without a new interpreter's imports.

Iteration counts are cut to keep the tests short (the methods' own values are in
config/alg/*.yaml); the tiny model is random, so the values are not checked, only the plumbing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btp import checkpoint
from tests.test_runner_helpers import read_metrics, read_summary, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
ALGS = ("wise", "memit", "alphaedit")
TASKS = ("zsre", "counterfact")
FACT_KEYS = {"task", "alg", "model", "seed", "n_edits", "ES", "ERR", "TRR", "locality",
             "holdout", "truth", "ES_alone", "ERR_alone", "holdout_alone", "clusters",
             "conflicts", "forgotten", "edit_time_s", "n_batches", "pre_edit"}


def _small(alg: str, stats_dir: Path) -> list[str]:
    return ["max_n_edits=3", "data.n_upstream=6", "eval.alone_records=3", "threads=1",
            "wise.num_iter=3", "wise.context_templates=false", "memit.v_num_grad_steps=3",
            "alphaedit.v_num_grad_steps=3",
            f"memit.stats_dir={stats_dir}", f"alphaedit.stats_dir={stats_dir}"]


def _compose(alg: str, task: str, extra: list[str]):
    from hydra import compose, initialize_config_dir

    overrides = [f"+alg={alg}", f"+experiment={task}", "+model=tiny-llama", *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("alg", ALGS)
def test_runs_through_the_loop(alg: str, task: str, tmp_path: Path) -> None:
    from btp.runner import run

    summary = run(_compose(alg, task, _small(alg, tmp_path / "stats")), run_dir=tmp_path / "run",
                  progress=False)
    assert set(summary) == FACT_KEYS
    on_disk = read_summary(tmp_path / "run")
    assert on_disk["alg"] == alg and on_disk["task"] == task and on_disk["n_edits"] == 3
    for key in ("ES", "ERR", "TRR", "locality", "holdout", "truth"):
        assert 0.0 <= summary[key] <= 1.0, key
    # one fact per edit: zsre/counterfact set num_edit_per_block 1, WISE's batch_size is 1
    assert summary["n_batches"] == 3
    adapter = tmp_path / "run" / "adapter"
    assert any(p.suffix == ".safetensors" for p in adapter.iterdir())
    if alg != "wise":  # the key statistics were computed once and cached
        assert list((tmp_path / "stats").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted CounterFact runs (the command form, as the stopped ones), one per method."""
    out = {}
    for alg in ALGS:
        d = tmp_path_factory.mktemp(f"ref_{alg}")
        assert run_main(d / "run", f"+alg={alg}", "+experiment=counterfact", "+model=tiny-llama",
                        *_small(alg, d / "stats")) == 0
        out[alg] = d
    return out


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k != "edit_time_s"}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


class _Stopped(BaseException):
    """Raised by the kill hook: not an ``Exception``, so nothing on the way handles it."""


@pytest.mark.parametrize("alg", ALGS)
def test_stop_and_resume_to_the_same_summary(alg: str, references: dict[str, Path],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    import btp.loop

    args = (f"+alg={alg}", "+experiment=counterfact", "+model=tiny-llama",
            # the same statistics cache as the reference: the same config
            *_small(alg, references[alg] / "stats"))

    def stop(point: str, batches_done: int) -> None:  # batch 2 edited, not checkpointed
        if point == "after_edit" and batches_done == 2:
            raise _Stopped

    monkeypatch.setattr(btp.loop, "kill_hook", stop)
    with pytest.raises(_Stopped):
        run_main(tmp_path, *args)
    monkeypatch.undo()
    assert not (tmp_path / "summary.json").exists()
    saved = checkpoint.load(tmp_path / "checkpoint")
    assert saved is not None and saved[1]["batches_done"] == 1
    assert run_main(tmp_path, *args) == 0
    assert "resuming from" in (tmp_path / "run.log").read_text()
    ref = references[alg] / "run"
    assert _drop_times(read_summary(tmp_path)) == _drop_times(read_summary(ref))
    assert _drop_times(read_metrics(tmp_path)) == _drop_times(read_metrics(ref))


def test_report_lists_the_three_methods(references: dict[str, Path], tmp_path: Path) -> None:
    from btp.report.cli import main as report

    assert report(["--out", str(tmp_path / "out"), "--no-plots",
                   *(str(references[a] / "run") for a in ALGS)]) == 0
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "## Task `counterfact`, model `tiny-llama`" in table
    rows = [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["memit", "alphaedit", "wise"]  # the report's method order
    csv = (tmp_path / "out" / "comparison.csv").read_text()
    assert all(alg in csv for alg in ALGS)
    assert json.loads((references["wise"] / "run" / "adapter" / "wise_config.json").read_text())[
        "layer"] == "model.layers.27.mlp.down_proj"


@pytest.mark.parametrize("alg,task,model,extra,message", [
    ("memit", "qa", "tiny-t5small", [], "edits decoder-only LMs"),
    ("wise", "qa", "tiny-t5small", [], "edits decoder-only LMs"),
    ("memit", "counterfact", "tiny-llama", ["memit.stats_corpus=/nonexistent/corpus"],
     "memit.stats_corpus"),
    ("wise", "counterfact", "tiny-llama", ["wise.irrelevant_corpus=no_such_folder"],
     "wise.irrelevant_corpus"),
    ("wise", "counterfact", "tiny-llama", ["wise.act_margin=[5,20]"], "wise.act_margin"),
    ("wise", "counterfact", "tiny-llama", ["wise.merge_freq=750"], "multiple of"),
    ("alphaedit", "counterfact", "tiny-llama", ["alphaedit.layers=[model.layers.99.mlp.down_proj]"],
     "model.layers.99"),
])
def test_bad_input_is_one_clear_error(alg: str, task: str, model: str, extra: list[str],
                                      message: str, tmp_path: Path) -> None:
    """Bad input fails before the run dir is claimed: one error naming what to fix."""
    from hydra import compose, initialize_config_dir

    from btp.errors import UserError
    from btp.runner import run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+alg={alg}", f"+experiment={task}", f"+model={model}",
                                           "max_n_edits=2", "data.n_upstream=4", *extra])
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run(cfg, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "run_config.json").exists()

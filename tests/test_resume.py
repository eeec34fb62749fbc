"""Kill-and-resume: a run killed with SIGKILL resumes from its checkpoint when re-run with the
same command and hydra.run.dir, and ends with the same summary.json and metrics.jsonl as an
uninterrupted run (edit times aside).

Kills happen at chosen points through the ``BTP_TEST_KILL_AT=<batches_done>:<point>`` hook
(btp/checkpoint.py): after a checkpoint, in the middle of writing one (temporary file written,
not yet renamed), and in the middle of a batch (edited, not yet checkpointed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from btp import checkpoint
from tests.test_runner_helpers import cli_env, explain, read_metrics, read_summary, run_cli

ARGS = ("+alg=lora", "+experiment=qa", "+model=tiny-t5small", "max_n_edits=30",
        "metric_period=10", "melo.num_iter=8")


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k != "edit_time_s"}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(run_dir, *ARGS)
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.mark.parametrize("kill_at,done_after_kill", [
    ("1:after_checkpoint", 1),   # between batches
    ("2:before_replace", 1),     # while writing the checkpoint of batch 2
    ("3:after_edit", 2),         # the last batch edited and evaluated, not checkpointed
])
def test_kill_and_resume(reference: Path, tmp_path: Path, kill_at: str,
                         done_after_kill: int) -> None:
    killed = run_cli(tmp_path, *ARGS, env=cli_env(BTP_TEST_KILL_AT=kill_at))
    assert killed.returncode == -9, explain(killed)
    assert not (tmp_path / "summary.json").exists()
    saved = checkpoint.load(tmp_path / "checkpoint")
    assert saved is not None
    assert saved[1]["batches_done"] == done_after_kill  # at most the batch in progress is lost
    if kill_at.endswith("before_replace"):  # the killed writer's temporary file is left...
        assert list((tmp_path / "checkpoint").glob(".state.safetensors.tmp-*"))

    resumed = run_cli(tmp_path, *ARGS)
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from" in (tmp_path / "run.log").read_text()
    assert not list(tmp_path.rglob("*.tmp-*"))  # ...and removed by the next start
    assert _drop_times(read_summary(tmp_path)) == _drop_times(read_summary(reference))
    assert _drop_times(read_metrics(tmp_path)) == _drop_times(read_metrics(reference))


def test_resume_refuses_changed_config(reference: Path, tmp_path: Path) -> None:
    killed = run_cli(tmp_path, *ARGS, env=cli_env(BTP_TEST_KILL_AT="1:after_checkpoint"))
    assert killed.returncode == -9, explain(killed)
    changed = run_cli(tmp_path, *ARGS[:-1], "melo.num_iter=9")
    assert changed.returncode == 2, explain(changed)
    assert "different config" in changed.stderr and "melo.num_iter" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "summary.json").exists()

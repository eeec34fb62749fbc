"""Kill-and-resume: a stopped run resumes from its checkpoint when re-run with the same command
and hydra.run.dir, and ends with the same summary.json and metrics.jsonl as an uninterrupted run
(edit times aside).

One run is killed for real: ``python run.py`` in a subprocess gets SIGKILL in the middle of
writing its checkpoint (the temporary file written, not yet renamed; the
``BTP_TEST_KILL_AT=<batches_done>:<point>`` hook of btp/checkpoint.py), so that what a crash
leaves behind (the temporary file, the lock of a dead process) is what the next start finds. The
other stopping points, after a checkpoint and after an edit that was not checkpointed yet, stop a
run in this process (the loop's hook raises there) and leave the same checkpoint. A resume with a
changed config is refused: tests/test_bad_input.py ("partial run, other num_iter").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from btp import checkpoint
from tests.test_runner_helpers import (cli_env, explain, read_metrics, read_summary, run_cli,
                                       run_main)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Three edit batches of five, evaluated after each; small evaluation sets keep each run short.
ARGS = ("+alg=lora", "+experiment=qa", "+model=tiny-t5small", "max_n_edits=15",
        "num_edit_per_block=5", "metric_period=5", "melo.num_iter=8", "data.n_upstream=16",
        "eval.alone_records=4", "eval.max_length=8")


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k != "edit_time_s"}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


def _same_results(run_dir: Path, reference: Path) -> None:
    assert "resuming from" in (run_dir / "run.log").read_text()
    assert not list(run_dir.rglob("*.tmp-*"))
    assert _drop_times(read_summary(run_dir)) == _drop_times(read_summary(reference))
    assert _drop_times(read_metrics(run_dir)) == _drop_times(read_metrics(reference))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert run_main(run_dir, *ARGS) == 0
    return run_dir


def test_sigkill_while_writing_the_checkpoint(reference: Path, tmp_path: Path) -> None:
    killed = run_cli(tmp_path, *ARGS, env=cli_env(BTP_TEST_KILL_AT="2:before_replace"))
    assert killed.returncode == -9, explain(killed)
    assert not (tmp_path / "summary.json").exists()
    saved = checkpoint.load(tmp_path / "checkpoint")
    assert saved is not None and saved[1]["batches_done"] == 1  # the batch being saved is lost
    assert list((tmp_path / "checkpoint").glob(".state.safetensors.tmp-*"))  # left by the kill
    assert run_main(tmp_path, *ARGS) == 0  # removes it, takes over the dead process's lock
    _same_results(tmp_path, reference)


class _Stopped(BaseException):
    """Raised by the kill hook: not an ``Exception``, so nothing on the way handles it."""


@pytest.mark.parametrize("point,done_after_stop", [
    ("1:after_checkpoint", 1),   # between batches
    ("3:after_edit", 2),         # the last batch edited and evaluated, not checkpointed
])
def test_stop_and_resume(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         point: str, done_after_stop: int) -> None:
    import btp.loop

    at, where = point.split(":")

    def stop(hook_point: str, batches_done: int) -> None:
        if hook_point == where and batches_done == int(at):
            raise _Stopped

    monkeypatch.setattr(btp.loop, "kill_hook", stop)
    with pytest.raises(_Stopped):
        run_main(tmp_path, *ARGS)
    monkeypatch.undo()
    assert not (tmp_path / "summary.json").exists()
    assert checkpoint.load(tmp_path / "checkpoint")[1]["batches_done"] == done_after_stop
    assert run_main(tmp_path, *ARGS) == 0
    _same_results(tmp_path, reference)

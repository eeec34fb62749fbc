"""Sweeps on a real SLURM cluster: a one-node cluster on this machine (``scripts/local-slurm.sh``).

Through ``hydra/launcher=slurm`` with the launcher settings README's "Sweeps on a cluster" gives
for that cluster, on the tiny T5 stand-in:

1. a 2-method x 2-seed sweep ends with four summaries, each job a task of one SLURM job array;
2. re-submitting it skips all four (summaries untouched);
3. a sweep with a job on corrupt data: that job fails with the data error while the others run on;
   one of them is cancelled mid-run with ``scancel``; re-submitting resumes it from its checkpoint
   to the summary and metrics of the uninterrupted run of the same configuration in step 1.

The cluster is started once for the module (installing slurm-wlm and munge with apt-get where they
are missing) and stopped at the end, also when a step fails. Needs root on Linux; skipped
elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.test_runner_helpers import SMALL_EVAL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
#: The launcher settings for the local cluster, as README's "Sweeps on a cluster" shows them.
LOCAL_LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debug",
                  "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
                  "hydra.launcher.mem_gb=1"]
#: Cheap real runs: 5 edit batches of 10 (enough left to cancel after the first one, before the
#: end), one evaluation before the first and one after the last.
TINY = ["+experiment=qa", "+model=tiny-t5small", "max_n_edits=50", "metric_period=50",
        *SMALL_EVAL, "plain_lora.num_iter=20"]
KILL_WAIT_S = 1  # SIGTERM -> SIGKILL of a cancelled job (submitit ignores SIGTERM)

pytestmark = pytest.mark.slow


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on this host (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 1 >= 65536:
            continue
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports found")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment for its clients and jobs."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the local SLURM cluster runs on Linux only")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd, apt-get)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    # A short path: munge's unix socket lives in it.
    state = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    env = dict(os.environ, LOCAL_SLURM_DIR=str(state), LOCAL_SLURM_PORT=str(_free_port_pair()),
               LOCAL_SLURM_KILL_WAIT=str(KILL_WAIT_S))
    try:
        proc = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"export SLURM_CONF={state / 'slurm.conf'}" in proc.stdout
        status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "idle" in status.stdout, status.stdout
        yield {"SLURM_CONF": str(state / "slurm.conf")}
    finally:
        stop = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True,
                              timeout=300)
        down = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True,
                              timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr
        assert down.returncode == 1 and "running" not in down.stdout.replace(
            "not running", ""), down.stdout


def _env(cluster: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1",
               **cluster)
    env.pop("BTP_TEST_KILL_AT", None)
    return env


def _sweep_cmd(sweep_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "run.py", "-m", *LOCAL_LAUNCHER, f"hydra.sweep.dir={sweep_dir}",
            *TINY, *overrides]


def _sweep(cluster: dict[str, str], sweep_dir: Path, overrides: list[str]
           ) -> subprocess.CompletedProcess:
    return subprocess.run(_sweep_cmd(sweep_dir, overrides), cwd=ROOT / "btp",
                          env=_env(cluster), capture_output=True, text=True, timeout=600)


def _run_dirs(sweep_dir: Path) -> list[Path]:
    # Job dirs are named after their overrides; a value with '/' (data_dir) nests folders.
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml"))


def _wait(what: str, condition: Callable[[], Any], timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _overrides(run_dir: Path) -> str:
    """The job's ``.hydra/overrides.yaml`` ("" while Hydra or the runner is rewriting it)."""
    try:
        return (run_dir / ".hydra" / "overrides.yaml").read_text()
    except FileNotFoundError:
        return ""


def _slurm_task(sweep_dir: Path, run_dir: Path) -> str | None:
    """The SLURM id (``<array job>_<task>``) of the job that runs ``run_dir``, from its log."""
    for log in sweep_dir.glob(".submitit/*/*_log.out"):
        if f"run dir {run_dir};" in log.read_text(errors="replace"):
            return log.parent.name
    return None


def _batches_done(run_dir: Path) -> int:
    """Edit batches in the run's last checkpoint (-1 without one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / "checkpoint" / "state.safetensors"), framework="pt") as f:
            return int(json.loads(f.metadata()["state"])["batches_done"])
    except Exception:  # noqa: BLE001 - absent or being replaced: look again
        return -1


def _in_queue(env: dict[str, str], task: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", task], env=env, capture_output=True,
                         text=True, timeout=60)
    return task in out.stdout


def _results(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary or metrics record without its wall-clock times."""
    return {k: (_results(v) if isinstance(v, dict) else v) for k, v in summary.items()
            if k != "edit_time_s"}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [_results(json.loads(line)) for line in
            (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_readme_shows_the_launcher_settings_used_here() -> None:
    section = (ROOT / "README.md").read_text().split("## Sweeps on a cluster", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert "scripts/local-slurm.sh start" in section and "scripts/local-slurm.sh stop" in section
    for override in LOCAL_LAUNCHER:
        assert override in section, override


def test_sweep_on_slurm_runs_skips_survives_a_failure_and_resumes_a_cancelled_job(
        cluster: dict[str, str], tmp_path: Path) -> None:
    env = _env(cluster)

    # 1. Two methods x two seeds: four SLURM array tasks, four summaries.
    sweep_a = tmp_path / "a"
    first = _sweep(cluster, sweep_a, ["+alg=lora,plain_lora", "seed=0,1"])
    assert first.returncode == 0, first.stderr[-3000:]
    dirs = _run_dirs(sweep_a)
    summaries = {d: json.loads((d / "summary.json").read_text()) for d in dirs}
    assert sorted((s["alg"], s["seed"], s["n_edits"]) for s in summaries.values()) == [
        ("melo", 0, 50), ("melo", 1, 50), ("plain_lora", 0, 50), ("plain_lora", 1, 50)]
    script = next(sweep_a.glob(".submitit/*/*_submission.sh"))
    assert "#SBATCH --array=0-3" in script.read_text()
    assert "#SBATCH --partition=debug" in script.read_text()
    array_job = script.parent.name
    assert {_slurm_task(sweep_a, d) for d in dirs} == {f"{array_job}_{i}" for i in range(4)}
    stamps = {d: ((d / "summary.json").stat().st_mtime_ns, (d / "summary.json").read_bytes())
              for d in dirs}

    # 2. The same command again: every job finds its summary and skips.
    again = _sweep(cluster, sweep_a, ["+alg=lora,plain_lora", "seed=0,1"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _run_dirs(sweep_a) == dirs
    for d in dirs:
        assert ((d / "summary.json").stat().st_mtime_ns,
                (d / "summary.json").read_bytes()) == stamps[d]
        assert "already finished, skipping" in (d / "run.log").read_text()

    # 3. A sweep whose first two jobs read corrupt data; the other two are MELO seeds 0 and 1 of
    #    step 1's configuration (the shipped data given explicitly).
    bad_data = tmp_path / "bad_data"
    shutil.copytree(ROOT / "data", bad_data)
    for name in ("zsre_mend_eval.json", "zsre_train.jsonl"):
        (bad_data / name).write_text("{this is not json\n")
    sweep_b = tmp_path / "b"
    args_b = ["+alg=lora", f"data_dir={bad_data},{ROOT / 'data'}", "seed=0,1"]
    submit_log = (tmp_path / "submit_b.log").open("w")  # a file: a pipe nobody reads fills up
    submit = subprocess.Popen(_sweep_cmd(sweep_b, args_b), cwd=ROOT / "btp", env=env,
                              stdout=submit_log, stderr=subprocess.STDOUT)
    try:
        def good(seed: int) -> Path | None:
            for d in _run_dirs(sweep_b):
                overrides = _overrides(d)
                if overrides and "bad_data" not in overrides and f"seed={seed}" in overrides:
                    return d
            return None

        # Cancel MELO seed 0 once its first edit batch is checkpointed.
        cancelled = _wait("the first job of the good data to start", lambda: good(0))
        _wait("its first edit batch's checkpoint", lambda: _batches_done(cancelled) >= 1)
        task = _wait("its SLURM id", lambda: _slurm_task(sweep_b, cancelled), timeout=30)
        subprocess.run(["scancel", task], env=env, check=True, timeout=60)
        _wait("the cancelled job to leave the queue", lambda: not _in_queue(env, task),
              timeout=60 + KILL_WAIT_S)
        assert not (cancelled / "summary.json").exists()
        done_at_cancel = _batches_done(cancelled)  # at least 1: waited for above
        assert done_at_cancel < 5, "the job ended its last batch before it was cancelled"

        # The other jobs run on to their summary; the failed ones logged the data error.
        finished = _wait("the other good job's summary", lambda: (
            good(1) is not None and (good(1) / "summary.json").is_file() and good(1)))
        bad = [d for d in _run_dirs(sweep_b) if "bad_data" in _overrides(d)]
        assert len(bad) == 2 and not any((d / "summary.json").exists() for d in bad)
        for d in bad:  # one line naming the file
            assert f"ERROR] - {bad_data / 'zsre_mend_eval.json'}" in (d / "run.log").read_text()
        # Without an accounting database (sacct) submitit cannot see that the cancelled job
        # ended, so the submitting command waits for it: stop it as a user would (Ctrl-C).
        assert submit.poll() is None
        submit.send_signal(signal.SIGINT)
        submit.wait(timeout=60)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
        submit_log.close()
    reference = {s["seed"]: d for d, s in summaries.items() if s["alg"] == "melo"}
    assert _results(json.loads((finished / "summary.json").read_text())) == \
        _results(summaries[reference[1]])

    # 4. Re-submitting: the failing jobs fail again, the finished one is skipped and the
    #    cancelled one resumes from its checkpoint to the uninterrupted run's results.
    resubmit = _sweep(cluster, sweep_b, args_b)
    assert resubmit.returncode != 0  # the sweep reports the failed jobs once all have ended
    assert str(bad_data / "zsre_mend_eval.json") in resubmit.stdout + resubmit.stderr
    log = (cancelled / "run.log").read_text()
    assert f": {done_at_cancel} of 5 batches done" in log, log[-3000:]  # resumed where it stopped
    assert _results(json.loads((cancelled / "summary.json").read_text())) == \
        _results(summaries[reference[0]])
    assert _records(cancelled) == _records(reference[0])
    assert "already finished, skipping" in (finished / "run.log").read_text()

"""Sweeps: the SLURM launcher config, a real submitit multirun (local executor), resume/skip.

* The SLURM config is composed with command-line overrides and turned into the sbatch script that
  submitit would submit (no SLURM needed: a stub ``srun`` on PATH satisfies submitit's check).
* A two-job multirun through submitit's local executor on the tiny model: killed mid-run, then
  re-submitted (both jobs resume from their checkpoints), then re-submitted again (both skipped).
* A failing job does not stop the other job of its sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from btp import sweep
from btp.errors import ConfigError, UserError
from tests.test_runner_helpers import SMALL_EVAL

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
TINY_RUN = ["+alg=lora", "+experiment=qa", "+model=tiny-t5small"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import btp.schema  # noqa: F401  (schema + repo_path resolver)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes_with_overrides(tmp_path: Path, monkeypatch) -> None:
    cfg = _compose(TINY_RUN + [
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
        "hydra.launcher.cpus_per_task=4", "hydra.launcher.mem_gb=16",
        "hydra.launcher.array_parallelism=2", "+hydra.launcher.additional_parameters.mail-type=END",
    ])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task) == ("gpu", 30, 4)
    assert (launcher.mem_gb, launcher.array_parallelism, launcher.gpus_per_node) == (16, 2, 1)
    assert launcher.max_num_timeout > 0  # time-outs re-queue and resume from the checkpoint
    # Resolve as the launcher does at instantiation (hydra.runtime.cwd is set by Hydra then).
    cfg.hydra.runtime.cwd = str(ROOT / "btp")
    cfg.hydra.job.name = "run"
    monkeypatch.setenv("VIRTUAL_ENV", "/opt/venv")
    params = OmegaConf.to_container(launcher, resolve=True)
    assert params["setup"] == ["source /opt/venv/bin/activate", "export OMP_NUM_THREADS=4"]

    # The sbatch script submitit would submit, built by submitit itself the way the plugin
    # (hydra-submitit-launcher 1.2, BaseSubmititLauncher.launch) passes the parameters.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=16GB", "#SBATCH --gpus-per-node=1", "#SBATCH --mail-type=END",
                 "source /opt/venv/bin/activate", "export OMP_NUM_THREADS=4"):
        assert line in script, f"{line!r} not in the sbatch script:\n{script}"
    assert executor._executor.parameters["array_parallelism"] == 2


def test_local_launcher_config_composes() -> None:
    cfg = _compose(TINY_RUN + ["hydra/launcher=local", "hydra.launcher.timeout_min=5"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert cfg.hydra.launcher.timeout_min == 5


def test_sweep_job_dirs_are_named_after_their_overrides() -> None:
    """Re-submitting a sweep reaches the same job dirs: the name is the job's overrides, without
    the keys that do not change results (wandb, device, checkpoint.enabled)."""
    cfg = _compose(TINY_RUN + ["hydra.mode=MULTIRUN", "seed=1", "melo.init_radius=2",
                               "device=cpu", "wandb.mode=offline", "wandb.group=g",
                               "checkpoint.enabled=false"])
    assert cfg.hydra.sweep.subdir == \
        "+alg=lora,+experiment=qa,+model=tiny-t5small,melo.init_radius=2,seed=1"


def test_finished_and_sweep_name(tmp_path: Path) -> None:
    assert not sweep.finished(tmp_path)
    (tmp_path / "summary.json").write_text("{broken")
    assert not sweep.finished(tmp_path)  # damaged: redo rather than trust
    (tmp_path / "summary.json").write_text(json.dumps({"ES": 1.0}))
    assert sweep.finished(tmp_path)
    assert sweep.finished_summary(tmp_path) == {"ES": 1.0}
    ident = {"task": "qa", "alg": "melo", "model": "tiny-t5small", "seed": 0}
    (tmp_path / "summary.json").write_text(json.dumps({**ident, "ES": 1.0}))
    assert sweep.finished_summary(tmp_path, ident)["ES"] == 1.0
    with pytest.raises(ConfigError, match="another configuration.*seed: finished 0, now 1"):
        sweep.finished_summary(tmp_path, {**ident, "seed": 1})
    assert sweep.sweep_name("/x/multirun/qa_radius") == "qa_radius"
    assert sweep.sweep_name("/x/multirun/2024-05-01/12-30-00") == "2024-05-01_12-30-00"


def test_wandb_group_is_the_sweep_name(tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig

    assert sweep.hydra_sweep_dir() is None  # no Hydra: not a sweep
    assert sweep.wandb_group(None, None) is None
    assert sweep.wandb_group("mine", None) == "mine"
    assert sweep.wandb_group(None, tmp_path / "qa_sweep") == "qa_sweep"
    assert sweep.wandb_group("explicit", tmp_path / "qa_sweep") == "explicit"
    HydraConfig.instance().set_config(_compose(TINY_RUN))
    try:
        assert sweep.hydra_sweep_dir() is None  # a single run: not a sweep
    finally:
        HydraConfig.instance().cfg = None
    cfg = _compose(TINY_RUN + ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/qa_sweep"])
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep.hydra_sweep_dir() == tmp_path / "qa_sweep"
    finally:
        HydraConfig.instance().cfg = None


class _Stop(Exception):
    """Ends a run once its wandb run is open."""


def test_runner_puts_the_sweep_into_the_wandb_group(tmp_path: Path, monkeypatch) -> None:
    """The runs of a sweep share a wandb group named after the sweep dir unless wandb.group is
    given: the runner passes it to MetricsLog, which passes it to wandb.init."""
    import types

    from btp import runner

    calls: list[dict] = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(
        id="x", finish=lambda **k: None, summary={}))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def stop(*args, **kwargs):
        raise _Stop

    # No data or model: the runner's steps before the wandb run opens are stand-ins.
    monkeypatch.setattr(runner, "build", lambda cfg, run_dir: types.SimpleNamespace(
        stream=[], task=types.SimpleNamespace(name="qa")))
    monkeypatch.setattr(runner, "restore", lambda parts, saved, ckpt_dir: (
        types.SimpleNamespace(records=[]), None))
    monkeypatch.setattr(runner, "edit", stop)
    small = ["device=cpu", "wandb.mode=offline"]
    for extra, want in (([], "qa_sweep"), (["wandb.group=mine"], "mine")):
        with pytest.raises(_Stop):
            runner.run(_compose(TINY_RUN + small + extra), run_dir=tmp_path / f"job{len(calls)}",
                       progress=False, sweep_dir=tmp_path / "qa_sweep")
        assert calls[-1]["group"] == want
    with pytest.raises(_Stop):
        runner.run(_compose(TINY_RUN + small), run_dir=tmp_path / "single", progress=False)
    assert calls[-1]["group"] is None  # a run outside a sweep has no group


# -- real multiruns through submitit's local executor -----------------------------------------

def _multirun(sweep_dir: Path, overrides: list[str], env_extra: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("BTP_TEST_KILL_AT", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep_dir}",
           *TINY_RUN, *overrides]
    return subprocess.run(cmd, cwd=ROOT / "btp", env=env, capture_output=True, text=True,
                          timeout=timeout)


def _run_dirs(sweep_dir: Path) -> list[Path]:
    # Job dirs are named after their overrides; a value with '/' (data_dir) nests folders.
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml"))


def test_user_error_fails_only_its_job_in_a_basic_multirun(tmp_path: Path) -> None:
    """Under Hydra's basic launcher a UserError in one job must not end the sweep."""
    sweep_dir = tmp_path / "sweep"
    # Job 2 (max_n_edits=20) is already finished: it only has to be reached to be skipped.
    done = sweep_dir / "+alg=lora,+experiment=qa,+model=tiny-t5small,max_n_edits=20"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps(
        {"task": "qa", "alg": "melo", "model": "tiny-t5small", "seed": 0, "ES": 1.0}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep_dir}", *TINY_RUN,
           "max_n_edits=0,20"]  # job 1: max_n_edits=0 is refused before anything loads
    proc = subprocess.run(cmd, cwd=ROOT / "btp", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "max_n_edits=0 is out of range" in proc.stdout + proc.stderr
    assert (done / "run.log").is_file(), proc.stderr[-3000:]  # the second job ran
    assert "already finished, skipping" in (done / "run.log").read_text()


@pytest.mark.slow
def test_local_multirun_resumes_then_skips(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # 2 jobs x 2 edit batches of 10 (tiny-t5small); small evaluation sets: the sweep is tested
    args = ["seed=0,1", "max_n_edits=20", *SMALL_EVAL]

    # 1. Both jobs are killed after their first batch's checkpoint (as a time-out or preemption
    #    would): no summary, a checkpoint each, and the multirun reports the failure.
    first = _multirun(sweep_dir, args, {"BTP_TEST_KILL_AT": "1:after_checkpoint"})
    assert first.returncode != 0
    dirs = _run_dirs(sweep_dir)
    assert len(dirs) == 2, first.stderr[-3000:]
    for run_dir in dirs:
        assert not (run_dir / "summary.json").exists()
        assert (run_dir / "checkpoint").is_dir()

    # 2. Re-submitting the same sweep reaches the same directories and resumes both runs.
    second = _multirun(sweep_dir, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _run_dirs(sweep_dir) == dirs
    seeds = set()
    for run_dir in dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        seeds.add(summary["seed"])
        assert summary["n_edits"] == 20
        assert "resuming from" in (run_dir / "run.log").read_text()
    assert seeds == {0, 1}
    stamps = {d: ((d / "summary.json").stat().st_mtime_ns, (d / "summary.json").read_bytes())
              for d in dirs}

    # 3. Re-submitting a finished sweep skips every run: the summaries stay untouched.
    third = _multirun(sweep_dir, args)
    assert third.returncode == 0, third.stderr[-3000:]
    for d in dirs:
        assert ((d / "summary.json").stat().st_mtime_ns,
                (d / "summary.json").read_bytes()) == stamps[d]
        assert "already finished, skipping" in (d / "run.log").read_text()


def test_runner_returns_a_finished_run_untouched(tmp_path: Path, monkeypatch) -> None:
    """``btp.runner.run`` on a run dir with a finished run of the same identity returns its
    summary without loading data or a model; one of another identity is refused."""
    from btp import runner
    from btp.models import load_model_and_tokenizer  # noqa: F401 - patched below

    cfg = _compose(TINY_RUN + ["seed=3"])
    summary = {"task": "qa", "alg": "melo", "model": "tiny-t5small", "seed": 3, "ES": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    before = (tmp_path / "summary.json").stat().st_mtime_ns

    def no_data(*a, **k):
        raise AssertionError("a finished run must not load data")

    monkeypatch.setattr("btp.data.load_task_data", no_data)
    assert runner.run(cfg, run_dir=tmp_path, progress=False) == summary
    assert (tmp_path / "summary.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"different config \(seed: 3 -> 4; from its summary.json"):
        runner.run(_compose(TINY_RUN + ["seed=4"]), run_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_run_dir_record_decides_what_a_rerun_may_change(tmp_path: Path) -> None:
    """``run_config.json`` names the run: result-changing keys must match (a finished or a
    partial run), wandb/device/checkpoint may differ; Hydra files are put back when refused."""
    from btp.rundir import RunDir

    from btp.runner import resolved_config

    cfg = resolved_config(_compose(TINY_RUN))
    ident = {"task": "qa", "alg": "melo", "model": "tiny-t5small", "seed": 0}
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- melo.edit_lr=0.03\n")
    rd = RunDir(tmp_path, hydra_subdir=".hydra")
    rd.check({**cfg, "seed": 9}, ident)  # nothing here yet: any config may start
    rd.claim(cfg)
    rd.check({**cfg, "seed": 9}, ident)  # a record alone (a run that failed early) binds nothing
    (tmp_path / "summary.json").write_text(json.dumps(ident))
    rd.check({**cfg, "device": "cuda:1", "wandb": {"mode": "offline"},
              "checkpoint": {"enabled": False}}, ident)
    changed = {**cfg, "melo": {**cfg["melo"], "edit_lr": 0.05}, "max_n_edits": 7}
    with pytest.raises(UserError, match=r"finished run made with a different config "
                       r"\(max_n_edits: None -> 7, melo.edit_lr: 0.03 -> 0.05"):
        rd.check(changed, ident)
    (hydra / "overrides.yaml").write_text("- melo.edit_lr=0.05\n")  # what Hydra wrote
    (hydra / "config.yaml").write_text("stray")
    assert sorted(rd.restore_hydra()) == ["config.yaml", "overrides.yaml"]
    assert (hydra / "overrides.yaml").read_text() == "- melo.edit_lr=0.03\n"
    assert not (hydra / "config.yaml").exists()
    (tmp_path / "summary.json").unlink()
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="partial run .* to resume it"):
        rd.check(changed, ident)


@pytest.mark.slow
def test_failed_job_leaves_the_other_running(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # Job 0 fails at once (no data there); job 1 is a normal tiny run.
    proc = _multirun(sweep_dir, [f"data_dir={tmp_path / 'missing'},{ROOT / 'data'}",
                                 "max_n_edits=8", *SMALL_EVAL])
    assert proc.returncode != 0  # the sweep reports the failed job...
    # Find each job's directory by its overrides (independent of the subdir naming scheme).
    deadline = time.time() + 120
    while len(_run_dirs(sweep_dir)) < 2 and time.time() < deadline:
        time.sleep(1)
    by_data = {("missing" in (d / ".hydra" / "overrides.yaml").read_text()): d
               for d in _run_dirs(sweep_dir)}
    good, bad = by_data[False] / "summary.json", by_data[True] / "summary.json"
    deadline = time.time() + 300
    while not good.exists() and time.time() < deadline:  # ...and the other one still finishes
        time.sleep(2)
    assert good.exists(), proc.stderr[-3000:]
    assert not bad.exists()

"""Bad input: each case prints one clear line on stderr, exits non-zero (2 for errors the user
can fix) and leaves no summary.json."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.test_runner_helpers import REPO_ROOT, cli_env, explain, run_cli

TINY_QA = ("+alg=lora", "+experiment=qa", "+model=tiny-t5small", "max_n_edits=20")


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, explain(proc)
    line = lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def test_missing_data_file(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *TINY_QA, f"data_dir={empty}")
    _one_line_error(proc, str(empty / "zsre_mend_eval.json"), "download.sh")
    assert not (run_dir / "summary.json").exists()


def test_malformed_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "data", data)
    with open(data / "zsre_train.jsonl", "a", encoding="utf-8") as f:
        f.write('{"input": "a question", "filtered_rephrases": [\n')  # line 2: broken JSON
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *TINY_QA, f"data_dir={data}", "data.zsre_format=mend")
    _one_line_error(proc, str(data / "zsre_train.jsonl"), "line 2")
    assert not (run_dir / "summary.json").exists()


def test_hub_model_without_network(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = cli_env(HF_HOME=str(tmp_path / "empty-hf-home"))  # nothing cached, hub offline
    proc = run_cli(run_dir, "+alg=lora", "+experiment=qa", "+model=t5small", "max_n_edits=20",
                   env=env)
    _one_line_error(proc, "google/t5-small-ssm-nq", "no network", "tiny-")
    assert not (run_dir / "summary.json").exists()


def test_more_batches_than_blocks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, *TINY_QA, "melo.num_block=1")
    _one_line_error(proc, "2 batches", "num_block is 1")
    assert not (run_dir / "summary.json").exists()


def test_typo_key_fails_at_compose(tmp_path: Path) -> None:
    for override in ("melo.num_iters=3", "+melo.num_iters=3", "max_n_edit=3"):
        run_dir = tmp_path / override.replace("=", "_").replace("+", "p")
        proc = run_cli(run_dir, *TINY_QA, override)
        assert proc.returncode != 0, explain(proc)
        key = override.lstrip("+").split("=")[0].split(".")[-1]
        assert key in proc.stderr, explain(proc)
        assert not (run_dir / "summary.json").exists()
        assert not (run_dir / "checkpoint").exists()  # nothing ran


def test_tiny_model_before_experiment_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, "+alg=lora", "+model=tiny-t5small", "+experiment=qa")
    _one_line_error(proc, "+model=tiny-t5small", "must come after", "+experiment=qa")
    assert not (run_dir / "summary.json").exists()


def test_task_and_model_kind_must_match(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(run_dir, "+alg=lora", "+experiment=scotus", "+model=tiny-t5small")
    _one_line_error(proc, "scotus", "classification")

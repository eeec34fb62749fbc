"""Tests of ``scripts/compare.py``: seed statistics, tables, skipped runs, plots.

Synthetic run directories (written here in the runner's output format) pin the exact statistics;
the tests marked ``slow`` run the real runner on the tiny model and check the table against the
summaries it wrote.
"""

from __future__ import annotations

import csv
import os
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
sys.path.insert(0, str(SCRIPT.parent))

import compare  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, *, alg: str, seed: int, task: str = "qa", model: str = "tiny-t5small",
             base: float = 0.5, overrides: list[str] | None = None, n_edits: int = 8,
             period: int = 4) -> dict:
    """Write a run directory in the runner's format; returns its summary."""
    path.mkdir(parents=True)
    curve = []
    for n in range(period, n_edits + 1, period):
        row = {"n_edits": n, "ES": base + 0.01 * n, "ERR": base + 0.02 * seed, "TRR": base - 0.1,
               "locality": 1.0 - 0.01 * n, "clusters": n // 2, "conflicts": seed, "forgotten": 0,
               "edit_time_s": 0.1 * n}
        row["holdout" if task == "qa" else "ARR"] = base / 2 + seed
        curve.append(row)
    summary = {"task": task, "alg": alg, "model": model, "seed": seed, **curve[-1],
               "ES_em": 0.25}
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (path / "summary.json").write_text(json.dumps(summary))
    hydra_dir = path / ".hydra"
    hydra_dir.mkdir()
    items = [f"+alg={alg}", f"+experiment={task}", f"+model={model}", f"seed={seed}"]
    items += overrides or []
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in items))
    return summary


def read_csv(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with path.open() as handle:
        return {(r["task"], r["method"], r["metric"]): r for r in csv.DictReader(handle)}


@pytest.fixture()
def sweep(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    """A fake sweep: melo with 3 seeds, grace with 2 seeds at two radii, and broken runs."""
    root = tmp_path / "sweep"
    summaries: dict[str, list[dict]] = {"melo": [], "grace (grace.init_radius=50)": [],
                                        "grace (grace.init_radius=75)": []}
    for seed, base in zip(range(3), (0.5, 0.6, 0.8)):
        summaries["melo"].append(make_run(root / f"melo_{seed}", alg="melo", seed=seed, base=base))
    for radius in (50, 75):
        for seed in range(2):
            summaries[f"grace (grace.init_radius={radius})"].append(make_run(
                root / f"grace_r{radius}_{seed}", alg="grace", seed=seed, base=radius / 100,
                overrides=[f"grace.init_radius={radius}"]))
    make_run(root / "halluc" / "run", alg="melo", seed=0, task="hallucination",
             model="tiny-gpt2", base=30.0)
    # Broken runs, each with its own reason.
    (root / "unfinished" / ".hydra").mkdir(parents=True)
    (root / "unfinished" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    make_run(root / "badjson", alg="melo", seed=5)
    (root / "badjson" / "summary.json").write_text("{not json")
    make_run(root / "missingkey", alg="melo", seed=6)
    broken = json.loads((root / "missingkey" / "summary.json").read_text())
    del broken["ERR"], broken["holdout"]
    (root / "missingkey" / "summary.json").write_text(json.dumps(broken))
    make_run(root / "badline", alg="melo", seed=7)
    with (root / "badline" / "metrics.jsonl").open("a") as handle:
        handle.write('{"n_edits": 12, "ES": \n')
    make_run(root / "nometrics", alg="melo", seed=8)
    (root / "nometrics" / "metrics.jsonl").unlink()
    return root, summaries


def test_seed_statistics_and_tables(sweep: tuple[Path, dict], tmp_path: Path) -> None:
    root, summaries = sweep
    out = tmp_path / "out"
    assert compare.main([str(root), "--out", str(out)]) == 0
    rows = read_csv(out / "comparison.csv")
    for method, runs in summaries.items():
        for metric in ("TRR", "ERR", "ES", "holdout", "locality", "edit_time_s", "ES_em"):
            values = [r[metric] for r in runs]
            row = rows[("qa", method, metric)]
            assert int(row["n"]) == len(values)
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
            # Sample standard deviation (n - 1), the spread over seeds.
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
    # Exact numbers for one cell: ERR of melo = base + 0.02 * seed over bases 0.5, 0.6, 0.8.
    err = [0.5, 0.62, 0.84]
    assert float(rows[("qa", "melo", "ERR")]["mean"]) == pytest.approx(sum(err) / 3, abs=1e-6)
    assert float(rows[("qa", "melo", "ERR")]["std"]) == pytest.approx(0.17243356, abs=1e-6)
    assert rows[("qa", "melo", "ERR")]["direction"] == "higher"
    assert rows[("hallucination", "melo", "ARR")]["direction"] == "lower"
    # A single seed has no spread: empty std in the CSV, no "±" in the table.
    assert rows[("hallucination", "melo", "ARR")]["std"] == ""

    md = (out / "comparison.md").read_text()
    assert "## Task `qa`, model `tiny-t5small`" in md
    assert "## Task `hallucination`, model `tiny-gpt2`" in md
    assert md.index("## Task `qa`") < md.index("## Task `hallucination`")  # paper's order
    header = next(line for line in md.splitlines() if line.startswith("| method | TRR"))
    assert header.startswith("| method | TRR ↑ | ERR ↑ | ES ↑ | holdout ↑ | locality ↑ "
                             "| edit time (s) ↓")
    assert "| method | TRR ↓ | ERR ↓ | ES ↓ | ARR ↓ | locality ↑" in md
    melo_row = next(line for line in md.splitlines() if line.startswith("| melo |")
                    and "(n=3)" in line)
    assert f"{statistics.fmean(err):.3f} ± {statistics.stdev(err):.3f} (n=3)" in melo_row
    assert "| 0, 1, 2 |" in melo_row
    # Variants of one algorithm from a hyperparameter sweep are separate rows.
    assert "| grace (grace.init_radius=50) |" in md and "| grace (grace.init_radius=75) |" in md


def test_skipped_runs_are_reported(sweep: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep
    out = tmp_path / "out"
    compare.main([str(root), "--out", str(out), "--no-plots"])
    md = (out / "comparison.md").read_text()
    skipped = md.split("## Skipped runs", 1)[1]
    expected = {
        "unfinished": "missing summary.json",
        "badjson": "summary.json: invalid JSON",
        "missingkey": "summary.json: missing keys ERR, holdout",
        "badline": "metrics.jsonl: corrupt line 3",
        "nometrics": "missing metrics.jsonl",
    }
    for name, reason in expected.items():
        line = next(line for line in skipped.splitlines() if f"/{name}`" in line)
        assert reason in line, line
    # None of the broken runs leaked into the statistics.
    rows = read_csv(out / "comparison.csv")
    assert rows[("qa", "melo", "ES")]["n"] == "3"


def test_duplicate_seed_is_skipped_not_averaged(tmp_path: Path) -> None:
    make_run(tmp_path / "a" / "run", alg="ft", seed=0, base=0.4)
    make_run(tmp_path / "b" / "run", alg="ft", seed=0, base=0.9)
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    rows = read_csv(out / "comparison.csv")
    assert rows[("qa", "ft", "TRR")]["n"] == "1"
    assert float(rows[("qa", "ft", "TRR")]["mean"]) == pytest.approx(0.3)
    assert "duplicate seed 0" in (out / "comparison.md").read_text()


def test_plots_are_pngs(sweep: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep
    out = tmp_path / "out"
    compare.main([str(root), "--out", str(out)])
    for name in ("qa_tiny-t5small_metrics.png", "qa_tiny-t5small_database.png",
                 "hallucination_tiny-gpt2_metrics.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000  # a real figure, not an empty canvas
        assert f"![{name}]({name})" in (out / "comparison.md").read_text()
    from PIL import Image

    with Image.open(out / "qa_tiny-t5small_metrics.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800 and height >= 300


def test_seed_band_minmax_and_std(sweep: tuple[Path, dict]) -> None:
    import _compare_plots
    from _compare_runs import collect

    root, _ = sweep
    runs = [r for r in collect([root]).runs if r.method == "melo" and r.task == "qa"]
    xs, mean, low, high = _compare_plots.seed_band(runs, "ERR", "minmax")
    assert list(xs) == [4.0, 8.0]
    assert mean[0] == pytest.approx(statistics.fmean([0.5, 0.62, 0.84]))
    assert (low[0], high[0]) == pytest.approx((0.5, 0.84))
    xs, mean, low, high = _compare_plots.seed_band(runs, "ERR", "std")
    assert high[0] - mean[0] == pytest.approx(statistics.stdev([0.5, 0.62, 0.84]))


def test_nothing_usable_exits_nonzero(tmp_path: Path) -> None:
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "metrics.jsonl").write_text("garbage\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no usable run" in proc.stderr
    assert "missing summary.json" in (out / "comparison.md").read_text()


def test_variants_only_from_relevant_varying_overrides(tmp_path: Path) -> None:
    """A joint `+alg=lora,grace grace.init_radius=50,75 max_n_edits=8` sweep: MELO is one row
    (grace.* does not touch it), GRACE one row per radius, and the shared max_n_edits is no label."""
    for radius in (50, 75):
        for seed in (0, 1):
            shared = [f"grace.init_radius={radius}", "max_n_edits=8"]
            make_run(tmp_path / f"m{radius}{seed}", alg="melo", seed=seed, overrides=shared)
            make_run(tmp_path / f"g{radius}{seed}", alg="grace", seed=seed, overrides=shared)
    # The two MELO runs per seed are duplicates of one config: one counted, one reported.
    out = tmp_path / "out"
    assert compare.main([str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    methods = {key[1] for key in read_csv(out / "comparison.csv")}
    assert methods == {"melo", "grace (grace.init_radius=50)", "grace (grace.init_radius=75)"}
    assert (out / "comparison.md").read_text().count("duplicate seed") == 2


def test_plain_lora_variants_include_melo_keys(tmp_path: Path) -> None:
    """plain_lora reads MELO's section too (btp.schema.ALG_SECTIONS, the one table): a
    melo.num_block sweep makes plain_lora variants; grace.* never does."""
    import _compare_runs

    from btp.schema import ALG_SECTIONS

    assert _compare_runs.ALG_SECTIONS is ALG_SECTIONS
    for blocks in (4, 8):
        make_run(tmp_path / f"p{blocks}", alg="plain_lora", seed=0,
                 overrides=[f"melo.num_block={blocks}", f"grace.init_radius={blocks}"])
    out = tmp_path / "out"
    assert compare.main([str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    methods = {key[1] for key in read_csv(out / "comparison.csv")}
    assert methods == {"plain_lora (melo.num_block=4)", "plain_lora (melo.num_block=8)"}


# -- on real tiny runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real multirun on the shipped sample: MELO and GRACE x seeds 0, 1 on tiny-t5small."""
    sweep_dir = tmp_path_factory.mktemp("real") / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("BTP_TEST_KILL_AT", None)
    cmd = [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep_dir}", "+alg=lora,grace",
           "+experiment=qa", "+model=tiny-t5small", "seed=0,1", "max_n_edits=20",
           "metric_period=10", "data.n_upstream=20",
           "grace.num_iter=20"]  # GRACE edits one record at a time: 20 edits; keep it short
    proc = subprocess.run(cmd, cwd=ROOT / "btp", env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_real_runs_table_matches_summaries(real_sweep: Path, tmp_path: Path) -> None:
    import shutil

    # A second root with broken copies: an unfinished run and a run with a corrupt curve.
    extra = tmp_path / "extra"
    runs = sorted(p.parent for p in real_sweep.glob("*/summary.json"))
    assert len(runs) == 4
    shutil.copytree(runs[0], extra / "unfinished")
    (extra / "unfinished" / "summary.json").unlink()
    shutil.copytree(runs[1], extra / "corrupt")
    with (extra / "corrupt" / "metrics.jsonl").open("a") as handle:
        handle.write("{truncated\n")
    out = tmp_path / "out"
    assert compare.main([str(real_sweep), str(extra), "--out", str(out)]) == 0

    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    rows = read_csv(out / "comparison.csv")
    md = (out / "comparison.md").read_text()
    for alg in ("melo", "grace"):
        mine = [s for s in summaries if s["alg"] == alg]
        assert sorted(s["seed"] for s in mine) == [0, 1]
        row_line = next(line for line in md.splitlines() if line.startswith(f"| {alg} |"))
        for metric in ("TRR", "ERR", "ES", "holdout", "locality", "edit_time_s"):
            values = [s[metric] for s in mine]
            row = rows[("qa", alg, metric)]
            assert row["n"] == "2" and row["seeds"] == "0 1"
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
            assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
            mean, std = statistics.fmean(values), statistics.stdev(values)
            fmt = (lambda v: f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}")
            assert f"{fmt(mean)} ± {fmt(std)} (n=2)" in row_line, (metric, row_line)
    skipped = md.split("## Skipped runs", 1)[1]
    assert "unfinished` | missing summary.json" in skipped
    assert "corrupt` | metrics.jsonl: corrupt line" in skipped
    for name in ("qa_tiny-t5small_metrics.png", "qa_tiny-t5small_database.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000

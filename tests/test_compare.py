"""Tests of the comparison report (``btp.report``, also ``scripts/compare.py``).

Synthetic run directories (written here in the runner's output format) pin the exact statistics,
the skipped-run reasons for every kind of damage, the bold rule, the LaTeX table and what the
figures draw; the test marked ``slow`` runs the real runner on the tiny model and checks the
table against the summaries it wrote.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from btp.report import cli as compare
from btp.report import plots
from btp.report.runs import collect
from btp.report.stats import Cell, best_beyond_spread, group_runs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, *, alg: str, seed: int, task: str = "qa", model: str = "tiny-t5small",
             base: float = 0.5, overrides: list[str] | None = None, n_edits: int = 8,
             period: int = 4, alone: bool = False) -> dict:
    """Write a run directory in the runner's format; returns its summary."""
    path.mkdir(parents=True)
    curve = []
    for n in range(period, n_edits + 1, period):
        row = {"n_edits": n, "ES": base + 0.01 * n, "ERR": base + 0.02 * seed, "TRR": base - 0.1,
               "locality": 1.0 - 0.01 * n, "clusters": n // 2, "conflicts": seed, "forgotten": 0,
               "edit_time_s": 0.1 * n}
        row["holdout" if task == "qa" else "ARR"] = base / 2 + 0.05 * seed
        if alone:
            row.update(ES_alone=base / 2, ERR_alone=base / 3, holdout_alone=base / 4)
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


def table_row(md: str, method: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {method} |"))


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
    assert compare.main([str(root), "--out", str(out), "--no-plots"]) == 0
    rows = read_csv(out / "comparison.csv")
    for method, runs in summaries.items():
        for metric in ("TRR", "ERR", "ES", "holdout", "locality", "edit_time_s", "ES_em"):
            values = [r[metric] for r in runs]
            row = rows[("qa", method, metric)]
            assert int(row["n"]) == len(values) and row["nonfinite"] == ""
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
    assert "alone" not in header  # runs without the asked-alone metrics: no such columns
    assert "| method | TRR ↓ | ERR ↓ | ES ↓ | ARR ↓ | locality ↑" in md
    melo_row = next(line for line in md.splitlines() if line.startswith("| melo |")
                    and "(n=3)" in line)
    assert f"{statistics.fmean(err):.3f} ± {statistics.stdev(err):.3f} (n=3)" in melo_row
    assert "| 0, 1, 2 |" in melo_row
    # Variants of one algorithm from a hyperparameter sweep are separate rows.
    assert "| grace (grace.init_radius=50) |" in md and "| grace (grace.init_radius=75) |" in md


def test_asked_alone_columns_follow_their_batched_counterparts(tmp_path: Path) -> None:
    for seed in (0, 1):
        make_run(tmp_path / "runs" / f"m{seed}", alg="melo", seed=seed, alone=True)
        make_run(tmp_path / "runs" / f"f{seed}", alg="ft", seed=seed)  # an older run: no *_alone
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "runs"), "--out", str(out), "--no-plots"]) == 0
    md = (out / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header == ("| method | TRR ↑ | ERR ↑ | ES ↑ | holdout ↑ | ERR alone ↑ | ES alone ↑ "
                      "| holdout alone ↑ | locality ↑ | edit time (s) ↓ | seeds |")
    assert table_row(md, "melo").count("0.250 ± 0.000 (n=2)") == 1  # ES_alone = base / 2
    cells = table_row(md, "ft").split(" | ")
    assert cells[5:8] == ["–", "–", "–"]  # ft has no asked-alone metrics
    rows = read_csv(out / "comparison.csv")
    assert float(rows[("qa", "melo", "holdout_alone")]["mean"]) == pytest.approx(0.125)
    assert ("qa", "ft", "ES_alone") not in rows


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


# Each damage (file, content) and the reason the report must give for it.
DAMAGE: list[tuple[str, str, bytes | str, str]] = [
    ("metrics_not_utf8", "metrics.jsonl", b'{"n_edits": 4, "ES": 0.5}\n{"n_edits": 8, "\xff\xfe"}\n',
     "metrics.jsonl: line 2 is not UTF-8 text (byte 0xff)"),
    ("summary_not_utf8", "summary.json", b'{"task": "qa\xc3\x28"}',
     "summary.json: not UTF-8 text (byte 0xc3 on line 1)"),
    ("summary_list", "summary.json", "[1, 2]", "summary.json: expected a JSON object, got list"),
    ("summary_null", "summary.json", "null", "summary.json: expected a JSON object, got NoneType"),
    ("seed_list", "summary.json", None, "summary.json: seed is not an integer ([0])"),
    ("seed_bool", "summary.json", None, "summary.json: seed is not an integer (True)"),
    ("alg_number", "summary.json", None, "summary.json: alg is not a name (3)"),
    ("n_edits_inf", "summary.json", None, "summary.json: n_edits is not a count (inf)"),
    ("es_string", "summary.json", None, "summary.json: ES is not a number ('high')"),
    ("es_dict", "summary.json", None, "summary.json: ES is not a number ({'a': 1})"),
    ("deep_json", "summary.json", "[" * 100_000 + "]" * 100_000, "summary.json: invalid JSON"),
    ("curve_string", "metrics.jsonl", '{"n_edits": 4, "ES": "x"}\n',
     "metrics.jsonl: line 1: ES is not a number ('x')"),
    ("curve_list", "metrics.jsonl", "[1]\n", "metrics.jsonl: corrupt line 1 (not a JSON object)"),
    ("curve_no_edits", "metrics.jsonl", '{"ES": 1}\n', "metrics.jsonl: corrupt line 1 (no numeric"),
    ("curve_nan_edits", "metrics.jsonl", '{"n_edits": NaN}\n',
     "metrics.jsonl: corrupt line 1 (no numeric n_edits)"),
    ("curve_empty", "metrics.jsonl", "\n\n", "metrics.jsonl: empty"),
    ("curve_dir", "metrics.jsonl", "DIR", "metrics.jsonl is not a file"),
]
SUMMARY_EDITS = {"seed_list": ("seed", [0]), "seed_bool": ("seed", True), "alg_number": ("alg", 3),
                 "n_edits_inf": ("n_edits", math.inf), "es_string": ("ES", "high"),
                 "es_dict": ("ES", {"a": 1})}


def test_every_kind_of_damage_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """Whatever is wrong with a run, it is listed with the reason and the report is written."""
    runs = tmp_path / "runs"
    good = make_run(runs / "good", alg="melo", seed=0)
    for seed, (name, file, content, _) in enumerate(DAMAGE, start=1):
        run = runs / name
        make_run(run, alg="melo", seed=seed)
        target = run / file
        if name in SUMMARY_EDITS:
            key, value = SUMMARY_EDITS[name]
            summary = json.loads(target.read_text())
            summary[key] = value
            target.write_text(json.dumps(summary))  # Infinity where json.dumps writes one
        elif content == "DIR":
            target.unlink()
            target.mkdir()
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    out = tmp_path / "out"
    assert compare.main([str(runs), "--out", str(out), "--figures", "curves",
                         "--formats", "png"]) == 0
    md = (out / "comparison.md").read_text()
    skipped = md.split("## Skipped runs", 1)[1]
    for name, _, _, reason in DAMAGE:
        line = next(line for line in skipped.splitlines() if f"/{name}`" in line)
        assert reason in line, (name, line)
    rows = read_csv(out / "comparison.csv")
    assert rows[("qa", "melo", "ES")]["n"] == "1"
    assert float(rows[("qa", "melo", "ES")]["mean"]) == pytest.approx(good["ES"])
    assert (out / "qa_tiny-t5small_metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_an_unexpected_fault_skips_the_run_too(tmp_path: Path, monkeypatch) -> None:
    make_run(tmp_path / "runs" / "good", alg="melo", seed=0)
    make_run(tmp_path / "runs" / "faulty", alg="melo", seed=1)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.parent.name == "faulty" and self.name == "metrics.jsonl":
            raise OSError(5, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    collection = collect([tmp_path / "runs"])
    assert [r.path.name for r in collection.runs] == ["good"]
    assert [(s.path.name, s.reason) for s in collection.skipped] == [
        ("faulty", "unreadable (OSError: [Errno 5] Input/output error)")]


def test_non_finite_values_are_shown_and_kept_out_of_means(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    finite = [make_run(runs / f"m{seed}", alg="melo", seed=seed, base=0.5 + 0.1 * seed)
              for seed in (0, 1)]
    for seed, value in ((2, "Infinity"), (3, "NaN"), (4, "-Infinity")):
        make_run(runs / f"m{seed}", alg="melo", seed=seed)
        path = runs / f"m{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["ES"] = "PLACEHOLDER"
        path.write_text(json.dumps(summary).replace('"PLACEHOLDER"', value))
        with (runs / f"m{seed}" / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"n_edits": 12, "ES": 0.5}).replace("0.5", value) + "\n")
    # A null metric (not computed) is neither a value nor a non-finite one.
    make_run(runs / "m5", alg="melo", seed=5)
    summary = json.loads((runs / "m5" / "summary.json").read_text())
    summary["ES"] = None
    (runs / "m5" / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert compare.main([str(runs), "--out", str(out), "--figures", "curves",
                         "--formats", "png"]) == 0
    rows = read_csv(out / "comparison.csv")
    es = rows[("qa", "melo", "ES")]
    values = [s["ES"] for s in finite]
    assert es["n"] == "2" and es["nonfinite"] == "-inf:1 inf:1 nan:1"
    assert float(es["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-6)
    assert float(es["std"]) == pytest.approx(statistics.stdev(values), abs=1e-6)
    assert rows[("qa", "melo", "ERR")]["n"] == "6"  # the other metrics of those runs count
    md = (out / "comparison.md").read_text()
    assert (f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (n=2), "
            "-inf (1 run), inf (1 run), nan (1 run)") in table_row(md, "melo")
    assert "## Skipped runs\n\nNone." in md
    tex = (out / "comparison.tex").read_text()
    assert r"$-\infty$ (1), $\infty$ (1), NaN (1)" in tex
    # The curves leave the non-finite points out instead of failing or drawing them.
    xs, mean, low, high = plots.seed_band(
        [r for r in collect([runs]).runs], "ES", "std")
    assert np.isfinite(mean).all() and 12.0 not in list(xs)


def test_duplicate_seed_is_skipped_not_averaged(tmp_path: Path) -> None:
    make_run(tmp_path / "a" / "run", alg="ft", seed=0, base=0.4)
    make_run(tmp_path / "b" / "run", alg="ft", seed=0, base=0.9)
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                         "--no-plots"]) == 0
    rows = read_csv(out / "comparison.csv")
    assert rows[("qa", "ft", "TRR")]["n"] == "1"
    assert float(rows[("qa", "ft", "TRR")]["mean"]) == pytest.approx(0.3)
    assert "duplicate seed 0" in (out / "comparison.md").read_text()


def test_bold_only_beyond_the_spread() -> None:
    key_a, key_b, key_c = ("qa", "m", "a"), ("qa", "m", "b"), ("qa", "m", "c")
    cell = lambda *v: Cell.of(v)  # noqa: E731
    # TRR 0.001 vs 0.000 with std 0.002: inside the noise, no bold.
    assert best_beyond_spread("qa", "TRR", {key_a: cell(0.0, 0.002), key_b: cell(0.0, 0.0)}) \
        is None
    # Far apart compared with their spreads: the best is bold.
    assert best_beyond_spread("qa", "ERR", {key_a: cell(0.9, 0.92), key_b: cell(0.4, 0.5),
                                            key_c: cell(0.1, 0.1)}) == key_a
    # Lower is better for edit time; the runner-up (a noisy 6 ± 7) decides, not the worst.
    assert best_beyond_spread("qa", "edit_time_s", {key_a: cell(5, 5.1), key_b: cell(9, 9.2),
                                                    key_c: cell(1, 11)}) is None
    assert best_beyond_spread("qa", "edit_time_s", {key_a: cell(5, 5.1), key_b: cell(9, 9.2)}) \
        == key_a
    # One run has no spread to compare: no bold; neither has a column without a direction.
    assert best_beyond_spread("qa", "ERR", {key_a: cell(0.9), key_b: cell(0.1, 0.1)}) is None
    assert best_beyond_spread("qa", "clusters", {key_a: cell(9, 9), key_b: cell(1, 1)}) is None
    # Equal best means: no single best.
    assert best_beyond_spread("qa", "ERR", {key_a: cell(1, 1), key_b: cell(1, 1)}) is None


def test_bold_in_markdown_and_latex(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs / f"melo{seed}", alg="melo", seed=seed, base=0.8 + 0.001 * seed)
        make_run(runs / f"ft{seed}", alg="ft", seed=seed, base=0.2 + 0.001 * seed)
        make_run(runs / f"pl{seed}", alg="plain_lora", seed=seed, base=0.2 + 0.002 * seed)
    out = tmp_path / "out"
    assert compare.main([str(runs), "--out", str(out), "--no-plots"]) == 0
    md = (out / "comparison.md").read_text()
    assert table_row(md, "melo").split(" | ")[3] == "**0.881 ± 0.001 (n=2)**"  # ES: far ahead
    assert "**" not in table_row(md, "ft") and "**" not in table_row(md, "plain_lora")
    tex = (out / "comparison.tex").read_text()
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lcccccc}",
                  r"Method & TRR $\uparrow$ & ERR $\uparrow$", r"edit time (s) $\downarrow$",
                  r"plain\_lora & ", r"$\mathbf{0.881 \pm 0.001}$ (2)",
                  r"\caption{Task \texttt{qa}, model \texttt{tiny-t5small}: F1",
                  r"\label{tab:qa-tiny-t5small}"):
        assert piece in tex, piece
    # One row per method, in the table's order (baselines first, MELO last).
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0].strip().splitlines()
    assert [line.split(" & ")[0] for line in body] == ["ft", r"plain\_lora", "melo"]
    assert all(line.endswith(r"\\") and line.count(" & ") == 6 for line in body)


def test_figures_png_and_pdf_with_one_style_per_method(sweep: tuple[Path, dict],
                                                       tmp_path: Path) -> None:
    root, _ = sweep
    out = tmp_path / "out"
    assert compare.main([str(root), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    for stem in ("qa_tiny-t5small_metrics", "qa_tiny-t5small_database",
                 "hallucination_tiny-gpt2_metrics"):
        png = (out / f"{stem}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000  # a real figure, not an empty canvas
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert f"![{stem}]({stem}.png)" in md and f"[PDF]({stem}.pdf)" in md
    from PIL import Image

    with Image.open(out / "qa_tiny-t5small_metrics.png") as image:
        assert image.size[0] >= 1600  # 200 dpi


def test_a_figure_that_fails_costs_only_itself(tmp_path: Path, monkeypatch) -> None:
    make_run(tmp_path / "runs" / "r", alg="melo", seed=0)
    real = plots.curves_figure

    def failing(groups, task, metrics, *args, **kwargs):
        if metrics == plots.DB_STATS:
            raise ValueError("no room on the canvas")
        return real(groups, task, metrics, *args, **kwargs)

    monkeypatch.setattr(plots, "curves_figure", failing)
    out = tmp_path / "out"
    assert compare.main([str(tmp_path / "runs"), "--out", str(out), "--formats", "png"]) == 0
    md = (out / "comparison.md").read_text()
    assert "## Figures not drawn\n\n- qa_tiny-t5small_database: ValueError: no room on the canvas" \
        in md
    assert "![qa_tiny-t5small_metrics](qa_tiny-t5small_metrics.png)" in md
    assert not (out / "qa_tiny-t5small_database.png").exists()
    assert (out / "comparison.csv").is_file() and (out / "comparison.tex").is_file()


def _drawn(fig) -> dict[str, dict[str, tuple]]:
    """{panel title: {label: (color, marker, linestyle, xdata, ydata)}} of a figure's series."""
    out: dict[str, dict[str, tuple]] = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        series = {}
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_"):
                continue
            series[label] = (line.get_color(), line.get_marker(), line.get_linestyle(),
                             list(line.get_xdata()), list(line.get_ydata()))
        for container in ax.containers:  # errorbar points (per-batch metrics)
            data_line = container.lines[0]
            series[container.get_label()] = (
                data_line.get_color(), data_line.get_marker(), data_line.get_linestyle(),
                list(data_line.get_xdata()), list(data_line.get_ydata()))
        out[ax.get_title()] = series
    return out


def test_figure_conventions(tmp_path: Path) -> None:
    """Styles stay with their method; rates on [0, 1]; counts from 0; bands clipped; per-batch
    values as unjoined points; shared x with ticks on the evaluation points."""
    runs = tmp_path / "runs"
    for seed, spread in zip((0, 1, 2), (0.4, 0.85, 0.9)):
        # Same values for melo and plain_lora: distinct styles must keep both visible.
        make_run(runs / f"m{seed}", alg="melo", seed=seed, base=0.5)
        make_run(runs / f"p{seed}", alg="plain_lora", seed=seed, base=0.5)
        # Widely spread values near 1: a ±std band would cross 1 unless clipped.
        make_run(runs / f"g{seed}", alg="grace", seed=seed, base=spread)
    groups = group_runs(collect([runs]).runs)
    styles = plots.StyleBook(plots.style_labels(groups))
    fig = plots.curves_figure(groups, "qa", plots.CURVE_METRICS, "std", "t", styles)
    drawn = _drawn(fig)
    seen: dict[str, tuple] = {}
    for title, series in drawn.items():
        for label, (color, marker, linestyle, xs, ys) in series.items():
            method = label.split(" (n=")[0]
            seen.setdefault(method, (color, marker))
            assert seen[method] == (color, marker), (title, method)  # same style in every panel
            if title.startswith("ES"):
                assert linestyle == "None"  # per-batch values: points, not a trend line
    assert len({v for v in seen.values()}) == 3  # three methods, three styles
    assert plots.StyleBook(["melo", "x"])["melo"] == styles["melo"]  # the same in every report
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax in axes:
        assert ax.get_xlim() == axes[0].get_xlim()  # shared x
        assert list(ax.get_xticks()) == [4.0, 8.0]  # the evaluation points
        assert ax.get_ylim() == pytest.approx((-0.04, 1.04))  # qa metrics are rates
        for poly in ax.collections:  # seed bands (fill_between)
            for path in poly.get_paths():
                ys = path.vertices[:, 1]
                assert ys.min() >= 0.0 and ys.max() <= 1.0  # clipped to the rate range
    crossing = [p for ax in axes if ax.get_title().startswith("ERR ") for p in ax.collections]
    assert crossing  # the grace band of ERR (0.74 ± 0.29) is cut at 1
    # Values a rate cannot take mean the file holds something else: a free axis shows them.
    assert plots.panel_kind("qa", "ES", [0.5, 1.0]) == "rate"
    assert plots.panel_kind("qa", "ES", [0.5, 1.2]) == "real"
    assert plots.panel_kind("qa", "clusters", [-1.0]) == "real"
    db = plots.curves_figure(groups, "qa", plots.DB_STATS, "std", "t", styles)
    for ax in [a for a in db.axes if a.get_visible()]:
        low, high = ax.get_ylim()
        assert low <= 0 and low > -0.05 * high  # counts start at 0
        assert all(float(t).is_integer() for t in ax.get_yticks())
        for label, (color, marker, *_rest) in _drawn(db)[ax.get_title()].items():
            assert (color, marker) == seen[label.split(" (n=")[0]]  # same style as above


def test_ablation_figure_one_line_per_method(tmp_path: Path) -> None:
    """melo.num_rank_per_block swept for MELO and plain LoRA (both read melo.*); GRACE runs in
    the same folder are not part of it; a run without the override counts at its config value."""
    runs = tmp_path / "runs"
    for rank in (1, 2, 4):
        for seed in (0, 1):
            for alg in ("melo", "plain_lora"):
                overrides = [] if rank == 2 else [f"melo.num_rank_per_block={rank}"]
                run = runs / f"{alg}_{rank}_{seed}"
                make_run(run, alg=alg, seed=seed, base=0.1 * rank + 0.01 * seed,
                         overrides=overrides)
                (run / ".hydra" / "config.yaml").write_text(
                    "melo:\n  num_rank_per_block: 2\n  init_radius: 1.0\n")
    make_run(runs / "grace", alg="grace", seed=0)
    out = tmp_path / "out"
    assert compare.main([str(runs), "--out", str(out), "--figures", "ablation"]) == 0
    assert not (out / "qa_tiny-t5small_metrics.png").exists()
    stem = "qa_tiny-t5small_ablation_melo.num_rank_per_block"
    assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / f"{stem}.pdf").is_file()
    md = (out / "comparison.md").read_text()
    assert f"![{stem}]({stem}.png)" in md
    assert "| melo (melo.num_rank_per_block=2) |" in md  # the default, named by its value

    groups = group_runs(collect([runs]).runs)
    all_runs = [r for rs in groups.values() for r in rs]
    lines = plots.ablation_lines(all_runs)
    assert list(lines) == ["melo.num_rank_per_block"]
    assert sorted(lines["melo.num_rank_per_block"]) == ["melo", "plain_lora"]
    styles = plots.StyleBook(plots.style_labels(groups))
    fig = plots.ablation_figure("qa", "tiny-t5small", "melo.num_rank_per_block",
                                lines["melo.num_rank_per_block"], ["ES", "ERR"], styles)
    panel = _drawn(fig)["ES ↑"]
    assert set(panel) == {"melo (seeds: 2)", "plain_lora (seeds: 2)"}
    color, marker, _, xs, ys = panel["melo (seeds: 2)"]
    assert (color, marker) == (styles["melo"].color, styles["melo"].marker)
    assert xs == [1.0, 2.0, 4.0]
    # ES of the last record = base + 0.01 * 8; mean over seeds 0, 1 of base = 0.1 * rank + 0.01 s.
    assert ys == pytest.approx([0.1 * r + 0.005 + 0.08 for r in (1, 2, 4)])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4"]


def test_seed_band_minmax_and_std(sweep: tuple[Path, dict]) -> None:
    root, _ = sweep
    runs = [r for r in collect([root]).runs if r.method == "melo" and r.task == "qa"]
    xs, mean, low, high = plots.seed_band(runs, "ERR", "minmax")
    assert list(xs) == [4.0, 8.0]
    assert mean[0] == pytest.approx(statistics.fmean([0.5, 0.62, 0.84]))
    assert (low[0], high[0]) == pytest.approx((0.5, 0.84))
    xs, mean, low, high = plots.seed_band(runs, "ERR", "std")
    assert high[0] - mean[0] == pytest.approx(statistics.stdev([0.5, 0.62, 0.84]))


def _entry(argv: list[str], module: bool = False) -> int:
    """``python scripts/compare.py ARGS`` (or ``python -m btp.report ARGS``) in this process, as
    ``__main__``; the exit status."""
    import runpy

    saved = sys.argv
    sys.argv = ["btp.report" if module else str(SCRIPT), *argv]
    try:
        if module:
            runpy.run_module("btp.report", run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = saved
    return 0


def test_nothing_usable_exits_nonzero(tmp_path: Path, caplog) -> None:
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "metrics.jsonl").write_text("garbage\n")
    out = tmp_path / "out"
    assert _entry([str(tmp_path / "runs"), "--out", str(out)]) == 1
    assert any("no usable run" in r.getMessage() for r in caplog.records)
    assert "missing summary.json" in (out / "comparison.md").read_text()


def test_module_entry_point_and_unwritable_out(tmp_path: Path, caplog, capsys) -> None:
    make_run(tmp_path / "runs" / "r", alg="melo", seed=0)
    out = tmp_path / "out"
    assert _entry([str(tmp_path / "runs"), "--out", str(out), "--no-plots"], module=True) == 0
    assert "Generated by `python -m btp.report " in (out / "comparison.md").read_text()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    caplog.clear()
    assert _entry([str(tmp_path / "runs"), "--out", str(blocker / "sub")]) == 2  # no traceback
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].name == "btp.report"
    assert errors[0].getMessage().startswith(f"cannot write the report to {blocker / 'sub'}")
    capsys.readouterr()
    assert _entry([str(tmp_path / "runs"), "--out", str(out), "--figures", "curves,pies"]) == 2
    assert "pies" in capsys.readouterr().err  # argparse's usage error


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
    from btp.report import runs as report_runs
    from btp.schema import ALG_SECTIONS

    assert report_runs.ALG_SECTIONS is ALG_SECTIONS
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
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("BTP_TEST_KILL_AT", None)
    cmd = [sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep_dir}", "+alg=lora,grace",
           "+experiment=qa", "+model=tiny-t5small", "seed=0,1", "max_n_edits=8",
           "metric_period=4", "data.n_upstream=8", "eval.alone_records=4", "eval.max_length=8",
           "melo.num_iter=10",
           "grace.num_iter=10"]  # GRACE edits one record at a time: 8 edits; keep it short
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
        row_line = table_row(md, alg)
        for metric in ("TRR", "ERR", "ES", "holdout", "ES_alone", "ERR_alone", "holdout_alone",
                       "locality", "edit_time_s"):
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
    for stem in ("qa_tiny-t5small_metrics", "qa_tiny-t5small_database"):
        data = (out / f"{stem}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert (out / f"{stem}.pdf").is_file()


def test_max_n_edits_sweep_is_one_row_per_stream_length(tmp_path: Path) -> None:
    """WISE's T = 1, 10, 100 table: a `max_n_edits=1,10,100` sweep gives one row per method and T,
    each with its own number of edits."""
    for alg in ("melo", "grace"):
        for t in (1, 10, 100):
            make_run(tmp_path / f"{alg}{t}", alg=alg, seed=0, n_edits=t, period=1,
                     overrides=[f"max_n_edits={t}"])
    out = tmp_path / "out"
    assert compare.main([str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    rows = read_csv(out / "comparison.csv")
    methods = {key[1] for key in rows}
    assert methods == {f"{alg} (max_n_edits={t})" for alg in ("melo", "grace") for t in (1, 10, 100)}
    # each row is its own run's final value: ES = 0.5 + 0.01 * T in make_run
    for t in (1, 10, 100):
        assert float(rows[("qa", f"grace (max_n_edits={t})", "ES")]["mean"]) == pytest.approx(0.5 + 0.01 * t)

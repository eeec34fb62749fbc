"""The run's closing summary line: headline values, asked-alone values beside them, n/a for NaN;
its keys and the docs' list of summary keys follow the task registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from btp.outputs import SUMMARY_LINE_KEYS, summary_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("summary,want", [
    ({"ES": 1.0, "ES_alone": 0.5, "ERR": 0.97, "ERR_alone": 0.2, "TRR": 0.0, "locality": 1.0,
      "holdout": 0.044, "holdout_alone": 0.025, "clusters": 81, "conflicts": 0, "n_edits": 81,
      "edit_time_s": 174.1},
     "ES 1.000 (alone 0.500) | ERR 0.970 (alone 0.200) | TRR 0.000 | locality 1.000 | "
     "holdout 0.044 (alone 0.025) | clusters 81, conflicts 0 | 81 edits in 174.1 s"),
    ({"ES": 12.5, "ERR": float("nan"), "TRR": None, "locality": 0.9, "ARR": 3.25, "clusters": 0,
      "conflicts": 0, "n_edits": 4, "edit_time_s": 2},
     "ES 12.500 | ERR n/a | TRR n/a | locality 0.900 | ARR 3.250 | clusters 0, conflicts 0 | "
     "4 edits in 2.0 s"),
])
def test_summary_line(summary: dict, want: str) -> None:
    assert summary_line(summary) == want


def test_summary_line_keys_are_the_registry_sets() -> None:
    from btp.tasks import TASKS

    sets = {s.name for spec in TASKS.values() for s in spec.eval_sets}
    assert set(SUMMARY_LINE_KEYS) == {"ES", "ERR", "TRR", "locality"} | sets


@pytest.mark.parametrize("doc,heading", [("README.md", "### Outputs"),
                                         ("docs/architecture.md", "### Outputs of a run")])
def test_docs_list_the_summary_keys_of_the_runner_and_the_registry(doc: str, heading: str) -> None:
    """The docs' list of summary.json keys: every key the runner writes, then each task's extra
    evaluation sets as ``name`` (tasks), the same as the task registry's."""
    from btp.runner import SUMMARY_KEYS
    from btp.tasks import TASKS

    text = (ROOT / doc).read_text(encoding="utf-8")
    section = text[text.index(heading):]
    end = section.find("\n#", 1)
    section = section if end < 0 else section[:end]
    listed = section[section.index("`summary.json` ("):]
    common, extra = listed.split("plus", 1)
    assert set(re.findall(r"`(\w+)`", common)) == set(SUMMARY_KEYS)
    extra = extra[:extra.index("`adapter/`")]
    documented = {name: {t.strip() for t in tasks.split(",")}
                  for name, tasks in re.findall(r"`(\w+)`\s+\(([a-z_, ]+)\)", extra)}
    registry: dict[str, set[str]] = {}
    for spec in TASKS.values():
        for s in spec.eval_sets:
            registry.setdefault(s.name, set()).add(spec.name)
    assert documented == registry

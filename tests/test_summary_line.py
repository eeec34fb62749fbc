"""The run's closing summary line: headline values, asked-alone values beside them, n/a for NaN."""

from __future__ import annotations

import pytest

from btp.outputs import summary_line


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

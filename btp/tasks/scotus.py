"""``scotus``: U.S. Supreme Court opinions classified by issue area with BERT
(``config/experiment/scotus.yaml``).

Edits come from the later cases, upstream from the earlier ones (grace-scotus, its CSV export or
LexGLUE's raw file; ``data.scotus_source``). The headline metric is accuracy; there is no extra
evaluation set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btp.tasks.base import LoadArgs, TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    from btp.data.common import TaskData


def load(args: LoadArgs) -> "TaskData":
    """Edits and upstream (:func:`btp.data.scotus.load_scotus`); labels checked against
    ``num_labels`` when it is known."""
    from btp.data.common import TaskData
    from btp.data.scotus import load_scotus

    edits, upstream = load_scotus(args.data_dir, args.max_n_edits, args.n_upstream, args.get,
                                  args.num_labels)
    return TaskData(edits=edits, upstream=upstream)


SPEC = TaskSpec(
    name="scotus", model_kinds=("classification",), loader=load, collate="classification",
    evaluator="ClassificationEvaluator", quality="accuracy", higher_is_better=True,
    quality_kind="rate", table_rank=0,
    description="SCOTUS issue-area classification on BERT (accuracy)",
)

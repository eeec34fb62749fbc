"""``qa``: zsRE question answering on T5, MELO's first task (``config/experiment/qa.yaml``).

Edits are zsRE questions with their answers (MEND's file, or ROME's with ``data.zsre_format``),
permuted with ``data.edit_permutation_seed``; upstream is Natural Questions; the holdout set is
the edits' rephrasings. The headline metric is token F1 (exact match is logged as ``*_em``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btp.tasks.base import EvalSet, LoadArgs, TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    from btp.data.common import TaskData

#: MELO's number of zsRE edits when ``max_n_edits`` is not given.
DEFAULT_EDITS = 1000


def load(args: LoadArgs) -> "TaskData":
    """Edits, holdout and upstream (:func:`btp.data.zsre.load_qa`)."""
    from btp.data.common import TaskData
    from btp.data.zsre import load_qa

    n_edits = DEFAULT_EDITS if args.max_n_edits is None else int(args.max_n_edits)
    edits, holdout, upstream = load_qa(args.data_cfg, args.data_dir, n_edits, args.n_upstream,
                                       args.get)
    return TaskData(edits=edits, upstream=upstream, holdout=holdout)


SPEC = TaskSpec(
    name="qa", model_kinds=("seq2seq",), loader=load, collate="seq2seq",
    evaluator="QAEvaluator", quality="F1", higher_is_better=True, quality_kind="rate",
    eval_sets=(EvalSet("holdout", "holdout", asked_alone=True,
                       meaning="rephrased edit questions (generality)"),),
    summary_keys=("holdout",), table_rank=1,
    description="zsRE question answering on T5 (token F1)",
)

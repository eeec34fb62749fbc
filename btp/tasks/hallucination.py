"""``hallucination``: GPT-2 corrected on WikiBio sentences GPT-3 got wrong
(``config/experiment/hallucination.yaml``).

Edits are the inaccurate sentences with their corrections, ``ARR`` scores the sentences that
were already accurate, upstream is OpenWebText. The headline metric is perplexity (lower is
better).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btp.tasks.base import EvalSet, LoadArgs, TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    from btp.data.common import TaskData


def load(args: LoadArgs) -> "TaskData":
    """Edits, accurate sentences and upstream
    (:func:`btp.data.hallucination.load_hallucination`)."""
    from btp.data.common import TaskData
    from btp.data.hallucination import load_hallucination

    edits, accurate, upstream = load_hallucination(args.data_dir, args.max_n_edits,
                                                   args.n_upstream, args.get)
    return TaskData(edits=edits, upstream=upstream, accurate=accurate)


SPEC = TaskSpec(
    name="hallucination", model_kinds=("causal_lm",), loader=load, collate="causal_lm",
    evaluator="PerplexityEvaluator", quality="perplexity", higher_is_better=False,
    quality_kind="nonnegative",
    eval_sets=(EvalSet("ARR", "accurate",
                       meaning="sentences that were already accurate (accuracy retention)"),),
    summary_keys=("ARR",), table_rank=2, aliases=("hallucinations",),
    description="WikiBio hallucination correction on GPT-2 (perplexity)",
)

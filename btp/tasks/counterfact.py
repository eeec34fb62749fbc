"""``counterfact``: CounterFact's counterfactual rewrites on decoder LLMs
(``config/experiment/counterfact.yaml``).

Either form of the data (the original's ``requested_rewrite`` records or EasyEdit's flattened
ones). ``holdout`` scores the paraphrase prompts, ``truth`` the edit prompts with their true
targets, upstream the neighbourhood prompts. The headline metric is teacher-forced token accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btp.tasks.base import LoadArgs, TaskSpec
from btp.tasks.zsre import FACT_SETS

if TYPE_CHECKING:  # pragma: no cover
    from btp.data.common import TaskData


def load(args: LoadArgs) -> "TaskData":
    """The facts of ``data.counterfact_file`` (:func:`btp.data.counterfact.load_counterfact`)."""
    from btp.data.counterfact import load_counterfact

    return load_counterfact(args.data_dir, args.max_n_edits, args.n_upstream, args.get)


SPEC = TaskSpec(
    name="counterfact", model_kinds=("causal_lm",), loader=load, collate="facts",
    evaluator="TokenAccuracyEvaluator", quality="token accuracy", higher_is_better=True,
    quality_kind="rate", eval_sets=FACT_SETS, summary_keys=("holdout",), table_rank=4,
    description="CounterFact rewrites on decoder LLMs (token accuracy)",
)

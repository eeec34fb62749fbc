"""``zsre``: zsRE facts as EasyEdit and WISE edit decoder LLMs (``config/experiment/zsre.yaml``).

A fact is ``prompt -> target``; the model learns the target tokens. ``holdout`` scores the
rephrased prompts (EasyEdit's Gen.), ``truth`` the edit prompts with their true answers, and
upstream the locality prompts (Loc.). The headline metric is teacher-forced token accuracy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btp.tasks.base import EvalSet, LoadArgs, TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    from btp.data.common import TaskData

#: The extra sets of both fact-editing tasks (``counterfact`` uses them too).
FACT_SETS = (
    EvalSet("holdout", "holdout", asked_alone=True,
            meaning="rephrased prompts with the new targets (EasyEdit's Gen.)"),
    EvalSet("truth", "truth", meaning="the edit prompts with their true targets"),
)


def load(args: LoadArgs) -> "TaskData":
    """The facts of ``data.zsre_file`` (:func:`btp.data.zsre_lm.load_zsre_facts`)."""
    from btp.data.zsre_lm import load_zsre_facts

    return load_zsre_facts(args.data_dir, args.max_n_edits, args.n_upstream, args.get)


SPEC = TaskSpec(
    name="zsre", model_kinds=("causal_lm",), loader=load, collate="facts",
    evaluator="TokenAccuracyEvaluator", quality="token accuracy", higher_is_better=True,
    quality_kind="rate", eval_sets=FACT_SETS, summary_keys=("holdout",), table_rank=3,
    description="zsRE facts on decoder LLMs (token accuracy)",
)

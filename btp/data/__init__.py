"""The data layer: per-task loaders returning :class:`TaskData`, and the :class:`Collator`.

``load_task_data(task, data_cfg, data_dir, max_n_edits)`` calls the loader of a task registered
in :mod:`btp.tasks` (``qa``: zsRE on T5, ``scotus``, ``hallucination``, and the decoder-LLM
fact-editing tasks ``zsre`` and ``counterfact``, :mod:`btp.data.facts`); the loaders themselves
live here, one module per data set. Relative file names are under ``data_dir`` (the shipped
sample is the repository's ``data/``; ``download.sh`` fills the same layout with the full data).

``data_cfg`` keys read here (attribute access; a missing key or ``None`` means the default):

==========================  ===================================================  ==============
key                         meaning                                              default
==========================  ===================================================  ==============
``zsre_format``             ``mend`` (MEND JSON-lines, MELO's file) | ``rome``   ``mend``
                            (ROME/EasyEdit JSON array)
``zsre_file``               zsRE file under data_dir                             ``zsre_train.jsonl``
                                                                                 (mend) /
                                                                                 ``zsre_mend_eval.json``
                                                                                 (rome)
``zsre_holdout_swap_bug``   reproduce the original's holdout text/label swap     ``false``
``edit_permutation_seed``   numpy seed of the zsRE edit permutation              ``42``
``nq_file``                 NQ upstream file                                     ``nq_train.json``
``n_upstream``              upstream records kept (first n), every task; null =  ``1000``
                            all (scotus: the whole train split)
``scotus_source``           ``auto`` | ``hub`` | ``csv`` | ``lexglue``           ``auto``
``scotus_hub_id``           hub id for ``scotus_source=hub``                     ``tomh/grace-scotus``
``scotus_lexglue_file``     LexGLUE raw file                                     ``scotus/scotus.jsonl``
``hallucination_source``    ``auto`` | ``hub`` | ``json``                        ``auto``
``hallucination_hub_id``    hub id                                               ``potsawee/wiki_bio_gpt3_hallucination``
``hallucination_file``      local JSON export                                    ``hallucination/wikibio_gpt3_hallucination.json``
``concepts_file``           concepts, one per passage                            ``hallucination/wiki_bio_concepts.txt``
``sentence_splitter``       ``auto`` | ``nltk`` | ``regex``                      ``auto``
``upstream_source``         OpenWebText: ``auto`` | ``hub`` | ``jsonl`` | ``txt``  ``auto``
``upstream_hub_id``         hub id                                               ``stas/openwebtext-10k``
``openwebtext_dir``         folder of ``openwebtext-10k.jsonl`` / ``*.txt``      ``openwebtext``
``counterfact_file``        CounterFact, either form (counterfact)               ``counterfact/counterfact_sample.json``
==========================  ===================================================  ==============

Not read by ``load_task_data`` but meant for the same section (the runner passes them to
:class:`Collator`): ``max_length`` (qa 20, scotus 512, hallucination 1024) and
``label_max_length`` (qa 20; unused by the other kinds).

Number of edits: ``max_n_edits`` if given; otherwise 1000 for qa (MELO's ``n_edits``,
``btp.tasks.qa.DEFAULT_EDITS``) and the
whole stream for the other tasks (zsre: ``zsre_file`` defaults to ``zsre_mend_eval.json``). A source with fewer records is used whole (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from btp.data.collate import Collator, batched, lazy_batches
from btp.data.common import TaskData
from btp.errors import DataError
from btp.schema import DataCfg, cfg_get, read_section
from btp.tasks import LoadArgs, find_task, task_names

log = logging.getLogger(__name__)

__all__ = ["TaskData", "Collator", "load_task_data", "check_labels", "batched", "lazy_batches"]



def load_task_data(
    task: str, data_cfg: Any, data_dir: Path | str, max_n_edits: int | None,
    num_labels: int | None = None,
) -> TaskData:
    """Load the edit stream, upstream, holdout and accurate sets of ``task``.

    Args:
        task: a registered task (:mod:`btp.tasks`) or one of its aliases.
        data_cfg: the data config section (keys in the module docstring), a dict, or ``None``.
        data_dir: root of the data layout (the shipped sample or what download.sh filled).
        max_n_edits: cap on the edit stream; ``None`` means the task's default (see above).
        num_labels: classification (scotus): the model's label count; a label outside
            ``0 .. num_labels - 1`` is refused with its file and line. ``None``: checked later
            with :func:`check_labels` once the model is loaded.

    Raises:
        DataError: unknown task, missing file (names it and says to run download.sh), malformed
            record (file and line: not UTF-8, not JSON, a field of the wrong type, an empty
            question/answer/text, a label outside the label set), or an unusable option value.
    """
    task = str(task)  # a name, or the schema's Task (whose str() is its value)
    data_dir = Path(data_dir)

    # A missing key takes the schema's default; null keeps its meaning (a loader's own default,
    # or for n_upstream every upstream record: scotus's whole train split, as the original).
    data_cfg = read_section(DataCfg, data_cfg)

    def get(key: str, default: Any) -> Any:
        return cfg_get(data_cfg, key, default)

    n_upstream = data_cfg.n_upstream
    if n_upstream is not None and n_upstream < 1:
        raise DataError(f"data.n_upstream={n_upstream!r}: use an integer >= 1 (or null for all)")
    if max_n_edits is not None and (isinstance(max_n_edits, bool)
                                    or not isinstance(max_n_edits, int) or max_n_edits < 1):
        raise DataError(f"max_n_edits={max_n_edits!r}: use an integer >= 1 (or null)")
    spec = find_task(task)
    if spec is None:
        raise DataError(f"unknown task '{task}'; expected one of {', '.join(task_names())}")
    task = spec.name
    data = spec.loader(LoadArgs(data_cfg=data_cfg, data_dir=data_dir, max_n_edits=max_n_edits,
                                n_upstream=n_upstream, num_labels=num_labels, get=get))
    if not data.edits:
        raise DataError(f"task '{task}': no edit records found under {data_dir}")
    log.info("task %s data from %s: %s", task, data_dir, data.counts())
    return data


def check_labels(data: TaskData, num_labels: int, model_name: str) -> None:
    """Refuse class labels the model cannot predict (``0 .. num_labels - 1``).

    The loaders already check their own label set with file and line; this catches a model with
    fewer labels than the data (e.g. a checkpoint whose head was trained on another label set).
    Indices count records in stream order (SCOTUS keeps file order).

    Raises:
        DataError: naming the part, the record index, the label and the model.
    """
    for part, records in (("edit stream", data.edits), ("upstream set", data.upstream)):
        for i, rec in enumerate(records):
            label = rec["label"]
            if not isinstance(label, int) or not 0 <= label < num_labels:
                raise DataError(f"{part}, record {i}: label {label!r} is outside the labels "
                                f"0..{num_labels - 1} of model {model_name}; fix the data or use "
                                "a model with that label set")

"""zsRE as EasyEdit and WISE edit decoder-only LLMs (task ``zsre``).

The file is the ROME/EasyEdit JSON array the project already reads for the T5 task
(``zsre_mend_eval.json``: ``src``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``).
Per record, in file order (WISE takes the first T records):

* edit: ``src`` -> ``alt`` (the counterfactual answer the edit writes);
* holdout (generalization): ``rephrase`` -> ``alt``;
* upstream (locality): ``loc`` -> ``loc_ans`` (an NQ question and its answer);
* truth: ``src`` -> ``answers[0]`` (the true answer, for the pre-edit accuracy).

Unlike the T5 task ``qa`` (MELO's selection, a seeded permutation, NQ upstream from its own file),
the order is the file's and every part comes from the same records. A record whose ``alt`` is
the empty string has no new target to write (ROME's file holds such records: record 54 of the
sample, "What is the sex of Phyllis Chan?") and is left out, with a log line; ``max_n_edits``
counts the records kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from btp.data.common import DataError, Record, TaskData, read_json, require_file, take, text_field
from btp.data.facts import fact

log = logging.getLogger(__name__)

DEFAULT_FILE = "zsre_mend_eval.json"


def load_zsre_facts(data_dir: Path, max_n_edits: int | None, n_upstream: int | None,
                    get: Any) -> TaskData:
    """The ``zsre`` task's records (module docstring) from ``data.zsre_file`` under ``data_dir``.

    Args:
        max_n_edits: the first this many records (``None``: every record).
        n_upstream: at most this many locality records (``None``: one per edit).
        get: ``get(key, default)`` reads the data config section.

    Raises:
        DataError: a missing file, not a JSON array, or a record without those keys or with a
            value that is not a non-empty string (with its index).
    """
    path = require_file(Path(data_dir) / get("zsre_file", DEFAULT_FILE), "zsRE (ROME form)")
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of ROME-form zsRE records")
    edits: list[Record] = []
    holdout: list[Record] = []
    upstream: list[Record] = []
    truth: list[Record] = []
    no_target: list[int] = []
    for i, rec in enumerate(data):
        if max_n_edits is not None and len(edits) >= max_n_edits:
            break
        where = f"{path}, record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("src", "alt", "answers", "rephrase", "loc", "loc_ans") if k not in rec]
        if missing:
            raise DataError(f"{where}: not a ROME zsRE record (needs 'src', 'alt', 'answers', "
                            f"'rephrase', 'loc', 'loc_ans'; missing {missing})")
        if not isinstance(rec["answers"], list) or not rec["answers"]:
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings, got "
                            f"{rec['answers']!r:.60}")
        src = text_field(rec["src"], where, "'src'")
        if rec["alt"] == "":
            no_target.append(i)
            continue
        alt = text_field(rec["alt"], where, "'alt'")
        edits.append(fact(src, alt))
        holdout.append(fact(text_field(rec["rephrase"], where, "'rephrase'"), alt))
        upstream.append(fact(text_field(rec["loc"], where, "'loc'"),
                             text_field(rec["loc_ans"], where, "'loc_ans'")))
        truth.append(fact(src, text_field(rec["answers"][0], where, "'answers'[0]")))
    if no_target:
        log.info("%s: %d record(s) with an empty 'alt' (no new target) left out: %s", path,
                 len(no_target), no_target[:10])
    if max_n_edits is not None and len(edits) < max_n_edits:
        log.info("zsRE edits (%s): only %d records available (asked for %d); using all", path,
                 len(edits), max_n_edits)
    upstream = take(upstream, n_upstream, f"zsRE locality ({path})")
    return TaskData(edits=edits, upstream=upstream, holdout=holdout, truth=truth)


__all__ = ["load_zsre_facts", "DEFAULT_FILE"]

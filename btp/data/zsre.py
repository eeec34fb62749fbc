"""zsRE question answering (the T5 task): edits and holdout from zsRE, upstream from NQ.

Two zsRE file forms are read:

* ``mend``: MEND/KILT JSON-lines (MELO's ``zsre_train.jsonl``), keys ``input``,
  ``filtered_rephrases`` and ``output[0].answer``, with MELO's selection rule
  (:func:`select_mend`).
* ``rome``: the ROME/EasyEdit JSON array (``zsre_mend_eval.json``), keys ``src``, ``rephrase`` and
  ``answers[0]``: one edit (``src``) and one holdout item (``rephrase``) per record.

Edits of both forms are permuted the way MELO does (``np.random.seed(42)`` then
``np.random.permutation(n)``); holdout stays in file order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from btp.data.common import DataError, Record, read_json, read_jsonl, require_file, take, text_field

log = logging.getLogger(__name__)

#: MELO caps the rephrasings used per record at 16 (k = min(#rephrases, 16)).
MAX_REPHRASES = 16


def permute(records: list[Record], seed: int) -> list[Record]:
    """Reorder ``records`` as ``np.random.seed(seed); np.random.permutation(len(records))`` would.

    A private ``RandomState`` gives the same stream as the legacy global seed without touching
    numpy's global state (the runner seeds that separately).
    """
    order = np.random.RandomState(seed).permutation(len(records))
    return [records[i] for i in order]


def _holdout_record(rephrase: str, answer: str, swap_bug: bool) -> Record:
    # The original unpacks load_zsre's (..., answers, questions) as (..., questions, answers),
    # so its holdout items carry the answer as text and the rephrase as label. Off by default.
    if swap_bug:
        return {"text": answer, "label": rephrase}
    return {"text": rephrase, "label": answer}


def select_mend(
    path: Path, n_edits: int, seed: int = 42, holdout_swap_bug: bool = False
) -> tuple[list[Record], list[Record]]:
    """MELO's zsRE selection on a MEND-form JSON-lines file; returns ``(edits, holdout)``.

    Walk records in file order. Skip a record with no ``filtered_rephrases`` or whose answer was
    already kept (one record per distinct answer; a skipped record does not mark its answer as
    seen). With ``k = min(#rephrases, 16)``, the record adds ``input`` and ``rephrases[:k//2]`` as
    edit candidates and ``rephrases[k//2:k+1]`` as holdout, all labelled ``output[0].answer``.
    Stop once there are at least ``n_edits`` candidates; edits = permutation (``seed``) of the
    first ``n_edits`` candidates. Holdout keeps every item of the records walked, in file order.

    Raises:
        DataError: a record without the keys above, or whose question, answer or rephrases are
            not non-empty strings (file and line number in the message).
    """
    seen: set[str] = set()
    candidates: list[Record] = []
    holdout: list[Record] = []
    for lineno, rec in read_jsonl(path):
        try:
            question = rec["input"]
            rephrases = rec["filtered_rephrases"]
            answer = rec["output"][0]["answer"]
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(
                f"{path}, line {lineno}: not a MEND zsRE record (needs 'input', "
                f"'filtered_rephrases', 'output[0].answer'; missing {e})"
            ) from e
        where = f"{path}, line {lineno}"
        text_field(question, where, "'input'")
        text_field(answer, where, "'output[0].answer'")
        if not isinstance(rephrases, list):
            raise DataError(f"{where}: 'filtered_rephrases' must be a list of strings, got "
                            f"{type(rephrases).__name__}")
        for j, rephrase in enumerate(rephrases):
            text_field(rephrase, where, f"'filtered_rephrases'[{j}]")
        if not rephrases or answer in seen:
            continue
        seen.add(answer)
        k = min(len(rephrases), MAX_REPHRASES)
        candidates.append({"text": question, "label": answer})
        candidates.extend({"text": r, "label": answer} for r in rephrases[: k // 2])
        holdout.extend(_holdout_record(r, answer, holdout_swap_bug) for r in rephrases[k // 2 : k + 1])
        if len(candidates) >= n_edits:
            break
    edits = take(candidates, n_edits, f"zsRE edits ({path})")
    return permute(edits, seed), holdout


def select_rome(
    path: Path, n_edits: int, seed: int = 42, holdout_swap_bug: bool = False
) -> tuple[list[Record], list[Record]]:
    """ROME/EasyEdit-form zsRE (a JSON array); returns ``(edits, holdout)``.

    The first ``n_edits`` records each give one edit (``src``) and one holdout item
    (``rephrase``), labelled ``answers[0]``; edits are permuted with ``seed`` as in
    :func:`select_mend`, holdout stays in file order.

    Raises:
        DataError: not a JSON array, or a record without those keys or with a value that is not a
            non-empty string (with its index).
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of ROME-form zsRE records")
    data = take(data, n_edits, f"zsRE edits ({path})")
    edits: list[Record] = []
    holdout: list[Record] = []
    for i, rec in enumerate(data):
        try:
            src, rephrase, answer = rec["src"], rec["rephrase"], rec["answers"][0]
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(
                f"{path}, record {i}: not a ROME zsRE record (needs 'src', 'rephrase', "
                f"'answers[0]'; missing {e})"
            ) from e
        where = f"{path}, record {i}"
        if not isinstance(rec["answers"], list):
            raise DataError(f"{where}: 'answers' must be a list of strings, got "
                            f"{type(rec['answers']).__name__}")
        text_field(src, where, "'src'")
        text_field(rephrase, where, "'rephrase'")
        text_field(answer, where, "'answers[0]'")
        edits.append({"text": src, "label": answer})
        holdout.append(_holdout_record(rephrase, answer, holdout_swap_bug))
    return permute(edits, seed), holdout


def load_nq(path: Path, n_upstream: int | None) -> list[Record]:
    """The first ``n_upstream`` pairs of an NQ file ``{"questions": [...], "answers": [...]}``.

    Raises:
        DataError: missing keys, values that are not lists of non-empty strings (with the index),
            or lists of different lengths.
    """
    data = read_json(path)
    if not isinstance(data, dict) or "questions" not in data or "answers" not in data:
        raise DataError(f"{path}: expected an object with 'questions' and 'answers' lists")
    questions, answers = data["questions"], data["answers"]
    for key, values in (("questions", questions), ("answers", answers)):
        if not isinstance(values, list):
            raise DataError(f"{path}: '{key}' must be a list of strings, got "
                            f"{type(values).__name__}")
        for i, value in enumerate(values):
            text_field(value, str(path), f"'{key}'[{i}]")
    if len(questions) != len(answers):
        raise DataError(
            f"{path}: 'questions' ({len(questions)}) and 'answers' ({len(answers)}) differ in length"
        )
    records = [{"text": q, "label": a} for q, a in zip(questions, answers)]
    return take(records, n_upstream, f"NQ upstream ({path})")


def load_qa(
    data_cfg: Any, data_dir: Path, n_edits: int, n_upstream: int | None, get: Any
) -> tuple[list[Record], list[Record], list[Record]]:
    """Edits, holdout and upstream for the qa task from ``data_cfg`` (``schema.DataCfg``);
    ``get(key, default)`` reads its keys whose null means this loader's default."""
    fmt = data_cfg.zsre_format.lower()
    seed = data_cfg.edit_permutation_seed
    swap = data_cfg.zsre_holdout_swap_bug
    if fmt == "mend":
        path = require_file(data_dir / get("zsre_file", "zsre_train.jsonl"), "zsRE (MEND form)")
        edits, holdout = select_mend(path, n_edits, seed, swap)
    elif fmt == "rome":
        path = require_file(data_dir / get("zsre_file", "zsre_mend_eval.json"), "zsRE (ROME form)")
        edits, holdout = select_rome(path, n_edits, seed, swap)
    else:
        raise DataError(f"data.zsre_format must be 'mend' or 'rome', got '{fmt}'")
    nq_path = require_file(data_dir / get("nq_file", "nq_train.json"), "NQ upstream")
    upstream = load_nq(nq_path, n_upstream)
    return edits, holdout, upstream

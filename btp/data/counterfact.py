"""CounterFact (Meng et al., ROME, NeurIPS 2022): counterfactual rewrites of a decoder LLM's facts
(task ``counterfact``).

Both forms researchers hold are read, recognised per record:

* the original (``counterfact.json``): ``requested_rewrite`` with a ``prompt`` template (``{}`` =
  the ``subject``), ``target_new.str`` and ``target_true.str``; ``paraphrase_prompts`` and
  ``neighborhood_prompts`` (other subjects whose true answer is ``target_true``);
* EasyEdit's flattened one: ``prompt`` (filled in), ``target_new``, ``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.

Per record, in file order:

* edit: the prompt -> the new target;
* holdout (generalization): every paraphrase (``rephrase_prompt``) -> the new target;
* upstream (locality): every neighbourhood prompt -> the true target (``locality_prompt`` ->
  ``locality_ground_truth``);
* truth: the prompt -> the true target (``ground_truth``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btp.data.common import DataError, Record, TaskData, read_json, require_file, take, text_field
from btp.data.facts import fact

DEFAULT_FILE = "counterfact/counterfact_sample.json"
EASYEDIT_KEYS = ("prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                 "locality_ground_truth")


def _strings(value: Any, where: str, name: str) -> list[str]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a list of strings, got {type(value).__name__}")
    return [text_field(v, where, f"{name}[{j}]") for j, v in enumerate(value)]


def _original(rec: dict, where: str) -> tuple[Record, list[Record], list[Record], Record]:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise DataError(f"{where}: 'requested_rewrite' must be an object, got {type(rw).__name__}")
    try:
        template, subject = rw["prompt"], rw["subject"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: 'requested_rewrite' needs 'prompt', 'subject', "
                        f"'target_new.str', 'target_true.str' (missing {e})") from e
    template = text_field(template, where, "'requested_rewrite.prompt'")
    if "{}" not in template:
        raise DataError(f"{where}: 'requested_rewrite.prompt' must hold '{{}}' for the subject, "
                        f"got {template!r:.60}")
    prompt = template.format(text_field(subject, where, "'requested_rewrite.subject'"))
    new = text_field(new, where, "'requested_rewrite.target_new.str'")
    true = text_field(true, where, "'requested_rewrite.target_true.str'")
    for key in ("paraphrase_prompts", "neighborhood_prompts"):
        if key not in rec:
            raise DataError(f"{where}: a CounterFact record needs '{key}'")
    holdout = [fact(p, new) for p in _strings(rec["paraphrase_prompts"], where, "'paraphrase_prompts'")]
    upstream = [fact(p, true) for p in _strings(rec["neighborhood_prompts"], where,
                                                "'neighborhood_prompts'")]
    return fact(prompt, new), holdout, upstream, fact(prompt, true)


def _easyedit(rec: dict, where: str) -> tuple[Record, list[Record], list[Record], Record]:
    missing = [k for k in EASYEDIT_KEYS if k not in rec]
    if missing:
        raise DataError(f"{where}: an EasyEdit CounterFact record needs {list(EASYEDIT_KEYS)} "
                        f"(missing {missing})")
    prompt = text_field(rec["prompt"], where, "'prompt'")
    new = text_field(rec["target_new"], where, "'target_new'")
    true = text_field(rec["ground_truth"], where, "'ground_truth'")
    holdout = [fact(text_field(rec["rephrase_prompt"], where, "'rephrase_prompt'"), new)]
    upstream = [fact(text_field(rec["locality_prompt"], where, "'locality_prompt'"),
                     text_field(rec["locality_ground_truth"], where, "'locality_ground_truth'"))]
    return fact(prompt, new), holdout, upstream, fact(prompt, true)


def load_counterfact(data_dir: Path, max_n_edits: int | None, n_upstream: int | None,
                     get: Any) -> TaskData:
    """The ``counterfact`` task's records (module docstring) from ``data.counterfact_file``.

    Args:
        max_n_edits: the first this many records (``None``: every record).
        n_upstream: at most this many locality records, in order (``None``: all of them).
        get: ``get(key, default)`` reads the data config section.

    Raises:
        DataError: a missing file, not a JSON array, or a record of neither form, or with a
            value of the wrong type (file and record index named).
    """
    path = require_file(Path(data_dir) / get("counterfact_file", DEFAULT_FILE), "CounterFact")
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of CounterFact records")
    data = take(data, max_n_edits, f"CounterFact edits ({path})")
    out = TaskData(holdout=[], truth=[])
    for i, rec in enumerate(data):
        where = f"{path}, record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        read = _original if "requested_rewrite" in rec else _easyedit
        edit, holdout, upstream, truth = read(rec, where)
        out.edits.append(edit)
        out.holdout.extend(holdout)
        out.upstream.extend(upstream)
        out.truth.append(truth)
    out.upstream = take(out.upstream, n_upstream, f"CounterFact locality ({path})")
    return out


__all__ = ["load_counterfact", "DEFAULT_FILE"]

"""SCOTUS issue-area classification (the BERT task).

Sources (``data.scotus_source``):

* ``hub``: ``datasets.load_dataset("tomh/grace-scotus")`` as MELO/GRACE read it: split ``train``
  is upstream, split ``test`` is the edit stream; columns ``text`` and ``label``.
* ``csv``: the same two splits as local files ``scotus/train.csv`` and ``scotus/test.csv``
  (what ``download.sh`` writes), read with ``datasets.load_dataset("csv", ...)``.
* ``lexglue``: LexGLUE's raw ``scotus/scotus.jsonl`` (the shipped sample). Label =
  ``int(issueArea) - 1`` (the coding of HF's ``lex_glue`` builder). Upstream = records with
  ``data_type == "train"``; edits = ``dev`` and ``test`` records, in file order. This mirrors
  grace-scotus's temporal split (older cases upstream, newer cases edited); it is our choice,
  since grace-scotus's own derivation from LexGLUE is not documented.
* ``auto`` (default): ``csv`` when both CSV files exist, else ``lexglue`` when ``scotus.jsonl``
  exists, else a ``DataError`` (the hub is used only when asked for, since it needs network).

Edits keep file order (no shuffle), as in the original.

Every record is checked where it is read, with its file and line (JSON-lines) or row (CSV, hub):
the text must be a non-empty string, the label an integer in the label set (LexGLUE: issue areas
1..14; every source: below the model's ``num_labels`` when the config gives it; the runner checks
the loaded model's own label count as well).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from btp.data.common import (
    DataError,
    Record,
    load_hub_split,
    read_jsonl,
    require_file,
    take,
    text_field,
)

log = logging.getLogger(__name__)

#: LexGLUE SCOTUS codes 14 issue areas, ``issueArea`` 1..14 (label = issueArea - 1).
LEXGLUE_ISSUE_AREAS = 14


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is one (or an integral float, or a string of digits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def check_label(label: int, where: str, num_labels: int | None, shown: Any = None) -> int:
    """``label`` when it is in ``0 .. num_labels - 1`` (or >= 0 when the count is unknown)."""
    if label < 0 or (num_labels is not None and label >= num_labels):
        allowed = f"0..{num_labels - 1}" if num_labels is not None else "labels >= 0"
        shown = repr(label) if shown is None else shown
        raise DataError(f"{where}: label {shown} is outside the label set ({allowed}); fix the "
                        "record or model.num_labels")
    return label


def _rows_to_records(rows: Any, what: str, num_labels: int | None = None) -> list[Record]:
    """``text``/``label`` columns of a ``datasets.Dataset`` to records with int labels.

    CSV row i is on data line i + 2 (1-based, after the header) unless texts hold newlines, so
    messages give the row.
    """
    missing = {"text", "label"} - set(rows.column_names)
    if missing:
        raise DataError(f"{what}: missing column(s) {sorted(missing)}; need 'text' and 'label'")
    out: list[Record] = []
    for i, (text, label) in enumerate(zip(rows["text"], rows["label"])):
        where = f"{what}, row {i}"
        value = _integer(label)
        if value is None:
            raise DataError(f"{where}: label {label!r} is not an integer")
        out.append({"text": text_field(text, where, "'text'"),
                    "label": check_label(value, where, num_labels)})
    return out


def load_scotus_csv(train_csv: Path, test_csv: Path, num_labels: int | None = None
                    ) -> tuple[list[Record], list[Record]]:
    """``(upstream, edits)`` from local grace-scotus CSV exports (columns ``text``, ``label``)."""
    import datasets

    for path in (train_csv, test_csv):
        require_file(path, "SCOTUS CSV")
    out = []
    for path in (train_csv, test_csv):
        try:
            rows = datasets.load_dataset("csv", data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - pandas/arrow parse errors have many types
            raise DataError(f"{path}: could not parse as CSV ({type(e).__name__}: {e})") from e
        out.append(_rows_to_records(rows, str(path), num_labels))
    return out[0], out[1]


def load_scotus_lexglue(path: Path, num_labels: int | None = None
                        ) -> tuple[list[Record], list[Record]]:
    """``(upstream, edits)`` from LexGLUE's raw ``scotus.jsonl`` (see the module docstring)."""
    require_file(path, "SCOTUS (LexGLUE scotus.jsonl)")
    upstream: list[Record] = []
    edits: list[Record] = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}, line {lineno}"
        try:
            text, area, split = rec["text"], rec["issueArea"], rec["data_type"]
        except KeyError as e:
            raise DataError(
                f"{where}: not a LexGLUE SCOTUS record (needs 'text', an integer 'issueArea' and "
                f"'data_type'; missing {e})"
            ) from e
        text_field(text, where, "'text'")
        number = _integer(area)
        if number is None or not 1 <= number <= LEXGLUE_ISSUE_AREAS:
            raise DataError(f"{where}: 'issueArea' {area!r} is outside LexGLUE's issue areas "
                            f"1..{LEXGLUE_ISSUE_AREAS}")
        label = check_label(number - 1, where, num_labels, f"{number - 1} (issueArea {area!r})")
        if split == "train":
            upstream.append({"text": text, "label": label})
        elif split in ("dev", "test"):
            edits.append({"text": text, "label": label})
        else:
            raise DataError(f"{path}, line {lineno}: unknown data_type {split!r}")
    return upstream, edits


def load_scotus(
    data_dir: Path, n_edits: int | None, n_upstream: int | None, get: Any,
    num_labels: int | None = None,
) -> tuple[list[Record], list[Record]]:
    """``(edits, upstream)`` for the scotus task; ``get(key, default)`` reads ``data_cfg``;
    labels must lie below ``num_labels`` when it is given."""
    source = str(get("scotus_source", "auto")).lower()
    train_csv = data_dir / "scotus" / "train.csv"
    test_csv = data_dir / "scotus" / "test.csv"
    jsonl = data_dir / get("scotus_lexglue_file", "scotus/scotus.jsonl")
    if source == "auto":
        if train_csv.is_file() and test_csv.is_file():
            source = "csv"
        elif jsonl.is_file():
            source = "lexglue"
        else:
            raise DataError(
                f"no SCOTUS data under {data_dir} (looked for {train_csv}, {test_csv}, {jsonl}); "
                "run ./download.sh, point data_dir at the shipped sample, or set "
                "data.scotus_source=hub"
            )
        log.info("SCOTUS source: %s", source)
    if source == "hub":
        hub_id = get("scotus_hub_id", "tomh/grace-scotus")
        hint = "run ./download.sh and set data.scotus_source=csv"
        upstream = _rows_to_records(load_hub_split(hub_id, "train", "SCOTUS", hint),
                                    f"{hub_id} (train)", num_labels)
        edits = _rows_to_records(load_hub_split(hub_id, "test", "SCOTUS", hint),
                                 f"{hub_id} (test)", num_labels)
    elif source == "csv":
        upstream, edits = load_scotus_csv(train_csv, test_csv, num_labels)
    elif source == "lexglue":
        upstream, edits = load_scotus_lexglue(jsonl, num_labels)
    else:
        raise DataError(f"data.scotus_source must be auto, hub, csv or lexglue, got '{source}'")
    return take(edits, n_edits, "SCOTUS edits"), take(upstream, n_upstream, "SCOTUS upstream")

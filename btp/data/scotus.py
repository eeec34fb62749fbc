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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from btp.data.common import DataError, Record, load_hub_split, read_jsonl, require_file, take

log = logging.getLogger(__name__)


def _rows_to_records(rows: Any, what: str) -> list[Record]:
    """``text``/``label`` columns of a ``datasets.Dataset`` to records with int labels."""
    missing = {"text", "label"} - set(rows.column_names)
    if missing:
        raise DataError(f"{what}: missing column(s) {sorted(missing)}; need 'text' and 'label'")
    out: list[Record] = []
    for i, (text, label) in enumerate(zip(rows["text"], rows["label"])):
        try:
            out.append({"text": str(text), "label": int(label)})
        except (TypeError, ValueError) as e:
            # CSV row i is on data line i+2 (1-based, after the header) unless texts hold newlines.
            raise DataError(f"{what}, row {i}: label {label!r} is not an integer") from e
    return out


def load_scotus_csv(train_csv: Path, test_csv: Path) -> tuple[list[Record], list[Record]]:
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
        out.append(_rows_to_records(rows, str(path)))
    return out[0], out[1]


def load_scotus_lexglue(path: Path) -> tuple[list[Record], list[Record]]:
    """``(upstream, edits)`` from LexGLUE's raw ``scotus.jsonl`` (see the module docstring)."""
    require_file(path, "SCOTUS (LexGLUE scotus.jsonl)")
    upstream: list[Record] = []
    edits: list[Record] = []
    for lineno, rec in read_jsonl(path):
        try:
            text, area, split = rec["text"], rec["issueArea"], rec["data_type"]
            label = int(area) - 1
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}, line {lineno}: not a LexGLUE SCOTUS record (needs 'text', an integer "
                f"'issueArea' and 'data_type'; got error {e!r})"
            ) from e
        if split == "train":
            upstream.append({"text": text, "label": label})
        elif split in ("dev", "test"):
            edits.append({"text": text, "label": label})
        else:
            raise DataError(f"{path}, line {lineno}: unknown data_type {split!r}")
    return upstream, edits


def load_scotus(
    data_dir: Path, n_edits: int | None, n_upstream: int | None, get: Any
) -> tuple[list[Record], list[Record]]:
    """``(edits, upstream)`` for the scotus task; ``get(key, default)`` reads ``data_cfg``."""
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
        upstream = _rows_to_records(load_hub_split(hub_id, "train", "SCOTUS", hint), hub_id)
        edits = _rows_to_records(load_hub_split(hub_id, "test", "SCOTUS", hint), hub_id)
    elif source == "csv":
        upstream, edits = load_scotus_csv(train_csv, test_csv)
    elif source == "lexglue":
        upstream, edits = load_scotus_lexglue(jsonl)
    else:
        raise DataError(f"data.scotus_source must be auto, hub, csv or lexglue, got '{source}'")
    return take(edits, n_edits, "SCOTUS edits"), take(upstream, n_upstream, "SCOTUS upstream")

"""Shared pieces of the data layer: the ``TaskData`` record, config access, file reading.

Every loader returns records of the form ``{"text": str, "label": str | int}``. Files are read
with clear errors: a missing file names the file and says how to get it; a malformed record
names the file and the line (JSON-lines) or record index (JSON arrays).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from btp.errors import DataError

log = logging.getLogger(__name__)

Record = dict[str, Any]

#: The hint every "file not found" error ends with.
GET_DATA_HINT = (
    "run ./download.sh to fetch the full data, or set data_dir to the shipped sample "
    "(the repository's data/ folder)"
)


@dataclass
class TaskData:
    """The records of one task, before tokenization.

    Attributes:
        edits: the edit stream, in stream order; each ``{"text": str, "label": str | int}``.
        upstream: records the model should keep right (retention, TRR).
        holdout: rephrasings of the edits (generality); qa, zsre and counterfact, else ``None``.
        accurate: sentences the model already gets right (ARR); hallucination only, else ``None``.
        truth: the edit prompts with their true answers (``truth``: what the model knew before
            the edit); zsre and counterfact only, else ``None``.
    """

    edits: list[Record] = field(default_factory=list)
    upstream: list[Record] = field(default_factory=list)
    holdout: list[Record] | None = None
    accurate: list[Record] | None = None
    truth: list[Record] | None = None

    def counts(self) -> dict[str, int]:
        """Number of records per part (``None`` parts count as 0), for logs and summaries."""
        return {
            "edits": len(self.edits),
            "upstream": len(self.upstream),
            "holdout": len(self.holdout or []),
            "accurate": len(self.accurate or []),
            "truth": len(self.truth or []),
        }


def resolve(data_dir: Path, name: str | Path) -> Path:
    """A data file path: absolute paths as given, relative ones under ``data_dir``."""
    path = Path(name)
    return path if path.is_absolute() else Path(data_dir) / path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise a ``DataError`` that says how to get it."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}; {GET_DATA_HINT}")
    return path


def _not_utf8(path: Path, data: bytes, e: UnicodeDecodeError, lineno: int | None = None
              ) -> DataError:
    """A one-line error for bytes that are not UTF-8: file, line and the offending byte."""
    if lineno is None:
        lineno = data[: e.start].count(b"\n") + 1
    return DataError(f"{path}, line {lineno}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                     "re-save the file as UTF-8")


def read_text(path: Path) -> str:
    """A whole text file as UTF-8; bytes that are not UTF-8 are a ``DataError`` with the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from e


def read_jsonl(path: Path) -> Iterator[tuple[int, Record]]:
    """Yield ``(line_number, object)`` for each non-empty line of a JSON-lines file.

    Raises:
        DataError: a line that is not UTF-8 or not a JSON object, with the file and 1-based line
            number.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, raw, e, lineno) from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object per line")
            yield lineno, obj


def read_json(path: Path) -> Any:
    """Load a whole JSON document; bytes that are not UTF-8 or a syntax error name the file and
    line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string"
    return f"{type(value).__name__} {value!r}"[:60]


def text_field(value: Any, where: str, name: str) -> str:
    """``value`` if it is a non-empty string, else a ``DataError`` naming ``where`` and ``name``.

    Args:
        value: the field's value in the record.
        where: ``"<file>, line N"`` or ``"<file>, record i"``.
        name: the field (``'input'``, ``'questions'[3]``, ...).
    """
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {name} must be a non-empty string, got {_describe(value)}")
    return value


def take(records: list[Record], n: int | None, what: str) -> list[Record]:
    """The first ``n`` records (all when ``n`` is None); log when the source has fewer."""
    if n is None:
        return records
    if len(records) < n:
        log.info("%s: only %d records available (asked for %d); using all", what, len(records), n)
        return records
    return records[:n]


def load_hub_split(hub_id: str, split: str, what: str, local_hint: str) -> Any:
    """``datasets.load_dataset(hub_id, split=split)``; failures become one-line ``DataError``s.

    The hub is not reachable from every machine, so the message says which local source to use.
    """
    import datasets  # imported lazily: it is slow to import and unneeded for local files

    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure means the same to the user
        raise DataError(
            f"{what}: could not load hub dataset '{hub_id}' split '{split}' "
            f"({type(e).__name__}; no network or hub unreachable); {local_hint}"
        ) from e

"""Hallucination correction (the GPT-2 XL task): WikiBio GPT-3 passages, OpenWebText upstream.

For passage ``i`` with concept ``c`` and GPT-3 sentence ``j``:
``text = "This is a Wikipedia passage about {c}." + " " + " ".join(gpt3_sentences[:j])``.
An annotation containing ``"inaccurate"`` (major or minor) gives an edit whose label is the
aligned Wikipedia sentence ``sents[:n][min(j, n - 1)]`` (``sents`` = sentence split of
``wiki_bio_text``, ``n`` = number of annotations; when the passage has fewer than ``n``
sentences the index is clamped to the last one, where the original would raise). Any other
annotation (``accurate``) gives an accurate item labelled with the GPT-3 sentence itself.

Sources (``data.hallucination_source``): ``hub`` (``potsawee/wiki_bio_gpt3_hallucination``, split
``evaluation``), ``json`` (a local export ``{"evaluation": [rows]}``, the shipped sample's form),
``auto`` (default: ``json`` when the file exists, else an error). Concepts come from
``wiki_bio_concepts.txt``, one per line aligned with the rows; a longer file is cut to the number
of rows (the shipped sample has 5 rows and the whole 238-line file).

Upstream (``data.upstream_source``): ``hub`` (``stas/openwebtext-10k`` split ``train``), ``jsonl``
(``openwebtext/openwebtext-10k.jsonl``, one ``{"text": ...}`` per line, what download.sh writes),
``txt`` (``openwebtext/*.txt``, one document per file, sorted by name: the shipped sample),
``auto`` (default: ``jsonl``, else ``txt``). Records are ``{"text": doc, "label": ""}``.

Checks (with the row index or file and line): ``gpt3_sentences`` a list of strings,
``annotation`` a list of labels from :data:`ANNOTATIONS`, ``wiki_bio_text`` a string, every file
UTF-8. Empty GPT-3 sentences, concepts and WebText documents are kept as the data set has them
and logged as a warning (they still give a well-formed prompt or perplexity record).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from btp.data.common import (
    DataError,
    Record,
    load_hub_split,
    read_json,
    read_jsonl,
    read_text,
    require_file,
    take,
)
from btp.data.sentences import get_splitter

log = logging.getLogger(__name__)

HEADER = "This is a Wikipedia passage about {concept}."
#: The label set of wiki_bio_gpt3_hallucination's ``annotation`` column.
ANNOTATIONS = ("accurate", "minor_inaccurate", "major_inaccurate")


def _check_row(row: Any, where: str) -> tuple[list[str], list[str], str]:
    """``(gpt3_sentences, annotation, wiki_bio_text)`` of a row, type-checked."""
    try:
        gpt3 = row["gpt3_sentences"]
        annotation = row["annotation"]
        wiki = row["wiki_bio_text"]
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: missing key {e}") from e
    for name, value in (("gpt3_sentences", gpt3), ("annotation", annotation)):
        if not isinstance(value, list):
            raise DataError(f"{where}: '{name}' must be a list, got {type(value).__name__}")
    for j, sentence in enumerate(gpt3):
        if not isinstance(sentence, str):
            raise DataError(f"{where}: 'gpt3_sentences'[{j}] must be a string, got "
                            f"{type(sentence).__name__}")
        if not sentence.strip():
            log.warning("%s: 'gpt3_sentences'[%d] is empty", where, j)
    for j, ann in enumerate(annotation):
        if ann not in ANNOTATIONS:
            raise DataError(f"{where}: 'annotation'[{j}] is {ann!r}, not one of "
                            f"{', '.join(ANNOTATIONS)}")
    if not isinstance(wiki, str):
        raise DataError(f"{where}: 'wiki_bio_text' must be a string, got {type(wiki).__name__}")
    return gpt3, annotation, wiki


def split_passages(
    rows: list[dict[str, Any]],
    concepts: list[str],
    splitter: Callable[[str], list[str]],
    where: str = "hallucination data",
) -> tuple[list[Record], list[Record]]:
    """``(edits, accurate)`` from WikiBio GPT-3 rows and their concepts, in file order.

    Raises:
        DataError: a row without ``gpt3_sentences``/``annotation``/``wiki_bio_text``, with values
            of the wrong type or an annotation outside :data:`ANNOTATIONS`, or with different
            numbers of sentences and annotations.
    """
    edits: list[Record] = []
    accurate: list[Record] = []
    for i, (row, concept) in enumerate(zip(rows, concepts)):
        gpt3, annotation, wiki = _check_row(row, f"{where}, row {i}")
        if len(gpt3) != len(annotation):
            raise DataError(
                f"{where}, row {i}: {len(gpt3)} gpt3_sentences but {len(annotation)} annotations"
            )
        n = len(annotation)
        wiki_sents = splitter(wiki)[:n]
        header = HEADER.format(concept=concept)
        for j, ann in enumerate(annotation):
            text = f"{header} {' '.join(gpt3[:j])}"
            if ann != "accurate":
                if not wiki_sents:
                    raise DataError(f"{where}, row {i}: empty wiki_bio_text")
                label = wiki_sents[min(j, n - 1, len(wiki_sents) - 1)]
                edits.append({"text": text, "label": label})
            else:
                accurate.append({"text": text, "label": gpt3[j]})
    return edits, accurate


def read_concepts(path: Path, n_rows: int) -> list[str]:
    """The first ``n_rows`` concepts of ``wiki_bio_concepts.txt`` (one per line).

    Raises:
        DataError: fewer lines than rows (the original regenerates the file from the hub's
            ``wiki_bio``, which we cannot).
    """
    require_file(path, "wiki_bio concepts")
    concepts = read_text(path).splitlines()
    if len(concepts) < n_rows:
        raise DataError(
            f"{path}: {len(concepts)} concepts for {n_rows} passages; the file must have one "
            "line per passage (run ./download.sh)"
        )
    if len(concepts) > n_rows:
        log.info("%s: using the first %d of %d concepts", path, n_rows, len(concepts))
    for lineno, concept in enumerate(concepts[:n_rows], start=1):
        if not concept.strip():
            log.warning("%s, line %d: empty concept", path, lineno)
    return concepts[:n_rows]


def _load_rows(data_dir: Path, get: Any) -> tuple[list[dict[str, Any]], str]:
    """The WikiBio GPT-3 rows and where they came from (for messages)."""
    source = str(get("hallucination_source", "auto")).lower()
    path = data_dir / get("hallucination_file", "hallucination/wikibio_gpt3_hallucination.json")
    if source == "auto":
        source = "json"
    if source == "hub":
        hub_id = get("hallucination_hub_id", "potsawee/wiki_bio_gpt3_hallucination")
        ds = load_hub_split(
            hub_id, "evaluation", "hallucination", "run ./download.sh and set "
            "data.hallucination_source=json"
        )
        return ds.to_list(), f"{hub_id} (evaluation)"
    if source != "json":
        raise DataError(f"data.hallucination_source must be auto, hub or json, got '{source}'")
    data = read_json(require_file(path, "WikiBio GPT-3 hallucination"))
    if not isinstance(data, dict) or not isinstance(data.get("evaluation"), list):
        raise DataError(f"{path}: expected {{\"evaluation\": [rows]}} (the HF split as JSON)")
    return data["evaluation"], f"{path} 'evaluation'"


def load_upstream_webtext(data_dir: Path, n_upstream: int | None, get: Any) -> list[Record]:
    """OpenWebText upstream records ``{"text": doc, "label": ""}`` (see the module docstring)."""
    source = str(get("upstream_source", "auto")).lower()
    folder = data_dir / get("openwebtext_dir", "openwebtext")
    jsonl = folder / "openwebtext-10k.jsonl"
    if source == "auto":
        if jsonl.is_file():
            source = "jsonl"
        elif folder.is_dir() and any(folder.glob("*.txt")):
            source = "txt"
        else:
            raise DataError(
                f"no OpenWebText upstream under {folder} (openwebtext-10k.jsonl or *.txt); run "
                "./download.sh, point data_dir at the shipped sample, or set "
                "data.upstream_source=hub"
            )
    if source == "hub":
        hub_id = get("upstream_hub_id", "stas/openwebtext-10k")
        ds = load_hub_split(hub_id, "train", "upstream", "run ./download.sh and set "
                            "data.upstream_source=jsonl")
        if n_upstream is not None:
            ds = ds.select(range(min(n_upstream, len(ds))))
        docs = list(ds["text"])
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise DataError(f"{hub_id} (train), row {i}: 'text' must be a string, got "
                                f"{type(doc).__name__}")
    elif source == "jsonl":
        require_file(jsonl, "OpenWebText")
        docs = []
        for lineno, rec in read_jsonl(jsonl):
            if not isinstance(rec.get("text"), str):
                raise DataError(f"{jsonl}, line {lineno}: needs a string 'text'")
            docs.append(rec["text"])
            if n_upstream is not None and len(docs) >= n_upstream:
                break
    elif source == "txt":
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise DataError(f"no *.txt documents in {folder}; run ./download.sh")
        docs = [read_text(p) for p in files[: n_upstream or None]]
    else:
        raise DataError(f"data.upstream_source must be auto, hub, jsonl or txt, got '{source}'")
    empty = sum(1 for d in docs if not d.strip())
    if empty:
        log.warning("OpenWebText (%s): %d empty document(s) among %d", source, empty, len(docs))
    return take([{"text": d, "label": ""} for d in docs], n_upstream, f"OpenWebText ({source})")


def load_hallucination(
    data_dir: Path, n_edits: int | None, n_upstream: int | None, get: Any
) -> tuple[list[Record], list[Record], list[Record]]:
    """``(edits, accurate, upstream)`` for the hallucination task."""
    rows, where = _load_rows(data_dir, get)
    concepts = read_concepts(
        data_dir / get("concepts_file", "hallucination/wiki_bio_concepts.txt"), len(rows)
    )
    splitter = get_splitter(str(get("sentence_splitter", "auto")))
    edits, accurate = split_passages(rows, concepts, splitter, where)
    upstream = load_upstream_webtext(data_dir, n_upstream, get)
    return take(edits, n_edits, "hallucination edits"), accurate, upstream

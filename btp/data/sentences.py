"""Sentence splitting for the hallucination labels (the aligned Wikipedia sentence).

The original uses ``nltk.sent_tokenize`` (trained Punkt). Punkt's model data cannot be downloaded
here, so ``data.sentence_splitter`` chooses:

* ``nltk``: ``nltk.sent_tokenize``; a ``DataError`` when the ``punkt_tab``/``punkt`` data is not
  installed (``python -m nltk.downloader punkt_tab`` on a machine with network).
* ``regex``: :func:`regex_split`, a rule-based splitter. It splits after ``.``, ``!`` or ``?``
  (plus closing quotes/brackets) followed by white space and an upper-case letter, digit, quote or
  opening bracket, except after a known abbreviation (``Dr.``, ``St.``, ``ca.``, ...) or a single
  initial (``W.``). It agrees with Punkt on ordinary encyclopedic prose but is not identical
  (Punkt also learns abbreviations and handles more cases); a listed deviation when used.
* ``auto`` (default): ``nltk`` when its data is present, else ``regex`` (logged once).
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from btp.errors import DataError

log = logging.getLogger(__name__)

#: Lower-case abbreviations (without the final dot) after which a period does not end a sentence.
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt ft rev hon gen col lt sgt capt cmdr adm gov sen rep pres
    ca c approx vs etc e.g i.e cf al no nos vol pp fig inc ltd co corp bros dept univ assn
    jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k u.n d.c""".split()
)

_BOUNDARY = re.compile(r"([.!?][\"')\]\u201d\u2019]*)\s+(?=[\"'(\[\u201c\u2018]?[A-Z0-9])")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")


def regex_split(text: str) -> list[str]:
    """Split ``text`` into sentences with the rules in the module docstring (no data needed)."""
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1).startswith("."):
            words = text[start : m.start(1)].split()
            word = words[-1].lstrip("\"'([") if words else ""
            # "Dr." / "ca." / "W." / "U.S." do not end a sentence.
            if word.lower() in ABBREVIATIONS or _INITIALS.fullmatch(word):
                continue
        sentence = text[start : m.end(1)].strip()
        if sentence:
            sentences.append(sentence)
        start = m.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def _nltk_available() -> bool:
    import nltk

    for resource in ("tokenizers/punkt_tab", "tokenizers/punkt"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def get_splitter(name: str) -> Callable[[str], list[str]]:
    """The sentence splitter called ``name`` (``auto``, ``nltk`` or ``regex``).

    Raises:
        DataError: ``nltk`` without its Punkt data, or an unknown name.
    """
    name = name.lower()
    if name == "regex":
        return regex_split
    if name in ("nltk", "auto"):
        if _nltk_available():
            import nltk

            return nltk.sent_tokenize
        if name == "nltk":
            raise DataError(
                "data.sentence_splitter=nltk but nltk's Punkt data is not installed; run "
                "'python -m nltk.downloader punkt_tab' where there is network, or use "
                "data.sentence_splitter=regex"
            )
        log.warning("nltk Punkt data not found: using the regex sentence splitter (a deviation)")
        return regex_split
    raise DataError(f"data.sentence_splitter must be auto, nltk or regex, got '{name}'")

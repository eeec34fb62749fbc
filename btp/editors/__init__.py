"""The editing algorithms. Importing this package registers every editor in ``EDITORS``.

``alg.name`` selects one: ``melo`` (MELO), ``grace``, ``ft``, ``ft_ewc``, ``plain_lora``,
``wise``, ``memit``, ``alphaedit``. An unknown ``alg.name`` fails validation with the list of
registered names.
"""

from __future__ import annotations

import importlib

from btp.editors.base import EDITORS, EditOutcome, Editor, register_editor

_MODULES = ("melo", "grace", "ft", "ewc", "plain_lora", "wise", "memit", "alphaedit")

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["EDITORS", "EditOutcome", "Editor", "register_editor"]

"""The editing algorithms. Importing this package registers every editor in ``EDITORS``.

``alg.name`` selects one: ``melo`` (MELO), ``grace``, ``ft``, ``ft_ewc``, ``plain_lora``,
``wise``, ``memit``, ``alphaedit``.
A baseline module that is not present yet is skipped (its name then fails validation with the
list of registered names); any other import error is raised, so a broken editor is never hidden.
"""

from __future__ import annotations

import importlib

from btp.editors.base import EDITORS, EditOutcome, Editor, register_editor

_MODULES = ("melo", "grace", "ft", "ewc", "plain_lora", "wise", "memit", "alphaedit")

for _name in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # only "this module file does not exist" is tolerated
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = ["EDITORS", "EditOutcome", "Editor", "register_editor"]

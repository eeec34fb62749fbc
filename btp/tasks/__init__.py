"""The task registry: one module per task, each defining a :class:`TaskSpec` named ``SPEC``.

Everything the runner, the editing loop and the reports know about a task is read from here:
the model kinds it runs on, its loader, how its records are collated, its evaluator, its extra
evaluation sets and their metric names, its headline metric and direction, and the summary keys
the report requires.

Adding a task: write ``btp/tasks/<name>.py`` (a loader and ``SPEC``), add its name to
:data:`TASK_MODULES`, add ``config/experiment/<name>.yaml`` (``task: <name>``) and
``config/values/experiment/<name>.yaml`` (the values that differ from the schema's defaults), and
tests (README, "Extending").
"""

from __future__ import annotations

import importlib

from btp.errors import ConfigError
from btp.tasks.base import COLLATE_KINDS, EvalSet, LoadArgs, TaskSpec

#: The task modules, in the order tasks are listed to users.
TASK_MODULES: tuple[str, ...] = ("qa", "scotus", "hallucination", "zsre", "counterfact")


def _collect() -> dict[str, TaskSpec]:
    specs: dict[str, TaskSpec] = {}
    for module_name in TASK_MODULES:
        spec = importlib.import_module(f"{__name__}.{module_name}").SPEC
        if spec.name != module_name:
            raise ValueError(f"btp/tasks/{module_name}.py defines task '{spec.name}'; a task "
                             "module is named after its task")
        specs[spec.name] = spec
    return specs


#: Every registered task by name, in :data:`TASK_MODULES` order.
TASKS: dict[str, TaskSpec] = _collect()
_BY_ALIAS: dict[str, str] = {alias: s.name for s in TASKS.values() for alias in s.aliases}


def task_names() -> tuple[str, ...]:
    """The registered task names, in listing order."""
    return tuple(TASKS)


def names_phrase(names: tuple[str, ...] | list[str] | None = None) -> str:
    """``a, b or c``: task names for a message (default: every registered task)."""
    names = list(task_names() if names is None else names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def fact_tasks() -> tuple[str, ...]:
    """The tasks that edit facts (``prompt -> target`` on a causal LM; ``collate == "facts"``):
    what the fact editors (WISE, MEMIT, AlphaEdit) need."""
    return tuple(name for name, spec in TASKS.items() if spec.collate == "facts")


def get_task(name: object) -> TaskSpec:
    """The spec of ``name`` (a task name, one of its aliases, or the schema's enum value).

    Raises:
        ConfigError: no registered task has that name.
    """
    key = str(name)
    key = _BY_ALIAS.get(key, key)
    if key not in TASKS:
        raise ConfigError(f"unknown task '{key}'; expected one of {', '.join(TASKS)}")
    return TASKS[key]


def find_task(name: object) -> TaskSpec | None:
    """The spec of ``name``, or ``None`` for a name no task has (e.g. in an old run's summary)."""
    key = str(name)
    return TASKS.get(_BY_ALIAS.get(key, key))


__all__ = ["TaskSpec", "EvalSet", "LoadArgs", "COLLATE_KINDS", "TASKS", "TASK_MODULES",
           "get_task", "find_task", "task_names", "names_phrase", "fact_tasks"]

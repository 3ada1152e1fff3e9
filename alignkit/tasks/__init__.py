"""Classical task heads on the shared (optionally 4-bit) backbone. Each module owns only its preprocessing,
collation, metrics, post-processing and its own recipe keys (``Task.Arguments``); ``recipes/task.py`` runs any of
them through the one loader and run loop. A new task is a module here (its ``Task`` subclass registers itself) plus
its head's row in alignkit.models.heads."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from alignkit.errors import ConfigError, suggest
from alignkit.models.heads import get_head
from alignkit.tasks.base import Task

for _module in pkgutil.iter_modules(__path__):  # every task module registers its Task subclass on import
    importlib.import_module(f"{__name__}.{_module.name}")

TASKS: dict[str, type[Task]] = dict(sorted(Task.REGISTRY.items()))
# Every head's own key groups (``Task.Arguments``), each once: the task recipe's parser reads all of them (a key of
# another head is refused by name), and its key reference lists all of them.
HEAD_GROUPS: tuple[type, ...] = tuple(dict.fromkeys(t.Arguments for t in TASKS.values() if t.Arguments))


def recipe_parser(stage):
    """The parser of ``stage``'s recipe (an :class:`alignkit.stages.Stage`), as its recipe reads it: the stage
    whose head the recipe's ``task:`` picks (``head=None``, the task stage) also reads every head's keys
    (:data:`HEAD_GROUPS`)."""
    return stage.parser(HEAD_GROUPS if stage.head is None else ())


def key_reference() -> dict[str, list[dict]]:
    """Every stage's recipe keys (alignkit.config.keyref rows), from the live dataclasses of the parser each recipe
    reads (:func:`recipe_parser`), the task heads' keys included: what ``keys.json`` and docs/keys.md hold
    (``python scripts/write_key_reference.py``), so ``alignkit <stage> --help-all`` and ``alignkit init`` list
    every key ``python recipes/<stage>.py --help-all`` does. Lives here, not in alignkit.stages, because the heads'
    key groups are defined in this layer."""
    from alignkit.config.keyref import key_rows
    from alignkit.stages import STAGES

    return {s.name: key_rows(recipe_parser(s).dataclass_types, s.name) for s in STAGES.values()}


def parse_task_recipe(argv: list[str] | None = None):
    """Parse a task recipe: the shared groups, ``TaskConfig``, ``TaskArguments`` (``task``) and the chosen task's own
    keys (``recipe.group(TASKS[task].Arguments)``). A key of another task is refused, naming that task."""
    from alignkit.config import build_recipe
    from alignkit.stages import STAGES

    stage = STAGES["task"]
    values, print_config = recipe_parser(stage).read(argv)
    name = values.get("task")
    if name not in TASKS:
        hint = suggest(str(name), TASKS) if name else ""
        raise ConfigError(
            f"task: {'required' if not name else repr(name) + ' is not a task'}.{hint} Fix: set task to one of "
            f"{sorted(TASKS)} (the other stages have recipes of their own: "
            f"{', '.join(f'recipes/{n}.py' for n in STAGES if n != stage.name)})."
        )
    task = TASKS[name]
    get_head(name)  # every task trains a head of the loader's table
    own = {f.name for f in dataclasses.fields(task.Arguments)} if task.Arguments else set()
    for key in values:
        others = [
            t
            for t, cls in TASKS.items()
            if cls.Arguments and key in {f.name for f in dataclasses.fields(cls.Arguments)}
        ]
        if others and key not in own:
            raise ConfigError(
                f"{key}: a key of task {' / '.join(others)}, not of task {name}. Fix: remove it, or set task: {others[0]}."
            )
    recipe = build_recipe(stage.parser((task.Arguments,) if task.Arguments else ()), values, print_config)
    task.configure(recipe)
    return recipe


def task_of(recipe) -> type[Task]:
    """The Task class the recipe's ``task:`` key names (its ``name`` is the head the run trains)."""
    from alignkit.config import TaskArguments

    return TASKS[recipe.group(TaskArguments).task]


def build_task(recipe, tokenizer) -> Task:
    """The task module for the recipe's ``task:`` key, checked against the tokenizer."""
    cls = task_of(recipe)
    task = cls(recipe.group(cls.Arguments) if cls.Arguments else None, tokenizer, recipe.train)
    task.max_truncated_fraction = recipe.run.max_truncated_fraction
    return task


__all__ = [
    "HEAD_GROUPS",
    "TASKS",
    "Task",
    "build_task",
    "key_reference",
    "parse_task_recipe",
    "recipe_parser",
    "task_of",
]

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


def parse_task_recipe(argv: list[str] | None = None):
    """Parse a task recipe: the shared groups, ``TaskConfig``, ``TaskArguments`` (``task``) and the chosen task's own
    keys (``recipe.group(TASKS[task].Arguments)``). A key of another task is refused, naming that task."""
    from alignkit.config import build_recipe
    from alignkit.stages import STAGES

    stage = STAGES["task"]
    every = tuple(dict.fromkeys(t.Arguments for t in TASKS.values() if t.Arguments))
    values, print_config = stage.parser(every).read(argv)
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


__all__ = ["TASKS", "Task", "build_task", "parse_task_recipe", "task_of"]

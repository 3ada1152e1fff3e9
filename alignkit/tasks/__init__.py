"""Classical task heads on the shared (optionally 4-bit) backbone. Each module owns only its preprocessing,
collation, metrics and post-processing; ``recipes/task.py`` runs any of them through the one loader and run loop."""

from __future__ import annotations

from alignkit.errors import ConfigError
from alignkit.tasks.base import Task, TaskDataArguments
from alignkit.tasks.classification import SequenceClassification
from alignkit.tasks.mlm import MaskedLM
from alignkit.tasks.qa import QuestionAnswering
from alignkit.tasks.seq2seq import Seq2Seq
from alignkit.tasks.token_classification import TokenClassification

TASK_MODULES: dict[str, type[Task]] = {
    cls.name: cls for cls in (TokenClassification, SequenceClassification, QuestionAnswering, MaskedLM, Seq2Seq)
}


def parse_task_recipe(argv: list[str] | None = None):
    """Parse a task recipe: the shared groups, ``TaskConfig``, and ``TaskDataArguments`` as ``recipe.extra[0]``."""
    from alignkit.config import TaskConfig, parse_recipe

    recipe = parse_recipe(TaskConfig, argv, extra=(TaskDataArguments,))
    if recipe.run.task not in TASK_MODULES:
        raise ConfigError(
            f"task: recipes/task.py runs {sorted(TASK_MODULES)}, not '{recipe.run.task}'. Fix: set task to one of them "
            "(causal-LM training runs in recipes/cpt.py and recipes/sft.py)."
        )
    return recipe


def build_task(recipe, tokenizer) -> Task:
    """The task module for the recipe's ``task:`` key, checked against the tokenizer."""
    return TASK_MODULES[recipe.run.task](recipe.extra[0], tokenizer, recipe.train)


__all__ = ["TASK_MODULES", "Task", "TaskDataArguments", "build_task", "parse_task_recipe"]

"""The recipe bodies of the on-policy stages, whose policy samples its own completions of the prompts.

- :func:`reward_main` (GRPO, RLOO, online DPO): a chat tokenizer, prompt rows checked by the stage's schema, the
  reward functions built and checked on the first rows **before the model loads**, a causal LM on the shared loader,
  the stage's trl trainer with ``reward_funcs``, the run loop.
- :func:`distill_main` (distill): the same, with a teacher instead of rewards: its tokenizer is checked against the
  student's before any weights load (:mod:`alignkit.models.teacher`), then it loads frozen beside the student.
"""

from __future__ import annotations

from alignkit.train.runner import Run


def reward_main(stage, argv=None):
    """Parse ``argv`` for ``stage`` (a row of :data:`alignkit.stages.STAGES` whose trainer takes ``reward_funcs``),
    train, and return the final metrics. A reward that fails on the first rows is a ConfigError/DataError before
    any model is loaded."""
    from alignkit.config import RewardFunctionArguments
    from alignkit.train.rewards import build_reward_functions

    recipe = stage.parse(argv)
    with Run(recipe, stage=stage.name) as run:
        tokenizer = run.load_tokenizer(chat=True)
        data = run.load_data(stage.data_schema)
        rewards = build_reward_functions(recipe.group(RewardFunctionArguments), data["train"], tokenizer)
        run.load_model()
        return run.train(run.build_trainer(stage.trainer_class, data, reward_funcs=rewards))


def distill_main(stage, argv=None):
    """Parse ``argv`` for the distill ``stage``, train the student against the recipe's
    ``teacher_model_name_or_path`` and return the final metrics. A teacher with another vocabulary, or not a causal
    LM, is a ConfigError before any weights load."""
    from alignkit.models.teacher import check_same_vocabulary, check_teacher, load_teacher

    recipe = stage.parse(argv)
    name = recipe.train.teacher_model_name_or_path
    with Run(recipe, stage=stage.name) as run:
        check_teacher(name, run.load_tokenizer(chat=True))
        data = run.load_data(stage.data_schema)
        teacher = load_teacher(name)
        check_same_vocabulary(teacher, run.load_model(), name)
        return run.train(run.build_trainer(stage.trainer_class, data, teacher_model=teacher))

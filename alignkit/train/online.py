"""The one recipe body of the online RL stages (GRPO, RLOO): a chat tokenizer, prompt rows checked by the stage's
schema, the reward functions built and checked on the first rows **before the model loads**, a causal LM on the
shared loader, the stage's trl trainer with ``reward_funcs``, the run loop.
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

"""GRPO: group relative policy optimisation (arXiv:2402.03300) with trl's GRPOTrainer, the adapter on the (4-bit)
backbone, completions from ``model.generate`` (vLLM options pass through to trl where a GPU has vLLM).

    accelerate launch recipes/grpo.py --config recipes/tiny/grpo.yaml [--key value ...]      (or: alignkit grpo ...)

Data: a ``prompt`` (text, or chat messages ending on the user) and the columns the rewards read (``answer`` for the
built-in ``exact`` and ``numeric``). ``reward_funcs`` names the rewards (alignkit.train.rewards): built-in
verifiable ones, a reward stage's output folder, or your ``module:function``; each is checked on the first rows
before training. ``num_generations`` completions per prompt are scored against each other.
"""

from alignkit.config import RewardFunctionArguments
from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train import Run
from alignkit.train.rewards import build_reward_functions

STAGE = STAGES["grpo"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    with Run(recipe, stage=STAGE.name) as run:
        tokenizer = run.load_tokenizer(chat=True)
        data = run.load_data(STAGE.data_schema)
        # the rewards are checked on the first rows before the model loads
        rewards = build_reward_functions(recipe.group(RewardFunctionArguments), data["train"], tokenizer)
        run.load_model()
        return run.train(run.build_trainer(STAGE.trainer_class, data, reward_funcs=rewards))


if __name__ == "__main__":
    run_cli(main)

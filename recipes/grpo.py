"""GRPO: group relative policy optimisation (arXiv:2402.03300) with trl's GRPOTrainer, the adapter on the (4-bit)
backbone, completions from ``model.generate`` (vLLM options pass through to trl where a GPU has vLLM).

    accelerate launch recipes/grpo.py --config recipes/tiny/grpo.yaml [--key value ...]      (or: alignkit grpo ...)

Data: a ``prompt`` (text, or chat messages ending on the user) and the columns the rewards read (``answer`` for the
built-in ``exact`` and ``numeric``). ``reward_funcs`` names the rewards (alignkit.train.rewards): built-in
verifiable ones, a reward stage's output folder, or your ``module:function``; each is checked on the first rows
before training. ``num_generations`` completions per prompt are scored against each other.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.online import reward_main

STAGE = STAGES["grpo"]


def main(argv=None):
    return reward_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""RLOO: REINFORCE leave-one-out (arXiv:2402.14740) with trl's RLOOTrainer, the adapter on the (4-bit) backbone,
completions from ``model.generate``; each completion's advantage is its reward minus the mean of its group's others.

    accelerate launch recipes/rloo.py --config recipes/tiny/rloo.yaml      [--key value ...]      (or: alignkit rloo ...)

Data and rewards are GRPO's: a ``prompt`` (text, or chat messages ending on the user) and the columns the rewards
read; ``reward_funcs`` names built-in verifiable rewards, a reward stage's output folder, or your
``module:function``, each checked on the first rows before the model loads. ``beta`` > 0 (trl's default 0.05) adds a
KL term against the starting adapter.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.online import reward_main

STAGE = STAGES["rloo"]


def main(argv=None):
    return reward_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""Online DPO (arXiv:2402.04792) with trl's (experimental) OnlineDPOTrainer, the adapter on the (4-bit) backbone:
each step the policy samples two completions per prompt, the rewards pick the chosen one, DPO's loss trains the pair.

    accelerate launch recipes/online_dpo.py --config recipes/tiny/online_dpo.yaml   [--key value ...]  (or: alignkit online_dpo ...)

Data and rewards are GRPO's: a ``prompt`` (text, or chat messages ending on the user) and the columns the rewards
read; ``reward_funcs`` names a reward stage's output folder (the judge), built-in verifiable rewards or your
``module:function``, each checked on the first rows before the model loads. The reference is the starting model (a
frozen copy trl makes). trl's trainer has no evaluation loop: score the output with ``alignkit eval``.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.online import reward_main

STAGE = STAGES["online_dpo"]


def main(argv=None):
    return reward_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

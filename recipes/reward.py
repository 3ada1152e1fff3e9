"""Reward modeling: a Bradley-Terry reward model (arXiv:2203.02155) with trl's RewardTrainer, on the same (4-bit)
backbone loader as every stage: a one-output sequence-classification head trained in full next to the LoRA adapter.

    accelerate launch recipes/reward.py --config recipes/tiny/reward.yaml [--key value ...]  (or: alignkit reward ...)

Data: DPO pairs (``prompt`` / ``chosen`` / ``rejected``, or a published pair format); held-out pairs give
``eval_accuracy`` (the share of pairs where chosen scores higher) and ``eval_margin``. The output loads as a scorer,
:class:`alignkit.export.reward_model.RewardModel`, and as a GRPO reward (name its folder in ``reward_funcs``).
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train import Run

STAGE = STAGES["reward"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    with Run(recipe, stage=STAGE.name) as run:
        run.load_tokenizer(chat=True)
        data = run.load_data(STAGE.data_schema)
        run.load_model(num_labels=1)  # one scalar score per sequence
        return run.train(run.build_trainer(STAGE.trainer_class, data))


if __name__ == "__main__":
    run_cli(main)

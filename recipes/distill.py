"""Distillation (on-policy, arXiv:2306.13649) with trl's DistillationTrainer: the student (the recipe's model, 4-bit +
LoRA) samples completions of the prompts and learns the teacher's next-token distribution on every completion token.

    accelerate launch recipes/distill.py --config recipes/tiny/distill.yaml      [--key value ...]  (or: alignkit distill ...)

Data: a ``prompt`` per row (text, or chat messages ending on the user). ``teacher_model_name_or_path``: a merged
alignkit run, a model folder or a model name, with the student's tokenizer (checked before any weights load); it
loads frozen in full precision. ``beta``: 0 forward KL, 1 reverse KL (trl's default), 0.5 Jensen-Shannon.
Held-out prompts (``test_size``) give ``eval_loss``: the divergence on the student's own completions.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.online import distill_main

STAGE = STAGES["distill"]


def main(argv=None):
    return distill_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""KTO: Kahneman-Tversky Optimization (arXiv:2402.01306) with trl's KTOTrainer on a LoRA / 4-bit QLoRA backbone.

    accelerate launch recipes/kto.py --config recipes/tiny/kto.yaml [--key value ...]      (or: alignkit kto ...)

Data: unpaired ``prompt`` / ``completion`` / boolean ``label`` rows (format ``kto``), or DPO-style pairs, which are
unpaired (the chosen reply becomes a desirable row, the rejected one an undesirable row; alignkit.data.formats).
``beta``, ``desirable_weight`` and ``undesirable_weight`` are trl's KTOConfig fields.

The reference is the model KTO starts from: trl keeps the starting adapter's frozen copy (``ref``), as in DPO,
never a second model. ``per_device_train_batch_size`` must be at least 2 (KTO's KL estimate pairs rows in a batch).
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.preference import preference_main

STAGE = STAGES["kto"]


def main(argv=None):
    return preference_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""DPO: preference tuning with trl's DPOTrainer on a LoRA / 4-bit QLoRA backbone, usually starting from SFT output.

    accelerate launch recipes/dpo.py --config recipes/tiny/dpo.yaml [--key value ...]      (or: alignkit dpo ...)

Data: ``prompt`` / ``chosen`` / ``rejected`` columns, plain text or conversational (the chat template comes from the
SFT output's tokenizer). ``beta`` and ``loss_type`` (sigmoid, ipo, hinge, ...) are trl's DPOConfig fields.

The reference policy is the model DPO starts from (the SFT model after a hand-off), computed from the same backbone,
never a second model: trl keeps the adapter's initial state as a frozen adapter ``ref`` (saved under ``ref/`` next
to the trained adapter). ``adapter_handoff`` (continue | reference | merge) chooses what is trained; see
:func:`alignkit.models.loader.load_model`.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.preference import preference_main

STAGE = STAGES["dpo"]


def main(argv=None):
    return preference_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""ORPO: odds-ratio preference optimisation (arXiv:2403.07691) with trl's (experimental) ORPOTrainer: SFT on the chosen
reply and a preference term in one reference-free loss, so one stage can replace SFT + DPO.

    accelerate launch recipes/orpo.py --config recipes/tiny/orpo.yaml [--key value ...]      (or: alignkit orpo ...)

Data: DPO pairs (``prompt`` / ``chosen`` / ``rejected``, or a published pair format). ``beta`` is the paper's lambda.
Starts from a base model (a fresh adapter) or from an earlier stage's adapter (``adapter_handoff``). No reference
model: nothing is frozen or scored twice.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.preference import preference_main

STAGE = STAGES["orpo"]


def main(argv=None):
    return preference_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

"""SimPO: simple preference optimisation (arXiv:2405.14734) with trl's (experimental) CPOTrainer, ``loss_type: simpo``:
the length-normalised log-probability is the implicit reward, with a target margin ``simpo_gamma``; reference-free.

    accelerate launch recipes/simpo.py --config recipes/tiny/simpo.yaml [--key value ...]    (or: alignkit simpo ...)

Data: DPO pairs (``prompt`` / ``chosen`` / ``rejected``, or a published pair format). ``beta`` (default 2.0, as the
paper) scales the reward; ``cpo_alpha`` > 0 adds CPO's SFT term on the chosen replies. Starts from a base model or
an earlier stage's adapter (``adapter_handoff``), usually SFT.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train.preference import preference_main

STAGE = STAGES["simpo"]


def main(argv=None):
    return preference_main(STAGE, argv)


if __name__ == "__main__":
    run_cli(main)

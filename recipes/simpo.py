"""SimPO: simple preference optimisation (arXiv:2405.14734) with trl's (experimental) CPOTrainer, ``loss_type: simpo``:
the length-normalised log-probability is the implicit reward, with a target margin ``simpo_gamma``; reference-free.

    accelerate launch recipes/simpo.py --config recipes/tiny/simpo.yaml [--key value ...]    (or: alignkit simpo ...)

Data: DPO pairs (``prompt`` / ``chosen`` / ``rejected``, or a published pair format). ``beta`` (default 2.0, as the
paper) scales the reward; ``cpo_alpha`` > 0 adds CPO's SFT term on the chosen replies. Starts from a base model or
an earlier stage's adapter (``adapter_handoff``), usually SFT.
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train import Run

STAGE = STAGES["simpo"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    with Run(recipe, stage=STAGE.name) as run:
        run.load_tokenizer(chat=True)
        data = run.load_data(STAGE.data_schema)
        run.load_model("causal_lm")
        return run.train(run.build_trainer(STAGE.trainer_class, data))


if __name__ == "__main__":
    run_cli(main)

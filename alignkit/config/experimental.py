"""The stage configs whose trl bases live in ``trl.experimental`` (trl 1.16: ORPO, CPO/SimPO, online DPO). Importing them
imports transformers' integrations (which print a line when ``WANDB_MODE=offline``), so ``alignkit.config`` loads
this module only when a stage asks for one of these classes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # alignkit names the experimental trainers it uses

from trl.experimental.cpo import CPOConfig as _TrlCPOConfig  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig as _TrlOnlineDPOConfig  # noqa: E402
from trl.experimental.orpo import ORPOConfig as _TrlORPOConfig  # noqa: E402

from alignkit.config.trainers import _LanguageModelSpeed, _StageDefaults  # noqa: E402


@dataclass
class ORPOConfig(_StageDefaults, _LanguageModelSpeed, _TrlORPOConfig):
    """trl's (experimental) ORPOConfig: odds-ratio preference optimisation (Hong et al. 2024, arXiv:2403.07691), SFT
    and preference in one reference-free loss. ``beta`` is the paper's lambda, the odds-ratio term's weight."""


@dataclass
class SimPOConfig(_StageDefaults, _LanguageModelSpeed, _TrlCPOConfig):
    """SimPO (Meng et al. 2024, arXiv:2405.14734): trl's (experimental) CPOConfig with ``loss_type: simpo``, the
    length-normalised log-probability as the implicit reward and a target margin ``simpo_gamma``; reference-free.
    ``cpo_alpha`` > 0 adds CPO's SFT term on the chosen replies (CPO-SimPO); 0 is the paper's SimPO."""

    loss_type: str = field(
        default="simpo",
        metadata={"help": "simpo (the paper's), or trl CPO's sigmoid | hinge | ipo | alphapo.",
                  "choices": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"]},
    )  # fmt: skip
    beta: float = field(default=2.0, metadata={"help": "Reward scale (the paper uses 2.0-2.5; trl's CPO 0.1)."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of the SFT term on chosen (0: pure SimPO)."})


@dataclass
class OnlineDPOConfig(_StageDefaults, _LanguageModelSpeed, _TrlOnlineDPOConfig):
    """trl's (experimental) OnlineDPOConfig: online DPO from AI feedback (Guo et al. 2024, arXiv:2402.04792). Each
    step the policy samples two completions per prompt (``max_new_tokens``, ``temperature``), the rewards
    (``reward_funcs``: a reward stage's output folder, built-ins or ``module:function``, checked on the first rows
    before the model loads) pick the chosen one, and the pair trains with DPO's loss (``loss_type`` sigmoid | ipo,
    temperature ``beta``) against the starting model. trl 1.16's trainer has no evaluation loop: score the output
    with ``alignkit eval`` instead (a test split is refused)."""

    learning_rate: float = field(
        default=1e-5, metadata={"help": "AdamW learning rate (trl's online DPO default: 5e-7)."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO temperature: higher keeps the policy closer to the starting model (IPO: its tau)."},
    )

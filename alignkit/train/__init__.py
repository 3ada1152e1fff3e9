"""The one run loop: seed, preflight, resume, train, eval, save, card."""

from alignkit.train.online import distill_main, reward_main
from alignkit.train.preference import preference_main
from alignkit.train.runner import Run

__all__ = ["Run", "distill_main", "preference_main", "reward_main"]

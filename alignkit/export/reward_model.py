"""A trained reward model as a scorer: the output of the reward stage (recipes/reward.py) loaded on its base, 4-bit
if it trained so, with its one-output sequence-classification head.

    from alignkit.export.reward_model import RewardModel
    rm = RewardModel("outputs/tiny/reward")
    rm.score(["What is 2 + 2?"], ["ANSWER: 4"])          # -> [1.73]: one float per (prompt, completion)

The score is the head's logit (a Bradley-Terry reward, arXiv:2203.02155: only differences between scores of the same
prompt mean anything). Prompts and completions are text, or chat messages (the prompt ending on the user turn, the
completion one assistant turn), rendered with the chat template the model was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.errors import ConfigError
from alignkit.runs import RunRecord


def pair_ids(tokenizer, prompt, completion) -> list[int]:
    """The token ids of one (prompt, completion) pair as trl's RewardTrainer tokenizes the pairs a reward model trains
    on: chat messages through the chat template (which writes its own bos), text with eos appended and the
    tokenizer's special tokens (bos for Llama 3, Gemma, Mistral). So the head scores the sequences it learned on."""
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not isinstance(completion, list):
            completion = [{"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template([*prompt, *completion], tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token or ""
    text = prompt + completion
    return list(tokenizer(text=text if text.endswith(eos) else text + eos)["input_ids"])


class RewardModel:
    """``path``: a reward stage output (or its merge). Raises ConfigError if it is not one."""

    def __init__(self, path: str | Path, batch_size: int = 8):
        from alignkit.export.generate import load_for_generation

        record = RunRecord.for_model(path)
        stages = [e.stage for e in record.lineage] if record else []
        if "reward" not in stages:
            raise ConfigError(
                f"{path}: not a reward model (its run record names the stages {stages or 'none'}). Fix: train one "
                "with recipes/reward.py (alignkit reward) and name that output folder."
            )
        self.path, self.batch_size = Path(path), batch_size
        self.model, self.tokenizer = load_for_generation(path)
        self.tokenizer.padding_side = "right"  # trl's RewardTrainer pads on the right; the head reads the last token

    def encode(self, prompt, completion) -> list[int]:
        """The token ids of one (prompt, completion) pair (:func:`pair_ids`)."""
        return pair_ids(self.tokenizer, prompt, completion)

    @torch.no_grad()
    def score(self, prompts: list, completions: list) -> list[float]:
        """One reward per (prompt, completion) pair; ``len(prompts) == len(completions)``."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions: give one of each per pair")
        encoded = [{"input_ids": self.encode(p, c)} for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(encoded), self.batch_size):
            batch = self.tokenizer.pad(encoded[i : i + self.batch_size], return_tensors="pt").to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores

"""A trivially learnable GRPO reward for tests and golden runs on the tiny random models: name it in a recipe as
``reward_funcs: [alignkit.testing.rewards:plain_letters]`` (the import-path form a user's own function takes)."""

from __future__ import annotations


def plain_letters(prompts, completions, **columns) -> list[float]:
    """The share of each completion's characters that are ASCII lowercase letters or spaces (0-1): a random model
    emits many byte pieces and capitals, so the reward has spread from step 1 and rises as the policy learns."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else "".join(m.get("content", "") for m in completion)
        out.append(sum((ch.isascii() and ch.islower()) or ch == " " for ch in text) / max(1, len(text)))
    return out

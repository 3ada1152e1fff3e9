"""Demo data for the whole pipeline, generated offline: two-digit addition answered in a checkable format.

The task: "What is 23 + 45?" -> a short working line and a final ``ANSWER: 68``. A program scores both the format
(is there an ``ANSWER: <int>`` line) and the exact answer, so "did training work" is a number, not a feeling.

- cpt: raw text worked examples (domain text for continued pretraining)
- sft: chat conversations (``messages``)
- dpo: prompt (chat) / chosen (correct, in format) / rejected (mostly a wrong sum in format, else out of format)
- dpo_test: preference pairs on held-out questions, for DPO's reward accuracy (disjoint from every other split)
- grpo: the training questions as prompts with their ``answer`` (GRPO's exact-match reward reads it)
- eval: held-out questions with the gold answer (disjoint from every training split)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SYSTEM = "You are a careful calculator. End every reply with a line 'ANSWER: <number>'."
ANSWER_PATTERN = r"ANSWER:\s*(-?\d+)"  # alignkit eval --metric regex --pattern ...
_ANSWER = re.compile(ANSWER_PATTERN)


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def _reply(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}.\nANSWER: {a + b}"


def _pairs(seed: int, n: int, exclude: set | None = None) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out, seen = [], set(exclude or ())
    while len(out) < n:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def prompt_messages(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _question(a, b)}]


def score(reply: str, gold: int) -> dict[str, bool]:
    """``format``: the reply has an ANSWER line; ``exact``: its number is the gold answer."""
    match = _ANSWER.search(reply)
    return {"format": match is not None, "exact": match is not None and int(match.group(1)) == gold}


def _preferences(pairs: list[tuple[int, int]], rng: random.Random) -> list[dict]:
    """Mostly hard negatives: a wrong sum in the right format, off by the carry mistakes (tens) small models make;
    the rest out of format."""
    rows = []
    for a, b in pairs:
        wrong = a + b + rng.choice([-10, 10, -10, 10, -20, 20, -1, 1])
        rejected = rng.choice(
            [f"{a} + {b} = {wrong}.\nANSWER: {wrong}"] * 3 + [f"The sum is {a + b}.", f"I think it is about {wrong}."]
        )
        rows.append(
            {
                "prompt": prompt_messages(a, b),
                "chosen": [{"role": "assistant", "content": _reply(a, b)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def make_rows(n_train: int = 400, n_eval: int = 50, seed: int = 0, n_dpo_test: int = 32) -> dict[str, list[dict]]:
    eval_pairs = _pairs(seed + 1000, n_eval)
    dpo_test_pairs = _pairs(seed + 2000, n_dpo_test, exclude=set(eval_pairs))
    train_pairs = _pairs(seed, n_train, exclude=set(eval_pairs) | set(dpo_test_pairs))
    rng = random.Random(seed)
    cpt = [
        {"text": f"Addition practice. {a} plus {b} makes {a + b}. We write: {a} + {b} = {a + b}. ANSWER: {a + b}"}
        for a, b in train_pairs
    ]
    sft = [
        {"messages": [*prompt_messages(a, b), {"role": "assistant", "content": _reply(a, b)}]} for a, b in train_pairs
    ]
    dpo = _preferences(train_pairs, rng)
    dpo_test = _preferences(dpo_test_pairs, rng)
    evals = [{"messages": prompt_messages(a, b), "answer": a + b} for a, b in eval_pairs]
    grpo = [{"prompt": prompt_messages(a, b), "answer": a + b} for a, b in train_pairs]
    return {"cpt": cpt, "sft": sft, "dpo": dpo, "dpo_test": dpo_test, "eval": evals, "grpo": grpo}


# Where each split goes under the data folder. DPO's two splits share a folder, which datasets reads as one source
# with a train and a test split (the recipe names it with test_split: test).
FILES = {
    "cpt": "cpt.jsonl",
    "sft": "sft.jsonl",
    "dpo": "dpo/train.jsonl",
    "dpo_test": "dpo/test.jsonl",
    "eval": "eval.jsonl",
    "grpo": "grpo.jsonl",
}


def write_demo_data(
    out_dir: str | Path, n_train: int = 400, n_eval: int = 50, seed: int = 0, n_dpo_test: int = 32
) -> dict[str, Path]:
    paths = {}
    for name, rows in make_rows(n_train, n_eval, seed, n_dpo_test).items():
        path = Path(out_dir) / FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    return paths


if __name__ == "__main__":
    import sys

    print(write_demo_data(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))

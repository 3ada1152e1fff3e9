"""Demo data for the whole pipeline, generated offline: two-digit addition answered in a checkable format.

The task: "What is 23 + 45?" -> a short working line and a final ``ANSWER: 68``. A program scores both the format
(is there an ``ANSWER: <int>`` line) and the exact answer, so "did training work" is a number, not a feeling.

- cpt: raw text worked examples (domain text for continued pretraining)
- sft: chat conversations (``messages``)
- dpo: prompt (chat) / chosen (correct, in format) / rejected (wrong or out of format)
- eval: held-out questions with the gold answer (disjoint from every training split)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SYSTEM = "You are a careful calculator. End every reply with a line 'ANSWER: <number>'."
_ANSWER = re.compile(r"ANSWER:\s*(-?\d+)")


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


def make_rows(n_train: int = 400, n_eval: int = 50, seed: int = 0) -> dict[str, list[dict]]:
    eval_pairs = _pairs(seed + 1000, n_eval)
    train_pairs = _pairs(seed, n_train, exclude=set(eval_pairs))
    rng = random.Random(seed)
    cpt = [
        {"text": f"Addition practice. {a} plus {b} makes {a + b}. We write: {a} + {b} = {a + b}. ANSWER: {a + b}"}
        for a, b in train_pairs
    ]
    sft = [{"messages": [*prompt_messages(a, b), {"role": "assistant", "content": _reply(a, b)}]} for a, b in train_pairs]
    dpo = []
    for a, b in train_pairs:
        wrong = a + b + rng.choice([-11, -10, -2, -1, 1, 2, 9, 10])
        rejected = rng.choice([f"{a} + {b} = {wrong}.\nANSWER: {wrong}", f"The sum is {a + b}.", f"I think it is about {wrong}."])
        dpo.append(
            {
                "prompt": prompt_messages(a, b),
                "chosen": [{"role": "assistant", "content": _reply(a, b)}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    evals = [{"messages": prompt_messages(a, b), "answer": a + b} for a, b in eval_pairs]
    return {"cpt": cpt, "sft": sft, "dpo": dpo, "eval": evals}


def write_demo_data(out_dir: str | Path, n_train: int = 400, n_eval: int = 50, seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_rows(n_train, n_eval, seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    return paths


if __name__ == "__main__":
    import sys

    print(write_demo_data(sys.argv[1] if len(sys.argv) > 1 else "data/demo"))

"""The online DPO stage (trl 1.16 experimental OnlineDPOTrainer) on the tiny Llama: the reward it optimises rises on
held-out prompts, a reward stage's output folder judges the pairs, and bad input fails before training with the
file/row/key and the fix, exit 2 through ``python recipes/online_dpo.py`` and ``alignkit online_dpo``. Exact resume
is in tests/reliability/test_resume.py; the golden trajectory in tests/regression."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_DATA, log_history, run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.runs import RunRecord
from alignkit.testing.rewards import plain_letters

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--activation_checkpointing", "false", "--lora_dropout", "0"]
ONLINE = ["--config", "recipes/tiny/online_dpo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "true",
          "--lora_modules_to_save", "[lm_head]", "--max_new_tokens", "16", *FAST]  # fmt: skip
ROWS = [json.loads(line) for line in (TINY_DATA / "grpo.jsonl").read_text().splitlines()]


def held_out_reward(model, tokenizer, prompts, samples: int = 4) -> float:
    """plain_letters' mean over ``samples`` completions per held-out prompt, sampled as trl samples them in training
    (temperature 1, 16 new tokens), with a fixed seed."""
    from alignkit.export.generate import generate_replies

    torch.manual_seed(0)
    replies = generate_replies(model, tokenizer, prompts * samples, max_new_tokens=16, do_sample=True, temperature=1.0)
    scores = plain_letters(prompts * samples, replies)
    return sum(scores) / len(scores)


def test_online_dpo_raises_the_reward_on_held_out_prompts(tmp_path):
    """The tiny random model's logits hardly depend on its hidden states, so the (4-bit) LoRA trains its lm_head too
    (lora_modules_to_save). 48 prompts train; the other 16 are held out. trl 1.16's online DPO has no evaluation loop,
    so the held-out reward is measured here on the trained output, and on the starting model: the same weights with
    the adapter disabled (a fresh LoRA and the original head: exactly the model online DPO started from)."""
    from alignkit.models.trained import load_trained

    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:48])
    out = tmp_path / "online_dpo"
    run_recipe("online_dpo", [*ONLINE, "--datasets", str(train), "--reward_funcs",
                              "alignkit.testing.rewards:plain_letters", "--learning_rate", "2e-2", "--max_steps", "12",
                              "--per_device_train_batch_size", "8", "--output_dir", str(out)])  # fmt: skip
    history = log_history(out)
    steps = [e for e in history if "objective/scores" in e]
    assert len(steps) == 12 and {"rewards/margins", "rewards/accuracies", "objective/kl"} <= set(steps[0])
    assert RunRecord.read(out).last.stage == "online_dpo"

    model, tokenizer = load_trained(out)
    prompts = [row["prompt"] for row in ROWS[48:]]
    after = held_out_reward(model, tokenizer, prompts)
    with model.disable_adapter():
        before = held_out_reward(model, tokenizer, prompts)
    print(f"held-out plain_letters reward: before {before:.3f}, after {after:.3f}")
    assert after > before + 0.05, (before, after)


def test_a_reward_stage_output_judges_the_pairs(tmp_path):
    """``reward_funcs: [<reward run>]``: the reward model alignkit trained scores both completions of each prompt;
    its score is trl's objective/scores (checked on the first rows before the policy loads, as every reward is)."""
    reward = tmp_path / "reward"
    run_recipe(
        "reward", ["--config", "recipes/tiny/reward.yaml", "--max_steps", "2", "--output_dir", str(reward), *FAST]
    )
    out = tmp_path / "online_dpo"
    run_recipe("online_dpo", [*ONLINE, "--reward_funcs", f"[{reward}]", "--max_steps", "2", "--output_dir", str(out)])
    steps = [e for e in log_history(out) if "objective/scores" in e]
    assert len(steps) == 2 and all(e["objective/scores_margin"] >= 0 for e in steps)  # chosen: the higher score


ROW = {"prompt": "What is 1 + 1?", "answer": 2}


@pytest.mark.parametrize(
    ("rows", "extra", "error", "words"),
    [
        ([{"prompt": "What is 1 + 1?"}] * 2, [], DataError, ["'answer'", "reference_column", "Fix"]),
        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": 1}] * 2,
         [], DataError, ["row 1", "ends on an assistant turn"]),
        ([{"answer": 1}] * 2, [], DataError, ["missing columns", "needs prompt", "Fix:"]),
        ([ROW] * 2, ["--reward_funcs", "no_such_module:f"], ConfigError, ["reward_funcs[0]", "could not be imported"]),
        ([ROW] * 2, ["--reward_funcs", "alignkit.testing.rewards:nope"], ConfigError,
         ["reward_funcs[0]", "has no function 'nope'"]),
        ([ROW] * 2, ["--reward_funcs", "[]"], ConfigError, ["reward_funcs: empty"]),
        ([ROW] * 2, ["--reward_weights", "[1.0]"], ConfigError, ["reward_weights", "one weight per reward"]),
        ([ROW] * 2, ["--beta", "0"], ConfigError, ["beta", "> 0"]),
        ([ROW] * 4, ["--test_size", "0.5"], ConfigError, ["test_size 0.5", "no evaluation loop", "alignkit eval"]),
    ],
    ids=["no-reference-column", "prompt-ends-on-assistant", "no-prompt-column", "reward-not-importable",
         "reward-function-missing", "no-reward", "reward-weights-count", "zero-beta", "test-split"],
)  # fmt: skip
def test_online_dpo_bad_input_fails_before_training_and_writes_nothing(rows, extra, error, words, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        run_recipe("online_dpo", [*ONLINE, "--datasets", str(data), "--output_dir", str(out), *extra])
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert not out.exists()


@pytest.mark.parametrize(
    ("entry", "case"), [("recipes/online_dpo.py", "missing-reward"), ("alignkit", "bad-row")], ids=["recipe", "cli"]
)
def test_online_dpo_bad_input_exits_2_without_a_traceback(entry, case, tmp_path):
    """``python recipes/online_dpo.py`` (what ``accelerate launch`` runs) and ``alignkit online_dpo``: one message
    naming the key, or the file and row, and the fix; exit 2, no traceback, nothing written."""
    if case == "missing-reward":
        data, extra = write_jsonl(tmp_path / "data.jsonl", [ROW] * 2), ["--reward_funcs", "my_rewards:exact_sum"]
        expected = "reward_funcs[0]: 'my_rewards:exact_sum' could not be imported"
    else:
        row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": 1}
        good = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": 2}
        data, extra = write_jsonl(tmp_path / "data.jsonl", [good, row]), []
        expected = f"{data}, row 2: the prompt ends on an assistant turn"
    head = (
        [sys.executable, entry]
        if entry.startswith("recipes/")
        else [sys.executable, "-m", "alignkit.cli", "online_dpo"]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*head, *ONLINE, "--datasets", str(data), "--output_dir", str(tmp_path / "out"), *extra],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "Fix:" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()

"""The RLOO stage (trl 1.16 RLOOTrainer) on the tiny Llama: the reward it optimises rises on held-out prompts (trl's
own evaluation: completions sampled for the test split and scored by the same reward), its output merges, and bad
input fails before training with the file/row/key and the fix. Exact resume is in tests/reliability/test_resume.py;
the golden trajectory in tests/regression."""

from __future__ import annotations

import pytest
from conftest import log_history, run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.export.merge import merge_adapter
from alignkit.runs import RunRecord

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--gradient_checkpointing", "false", "--lora_dropout", "0"]
RLOO = ["--config", "recipes/tiny/rloo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "true",
        "--lora_modules_to_save", "[lm_head]", "--num_generations", "8", "--per_device_train_batch_size", "16",
        "--max_completion_length", "16", *FAST]  # fmt: skip


def test_rloo_raises_the_reward_on_held_out_prompts(tmp_path):
    """The tiny random model's logits hardly depend on its hidden states, so the (4-bit) LoRA trains its lm_head too
    (lora_modules_to_save). A quarter of the prompts is held out; trl evaluates on them before step 1
    (eval_on_start) and after the last step, sampling num_generations completions each and scoring them with the
    training reward (a function named as module:function)."""
    out = tmp_path / "rloo"
    run_recipe("rloo", [*RLOO, "--reward_funcs", "alignkit.testing.rewards:plain_letters", "--learning_rate", "2e-2",
                        "--max_steps", "12", "--test_size", "0.25", "--eval_strategy", "steps", "--eval_steps", "12",
                        "--eval_on_start", "true", "--per_device_eval_batch_size", "16",
                        "--output_dir", str(out)])  # fmt: skip
    history = log_history(out)
    held_out = [e["eval_reward"] for e in history if "eval_reward" in e]
    assert len(held_out) == 2, history
    assert held_out[1] > held_out[0] + 0.05, held_out
    train = [e["reward"] for e in history if "reward" in e]
    assert len(train) == 12 and {"rewards/plain_letters/mean", "reward_std"} <= set(history[1])
    assert RunRecord.read(out).last.stage == "rloo"
    assert merge_adapter(out, tmp_path / "rloo-merged").parity.passed


ROW = {"prompt": "What is 1 + 1?", "answer": 2}


@pytest.mark.parametrize(
    ("rows", "extra", "error", "words"),
    [
        ([{"prompt": "What is 1 + 1?"}] * 2, [], DataError, ["'answer'", "reference_column", "Fix"]),
        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": 1}] * 2,
         [], DataError, ["row 1", "ends on an assistant turn"]),
        ([ROW] * 2, ["--reward_funcs", "no_such_module:f"], ConfigError, ["reward_funcs[0]", "could not be imported"]),
        ([ROW] * 2, ["--reward_funcs", "exactt"], ConfigError, ["reward_funcs[0]", "exact"]),
        ([ROW] * 2, ["--num_generations", "1"], ConfigError, ["num_generations", "leave-one-out"]),
        ([ROW] * 2, ["--reward_weights", "[1.0]"], ConfigError, ["reward_weights", "one weight per reward"]),
        ([ROW] * 2, ["--beta", "-0.1"], ConfigError, ["beta", ">= 0"]),
    ],
    ids=["no-reference-column", "prompt-ends-on-assistant", "reward-not-importable", "reward-unknown",
         "one-generation", "reward-weights-count", "negative-beta"],
)  # fmt: skip
def test_rloo_bad_input_fails_before_training_and_writes_nothing(rows, extra, error, words, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        run_recipe("rloo", [*RLOO, "--datasets", str(data), "--test_size", "0", "--output_dir", str(out), *extra])
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert not out.exists()


def test_rloo_bad_input_exits_2_from_the_recipe_script(tmp_path):
    """``python recipes/rloo.py`` (what ``accelerate launch`` and ``alignkit rloo`` run): one message naming the file,
    the row and the fix, exit 2, no traceback."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": 1}
    data = write_jsonl(tmp_path / "data.jsonl", [row] * 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "recipes/rloo.py", *RLOO, "--datasets", str(data),
                           "--test_size", "0", "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{data}, row 1: the prompt ends on an assistant turn" in done.stderr and "Fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()

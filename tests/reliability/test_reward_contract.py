"""GRPO reward functions under a contract (issue 43, case 3): numpy values accepted as trl accepts them, NaN/inf and
wrong counts refused with the expected count, an import that exits reported as such, and a function that raises
mid-run stops the run with one line naming it, the completion and the exception, after saving a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import log_history, run_recipe

from alignkit.errors import ConfigError, RewardFunctionError
from alignkit.train.callbacks import checkpoint_is_complete
from alignkit.train.rewards import CheckedReward, import_reward

PROMPTS, COMPLETIONS = ["p1", "p2", "p3"], ["ANSWER: 1", "no answer here at all", "ANSWER: 3"]


def test_numpy_scalars_and_arrays_are_accepted_as_trl_accepts_them():
    as_scalars = CheckedReward(lambda prompts, completions, **kw: [np.float32(0.5)] * len(completions), "np")
    as_array = CheckedReward(lambda prompts, completions, **kw: np.arange(len(completions), dtype=np.float64), "arr")
    with_none = CheckedReward(lambda prompts, completions, **kw: [1, None, np.int64(2)], "none")
    assert as_scalars(PROMPTS, COMPLETIONS) == [0.5, 0.5, 0.5]
    assert as_array(PROMPTS, COMPLETIONS) == [0.0, 1.0, 2.0]
    assert with_none(PROMPTS, COMPLETIONS) == [1.0, None, 2.0] and with_none.skipped == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), np.float32("nan")])
def test_a_non_finite_reward_is_refused(bad):
    reward = CheckedReward(lambda prompts, completions, **kw: [1.0, bad, 0.0], "parse")
    with pytest.raises(RewardFunctionError, match=r"'parse' returned (nan|inf), not a finite number.*None to skip"):
        reward(PROMPTS, COMPLETIONS)


def test_one_value_per_prompt_instead_of_per_completion_names_the_expected_count():
    reward = CheckedReward(lambda prompts, completions, **kw: [1.0] * len(set(prompts)), "per_prompt")
    with pytest.raises(RewardFunctionError, match=r"'per_prompt' returned 2 values for 4 completions.*return 4"):
        reward(["a", "a", "b", "b"], COMPLETIONS + ["x"])


def test_a_raising_reward_names_the_function_the_completion_and_the_exception():
    def strict(prompts, completions, **kw):
        return [float(c.split("ANSWER:")[1]) for c in completions]

    with pytest.raises(RewardFunctionError) as caught:
        CheckedReward(strict, "mine:strict")(PROMPTS, COMPLETIONS)
    message = str(caught.value)
    assert "\n" not in message and "'mine:strict' raised IndexError" in message
    assert "'no answer here at all'" in message  # the completion it fails on, not the batch's first


def test_a_reward_module_that_exits_on_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\ndef r(**kw):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing 'exits_on_import' called sys.exit\(3\)"):
        import_reward("exits_on_import:r", 0)


def test_a_reward_that_raises_mid_run_stops_after_saving_a_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "flaky_rewards.py").write_text(
        "calls = 0\n"
        "def flaky(prompts, completions, **kw):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls == 4:  # the probe before the model loads, then steps 1 and 2; step 3's batch fails\n"
        "        raise ValueError('no ANSWER line')\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "grpo"
    argv = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "false",
            "--reward_funcs", "flaky_rewards:flaky", "--num_generations", "4", "--per_device_train_batch_size", "4",
            "--max_completion_length", "8", "--max_steps", "4", "--save_steps", "100", "--disable_tqdm", "true",
            "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(RewardFunctionError) as caught:
        run_recipe("grpo", argv)
    message = str(caught.value)
    assert "'flaky_rewards:flaky' raised ValueError: no ANSWER line on the completion" in message
    assert f"saved {out / 'checkpoint-2'}" in message and checkpoint_is_complete(out / "checkpoint-2")
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "stopped: reward function failed"


def test_skipped_and_non_finite_rewards_are_counted_in_the_logs_per_function(tmp_path, monkeypatch):
    """With nonfinite_rewards: skip, NaN/inf are treated as None (trl's skip); every log line says, per function,
    how many completions it skipped (None and mapped NaN/inf) and how many NaN/inf it returned since the last log,
    matching what the functions really returned. A function that skips nothing logs 0."""
    (tmp_path / "spotty_rewards.py").write_text(
        "import json, math, os\n"
        "def spotty(prompts, completions, **kw):\n"
        "    out = [None, math.nan, math.inf, 1.0][: len(completions)] + [0.5] * max(0, len(completions) - 4)\n"
        "    with open(os.environ['SPOTTY_LOG'], 'a') as f:\n"
        "        f.write(json.dumps(len(completions)) + '\\n')\n"
        "    return out\n"
        "def steady(prompts, completions, **kw):\n"
        "    return [float(len(c) % 3) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPOTTY_LOG", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "grpo"
    argv = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "false",
            "--reward_funcs", "[spotty_rewards:spotty, spotty_rewards:steady]", "--nonfinite_rewards", "skip",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--max_completion_length", "8",
            "--max_steps", "2", "--save_steps", "100", "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    run_recipe("grpo", argv)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()][1:]  # [0]: the probe
    logs = [e for e in log_history(out) if "reward" in e]
    assert len(logs) == 2 and calls
    assert sum(e["rewards/spotty/skipped"] for e in logs) == 3 * len(calls)  # None, NaN, inf in every batch
    assert sum(e["rewards/spotty/nonfinite"] for e in logs) == 2 * len(calls)
    assert all(e["rewards/steady/skipped"] == e["rewards/steady/nonfinite"] == 0 for e in logs)

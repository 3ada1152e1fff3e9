"""`alignkit chat`, `generate`, `eval` and `serve` on a run whose head does not write replies (a reward model, a
task head): one line naming the run's head and what to use instead, exit 2, before any model loads; not a
traceback from inside transformers (a classification model has no `generate`, a BERT tokenizer no chat template)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, TINY_DATA, run_recipe

FAST = ["--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no", "--test_size", "0",
        "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    reward, task = root / "reward", root / "task"
    run_recipe("reward", ["--config", "recipes/tiny/reward.yaml", *FAST, "--eval_on_start", "false",
                          "--output_dir", str(reward)])  # fmt: skip
    run_recipe("task", ["--config", "recipes/tiny/task_cls.yaml", *FAST, "--output_dir", str(task)])
    return {"reward": reward, "task": task}


COMMANDS = {
    "chat": [],
    "generate": ["--prompts", str(TINY_DATA / "sft.jsonl"), "--out", "{tmp}/replies.jsonl"],
    "eval": ["--data", str(TINY_DATA / "sft.jsonl"), "--out", "{tmp}/eval"],
}


@pytest.mark.parametrize("run", ["reward", "task"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_run_that_does_not_generate_is_refused_with_its_head(command, run, runs, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", command, str(runs[run]), *argv],
        input="What is 2 + 2?\n", capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "does not write replies" in done.stderr, done.stderr[-2000:]
    assert ("RewardModel" if run == "reward" else "seq_cls") in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_serve_refuses_a_reward_model_before_merging_it(runs):
    from alignkit.errors import ConfigError
    from alignkit.export.serve import servable_folder

    with pytest.raises(ConfigError, match="does not write replies"):
        servable_folder(runs["reward"])
    assert not runs["reward"].with_name("reward-merged").exists()

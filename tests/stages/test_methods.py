"""KTO, ORPO, SimPO, reward modeling and GRPO on the tiny Llama: each learns a learnable signal and its own metric
moves the right way on held-out data; each hands off from SFT with its stage in the lineage and model card, and its
output merges; GRPO's rewards (built-in, a trained reward model, a function by import path) reach trl; bad input is
refused before training with the file, row or key and the fix."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import log_history, run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.export.generate import load_for_generation
from alignkit.export.merge import merge_adapter
from alignkit.export.report import write_report
from alignkit.export.reward_model import RewardModel
from alignkit.runs import RunRecord

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--gradient_checkpointing", "false", "--lora_dropout", "0"]
WORDS = "the a of to in and is for model data user city paris london alice bob cat dog bird red green blue".split()
GOOD, BAD = "good great happy love".split(), "bad terrible sad hate".split()


def preference_rows(n: int, seed: int) -> list[dict]:
    """A random continuation, then two words from GOOD (chosen) or from BAD (rejected): learnable, and which reply a
    random model prefers varies from pair to pair (reference-free methods start near chance)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({
            "prompt": prompt,
            "chosen": f" {body} " + " ".join(rng.choice(GOOD) for _ in range(2)),
            "rejected": f" {body} " + " ".join(rng.choice(BAD) for _ in range(2)),
        })  # fmt: skip
    return rows


def learn(stage: str, tmp_path, *extra: str, steps: int = 6):
    """A fresh LoRA on the tiny base trained on the learnable preference, evaluated at step 0 and at the end on 16
    held-out rows."""
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(56, seed=0))
    out = tmp_path / stage
    argv = ["--model_name_or_path", "tiny:llama", "--load_in_4bit", "false", "--lora_r", "8", "--lora_alpha", "16",
            "--datasets", str(data), "--test_size", "16", "--max_length", "64", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_steps", str(steps),
            "--lr_scheduler_type", "constant", "--eval_strategy", "steps", "--eval_steps", str(steps),
            "--eval_on_start", "true", "--output_dir", str(out), "--seed", "0", "--chat_template", "chatml",
            *FAST, *extra]  # fmt: skip
    run_recipe(stage, argv)
    evals = [e for e in log_history(out) if "eval_loss" in e]
    return out, evals[0], evals[-1]


@torch.no_grad()
def completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    ids = tokenizer(prompt + completion, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logps[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum().item()


def test_kto_learns_a_learnable_preference_on_held_out_pairs(tmp_path):
    """Pairs are unpaired for KTO; on 16 held-out pairs the implicit reward (policy minus reference log-prob) ranks
    the chosen reply first for > 90% of pairs, from exactly 0 margin at step 0 (policy == reference)."""
    out, start, end = learn("kto", tmp_path)
    assert start["step"] == 0 and start["eval_rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert end["eval_rewards/margins"] > 0.1 and end["eval_loss"] < start["eval_loss"], (start, end)
    model, tokenizer = load_for_generation(out)
    held_out, wins = preference_rows(16, seed=1), 0
    for row in held_out:
        reward = {}
        for column in ("chosen", "rejected"):
            policy = completion_logp(model, tokenizer, row["prompt"], row[column])
            with model.disable_adapter():  # the reference: the starting model (a fresh adapter: the base)
                reference = completion_logp(model, tokenizer, row["prompt"], row[column])
            reward[column] = policy - reference
        wins += reward["chosen"] > reward["rejected"]
    assert wins / len(held_out) > 0.9, wins


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_methods_learn_a_learnable_preference(stage, tmp_path):
    out, start, end = learn(stage, tmp_path)
    assert start["eval_rewards/accuracies"] < 0.8, start  # a random model: near chance
    assert end["eval_rewards/accuracies"] >= 0.9 and end["eval_rewards/margins"] > start["eval_rewards/margins"]
    assert end["eval_loss"] < start["eval_loss"]
    record = RunRecord.read(out)
    assert record.last.stage == stage and record.last.task == "causal_lm"
    assert stage in (out / "README.md").read_text()


def test_reward_model_ranks_held_out_pairs_and_scores_as_a_scorer(tmp_path):
    out, start, end = learn("reward", tmp_path)
    assert start["eval_accuracy"] < 0.8 and end["eval_accuracy"] >= 0.9, (start, end)
    assert end["eval_margin"] > start["eval_margin"]
    record = RunRecord.read(out)
    assert record.last.task == "seq_cls" and record.last.head_config == {"num_labels": 1}
    assert record.metrics["eval_accuracy"] >= 0.9  # the final evaluation, in alignkit_run.json
    held_out = preference_rows(16, seed=1)
    scorer = RewardModel(out)
    chosen = scorer.score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = scorer.score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) > 0.9
    merged = merge_adapter(out, tmp_path / "reward-merged")  # the head merges too; parity on its scores
    assert merged.parity.passed and merged.parity.max_abs_diff < 1e-4
    assert RewardModel(merged.output_dir).score([held_out[0]["prompt"]], [held_out[0]["chosen"]]) == pytest.approx(
        chosen[:1], abs=1e-4
    )
    with pytest.raises(ConfigError, match="not a reward model"):
        RewardModel(tmp_path / "missing")


GRPO = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "true",
        "--lora_modules_to_save", "[lm_head]", "--num_generations", "8", "--per_device_train_batch_size", "16",
        "--max_completion_length", "16", *FAST]  # fmt: skip


def test_grpo_raises_a_learnable_reward_named_by_import_path(tmp_path):
    """The tiny random model's logits hardly depend on its hidden states, so the (4-bit) LoRA trains its lm_head
    too (lora_modules_to_save). The reward is a function named as module:function."""
    out = tmp_path / "grpo"
    run_recipe("grpo", [*GRPO, "--reward_funcs", "alignkit.testing.rewards:plain_letters", "--learning_rate", "2e-2",
                        "--max_steps", "12", "--output_dir", str(out)])  # fmt: skip
    rewards = [e["reward"] for e in log_history(out) if "reward" in e]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    steps = [e for e in log_history(out) if "reward" in e]
    assert {"rewards/plain_letters/mean", "reward_std", "completions/mean_length"} <= set(steps[0])
    assert RunRecord.read(out).last.stage == "grpo"
    merged = merge_adapter(out, tmp_path / "grpo-merged")
    assert merged.parity.passed


def test_grpo_after_sft_with_built_in_and_reward_model_rewards(tmp_path):
    """SFT -> GRPO hand-off with the built-in exact and format rewards on the demo task plus a trained reward
    model; every reward is logged under its name, and the lineage names both stages."""
    sft, reward = tmp_path / "sft", tmp_path / "reward"
    run_recipe(
        "sft",
        ["--config", "recipes/tiny/sft.yaml", "--test_size", "0", "--max_steps", "2", "--output_dir", str(sft), *FAST],
    )
    run_recipe("reward", ["--config", "recipes/tiny/reward.yaml", "--max_steps", "2", "--output_dir", str(reward), *FAST])  # fmt: skip
    out = tmp_path / "grpo"
    run_recipe("grpo", ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", str(sft), "--max_steps", "2",
                        "--reward_funcs", f"[format, exact, {reward}]", "--output_dir", str(out), *FAST])  # fmt: skip
    step = next(e for e in log_history(out) if "reward" in e)
    assert {"rewards/format/mean", "rewards/exact/mean", f"rewards/reward_model:{reward.name}/mean"} <= set(step)
    record = RunRecord.read(out)
    assert [e.stage for e in record.lineage] == ["sft", "grpo"]
    assert "grpo" in (out / "README.md").read_text()
    report = write_report([reward, out], tmp_path / "report")  # each method's own metrics are plotted
    assert {"grpo_reward", "completion_length", "reward_model"} <= set(report.pngs)
    assert {"reward", "rewards/format/mean", "rewards/exact/mean"} <= set(
        report.series["grpo_reward"][f"grpo:{out.name}"]
    )
    assert "eval_accuracy" in report.series["reward_model"][f"reward:{reward.name}"]


def test_kto_after_sft_records_both_stages_and_merges(tmp_path):
    sft, out = tmp_path / "sft", tmp_path / "kto"
    run_recipe(
        "sft",
        ["--config", "recipes/tiny/sft.yaml", "--test_size", "0", "--max_steps", "2", "--output_dir", str(sft), *FAST],
    )
    run_recipe("kto", ["--config", "recipes/tiny/kto.yaml", "--model_name_or_path", str(sft), "--test_size", "0",
                       "--max_steps", "2", "--output_dir", str(out), *FAST])  # fmt: skip
    record = RunRecord.read(out)
    assert [e.stage for e in record.lineage] == ["sft", "kto"] and record.last.from_stage == "sft"
    assert "kto" in (out / "README.md").read_text()
    assert merge_adapter(out, tmp_path / "kto-merged").parity.passed


KTO_ROWS = [{"prompt": "What is 2 + 2?", "completion": "4", "label": True},
            {"prompt": "What is 2 + 3?", "completion": "6", "label": False}]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "rows", "extra", "error", "words"),
    [
        ("kto", [{**r, "label": int(r["label"])} for r in KTO_ROWS], [], DataError,
         ["row 1", "'label' is 1 (a int)", "true/false"]),
        ("kto", [*KTO_ROWS, {"prompt": "What is 1 + 1?", "completion": "", "label": True}], [], DataError,
         ["row 3", "'completion' is empty"]),
        ("kto", [{"prompt": "a b c", "chosen": " same", "rejected": " same"}] * 2, [], DataError,
         ["row 1", "identical"]),
        ("kto", KTO_ROWS * 2, ["--per_device_train_batch_size", "1"], ConfigError, ["per_device_train_batch_size", "KL"]),
        ("kto", [{**r, "label": True} for r in KTO_ROWS] * 2, [], DataError,
         ["train split", "desirable (label: true)", "no undesirable (label: false) completions", "Fix: add"]),
        ("kto", [{**r, "label": False} for r in KTO_ROWS] * 2, [], DataError,
         ["train split", "no desirable (label: true) completions"]),
        ("orpo", [{"prompt": "a b c", "chosen": " x", "rejected": " x"}] * 2, [], DataError, ["row 1", "identical"]),
        ("reward", [{"prompt": "a b c", "chosen": " x"}] * 2, ["--eval_strategy", "no"], DataError, ["missing columns", "rejected"]),
        ("grpo", [{"prompt": "What is 1 + 1?"}] * 2, [], DataError, ["'answer'", "reference_column"]),
        ("grpo", [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": 1}] * 2,
         [], DataError, ["row 1", "ends on an assistant turn"]),
        ("grpo", [{"prompt": "What is 1 + 1?", "answer": 2}] * 2, ["--reward_funcs", "no_such_module:f"], ConfigError,
         ["reward_funcs[0]", "no_such_module", "could not be imported"]),
        ("grpo", [{"prompt": "What is 1 + 1?", "answer": 2}] * 2, ["--reward_funcs", "json:dumps"], ConfigError,
         ["'json:dumps' raised", "**kwargs"]),
        ("grpo", [{"prompt": "What is 1 + 1?", "answer": 2}] * 2, ["--reward_funcs", "exactt"], ConfigError,
         ["reward_funcs[0]", "exact"]),
        ("grpo", [{"prompt": "What is 1 + 1?", "answer": 2}] * 2, ["--num_generations", "3"], ConfigError,
         ["num_generations"]),
    ],
    ids=["kto-label-number", "kto-empty-completion", "kto-pair-identical", "kto-batch-of-one", "kto-all-desirable",
         "kto-all-undesirable", "orpo-identical",
         "reward-no-rejected", "grpo-no-reference", "grpo-prompt-ends-on-assistant", "grpo-reward-not-importable",
         "grpo-reward-wrong-signature", "grpo-reward-unknown", "grpo-generations-do-not-divide"],
)  # fmt: skip
def test_bad_input_fails_before_training_and_writes_nothing(stage, rows, extra, error, words, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    config = f"recipes/tiny/{stage}.yaml"
    argv = ["--config", config, "--model_name_or_path", "tiny:llama", "--datasets", str(data), "--test_size", "0",
            "--output_dir", str(out), *FAST, *extra]  # fmt: skip
    with pytest.raises(error) as caught:
        run_recipe(stage, argv)
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert not out.exists()


def test_a_wrong_length_reward_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}] * 4)
    with pytest.raises(ConfigError, match=r"'my_rewards:short' returned 1 values for 2 completions"):
        run_recipe(
            "grpo",
            [
                "--config",
                "recipes/tiny/grpo.yaml",
                "--model_name_or_path",
                "tiny:llama",
                "--datasets",
                str(data),
                "--reward_funcs",
                "my_rewards:short",
                "--output_dir",
                str(tmp_path / "o"),
                *FAST,
            ],
        )


def test_kto_data_in_its_own_format_and_as_pairs_give_the_same_rows(tmp_path):
    from alignkit.config import DatasetSource
    from alignkit.data.schemas import KTO
    from alignkit.data.sources import check_source, load_source_split

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p1", "chosen": " good", "rejected": " bad"},
                                                   {"prompt": "p2", "chosen": " yes", "rejected": " no"}])  # fmt: skip
    source = DatasetSource(path=str(pairs))
    rows = check_source(load_source_split(source), source, str(pairs), KTO, [1, 2]).to_list()
    assert rows == [
        {"prompt": "p1", "completion": " good", "label": True},
        {"prompt": "p1", "completion": " bad", "label": False},
        {"prompt": "p2", "completion": " yes", "label": True},
        {"prompt": "p2", "completion": " no", "label": False},
    ]
    unpaired = write_jsonl(tmp_path / "kto.jsonl", rows)
    source = DatasetSource(path=str(unpaired))
    assert check_source(load_source_split(source), source, str(unpaired), KTO).to_list() == rows
    assert json.loads(json.dumps(rows))  # plain JSON values


@pytest.mark.parametrize(
    ("stage", "rows", "extra", "words"),
    [
        ("kto", [{**r, "label": int(r["label"])} for r in KTO_ROWS], [], ["row 1", "'label' is 1"]),
        ("grpo", [{"prompt": "What is 1 + 1?", "answer": 2}] * 2, ["--reward_funcs", "no_such_module:f"],
         ["reward_funcs[0]", "could not be imported"]),
    ],
    ids=["kto-label-number", "grpo-reward-not-importable"],
)  # fmt: skip
def test_bad_input_through_accelerate_launch_exits_2_with_one_message(stage, rows, extra, words, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cmd = ["accelerate", "launch", "--num_processes", "1", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           f"recipes/{stage}.py", "--config", f"recipes/tiny/{stage}.yaml", "--model_name_or_path", "tiny:llama",
           "--datasets", str(data), "--test_size", "0", "--output_dir", str(tmp_path / "out"), *FAST, *extra]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-3000:]
    assert "Traceback" not in said and all(w in said for w in words), said[-3000:]
    assert not (tmp_path / "out").exists()

"""The distill stage (trl 1.16 DistillationTrainer) on the tiny Llama: a 4-bit + LoRA student learns a merged SFT
teacher; the divergence it optimises falls on held-out prompts (trl's evaluation before step 1 and after the last),
and the student's greedy tokens agree more often with the teacher's on those prompts. A teacher with another
vocabulary, a missing teacher and bad rows fail before any weights load, exit 2 through ``python recipes/distill.py``
and ``alignkit distill``. Exact resume is in tests/reliability/test_resume.py; the golden trajectory in
tests/regression."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_DATA, log_history, run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.runs import RunRecord

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--activation_checkpointing", "false", "--lora_dropout", "0"]
DISTILL = ["--config", "recipes/tiny/distill.yaml", "--load_in_4bit", "true", "--lora_modules_to_save", "[lm_head]",
           "--max_completion_length", "16", *FAST]  # fmt: skip
ROWS = [json.loads(line) for line in (TINY_DATA / "grpo.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher far from the tiny base: 8 SFT steps at a high learning rate on the tiny chats, its lm_head trained in
    full, merged (fp32). The student starts from the base, so the divergence starts well above 0."""
    from alignkit.export.merge import merge_adapter

    out = tmp_path_factory.mktemp("teacher") / "sft"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--lora_modules_to_save",
                       "[lm_head]", "--learning_rate", "2e-2", "--max_steps", "8", "--test_size", "0", *FAST,
                       "--output_dir", str(out)])  # fmt: skip
    return Path(merge_adapter(out, out.parent / "merged").output_dir)


@torch.no_grad()
def agreement(student, teacher, tokenizer, prompts, new_tokens: int = 16) -> float:
    """The share of positions of the teacher's greedy replies to ``prompts`` where the student's most likely next token
    is the teacher's (teacher forcing on the teacher's reply): 1 when the student predicts as the teacher does."""
    hits = total = 0
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        full = teacher.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        reply = full[0, ids.shape[1] :]
        predicted = student(full).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
        hits += int((predicted == reply).sum())
        total += reply.numel()
    return hits / total


def test_distillation_lowers_the_held_out_divergence(teacher, tmp_path):
    """Teacher: a tiny SFT run, merged (fp32). Student: the tiny base, 4-bit + LoRA (its lm_head trained in
    full: the random model's logits hardly depend on its hidden states). ``beta: 0``: the loss is the forward KL
    (teacher || student) per completion token. A quarter of the prompts is held out; trl evaluates the divergence on
    them before step 1 (eval_on_start) and after the last step, on completions the student samples."""
    from alignkit.models.teacher import load_teacher
    from alignkit.models.trained import load_trained

    out = tmp_path / "distill"
    run_recipe("distill", [*DISTILL, "--teacher_model_name_or_path", str(teacher), "--beta", "0",
                           "--learning_rate", "5e-3", "--max_steps", "10", "--test_size", "0.25",
                           "--eval_strategy", "steps", "--eval_steps", "10", "--eval_on_start", "true",
                           "--per_device_eval_batch_size", "16", "--output_dir", str(out)])  # fmt: skip
    history = log_history(out)
    held_out = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(held_out) == 2, history
    assert held_out[1] < 0.5 * held_out[0], held_out
    assert len([e for e in history if "loss" in e]) == 10
    assert RunRecord.read(out).last.stage == "distill"

    student, tokenizer = load_trained(out)
    teacher_model = load_teacher(str(teacher))
    prompts = [row["prompt"] for row in ROWS[48:]]
    after = agreement(student, teacher_model, tokenizer, prompts)
    with student.disable_adapter():  # the student as it started: the 4-bit base, its original head
        before = agreement(student, teacher_model, tokenizer, prompts)
    print(
        f"held-out divergence {held_out[0]:.4f} -> {held_out[1]:.4f}; agreement with the teacher {before:.3f} -> {after:.3f}"
    )
    assert after > before, (before, after)


ROW = {"prompt": "What is 1 + 1?"}


@pytest.mark.parametrize(
    ("rows", "extra", "error", "words"),
    [
        ([ROW] * 2, ["--teacher_model_name_or_path", "tiny:llama_base"], ConfigError,
         ["teacher_model_name_or_path: 'tiny:llama_base' has another vocabulary", "512 vs 512 tokens", "Fix:"]),
        ([ROW] * 2, ["--teacher_model_name_or_path", "tiny:gemma3"], ConfigError,
         ["teacher_model_name_or_path: 'tiny:gemma3' has another vocabulary", "one tokenizer"]),
        ([ROW] * 2, ["--teacher_model_name_or_path", "./no/such/teacher"], ConfigError,
         ["teacher_model_name_or_path: './no/such/teacher' does not exist"]),
        ([ROW] * 2, ["--teacher_model_name_or_path", "null"], ConfigError, ["teacher_model_name_or_path: required"]),
        ([ROW] * 2, ["--beta", "1.5"], ConfigError, ["beta", "[0, 1]"]),
        ([ROW] * 2, ["--lora_target_modules", "[q_proj, lm_head]"], ConfigError, ["lm_head", "lora_modules_to_save"]),
        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2, [], DataError,
         ["row 1", "ends on an assistant turn"]),
        ([{"text": "hi"}] * 2, [], DataError, ["missing columns", "needs prompt", "Fix:"]),
    ],
    ids=["other-vocabulary-same-size", "other-vocabulary", "teacher-missing", "no-teacher", "beta-above-1",
         "lora-on-lm-head", "prompt-ends-on-assistant", "no-prompt-column"],
)  # fmt: skip
def test_distill_bad_input_fails_before_any_weights_load(rows, extra, error, words, tmp_path, monkeypatch):
    """tiny:llama_base has a vocabulary of the same size (512) but other tokens: trl's own check (vocab_size) would
    let it through and distil nonsense; the tokenizers are compared instead."""
    from alignkit.models import loader

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the bad input was refused")

    monkeypatch.setattr(loader, "load_base_model", no_weights)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    teacher = [] if "--teacher_model_name_or_path" in extra else ["--teacher_model_name_or_path", "tiny:llama"]
    with pytest.raises(error) as caught:
        run_recipe("distill", [*DISTILL, *teacher, "--datasets", str(data), "--output_dir", str(out), *extra])
    message = str(caught.value)
    assert all(w in message for w in words), message
    assert not out.exists()


@pytest.mark.parametrize(
    ("entry", "case"), [("recipes/distill.py", "bad-row"), ("alignkit", "other-vocabulary")], ids=["recipe", "cli"]
)
def test_distill_bad_input_exits_2_without_a_traceback(entry, case, tmp_path):
    """``python recipes/distill.py`` (what ``accelerate launch`` runs) and ``alignkit distill``: one message naming
    the key, or the file and row, and the fix; exit 2, no traceback, nothing written."""
    if case == "bad-row":
        row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        good = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}]}
        data, teacher = write_jsonl(tmp_path / "data.jsonl", [good, row]), "tiny:llama"
        expected = f"{data}, row 2: the prompt ends on an assistant turn"
    else:
        data, teacher = write_jsonl(tmp_path / "data.jsonl", [ROW] * 2), "tiny:gemma3"
        expected = "teacher_model_name_or_path: 'tiny:gemma3' has another vocabulary"
    head = (
        [sys.executable, entry] if entry.startswith("recipes/") else [sys.executable, "-m", "alignkit.cli", "distill"]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*head, *DISTILL, "--teacher_model_name_or_path", teacher, "--datasets", str(data),
                           "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "Fix:" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()

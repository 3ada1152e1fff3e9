"""Every task trains through recipes/task.py on the tiny models, 4-bit QLoRA and full precision: loss falls, the
task's metrics are reported, and the saved run holds them."""

import json

import pytest
from conftest import run_recipe, train_losses

METRICS = {
    "ner": ("eval_f1", "eval_precision", "eval_recall"),
    "cls": ("eval_accuracy", "eval_macro_f1"),
    "qa": ("eval_exact_match", "eval_f1"),
    "mlm": ("eval_perplexity", "before_perplexity"),
    "seq2seq": ("eval_bleu", "eval_rouge1", "eval_rougeL"),
}
# 4-bit: QLoRA (adapters + head); full: full-precision weights, all trained.
PRECISIONS = {
    "4bit": ["--load_in_4bit", "true", "--learning_rate", "1e-2"],
    "full": ["--load_in_4bit", "false", "--use_peft", "false", "--learning_rate", "3e-3"],
}
STEPS = 8
TASK_KEYS = {"ner": "token_cls", "cls": "seq_cls"}  # recipe file name -> task key


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("task", list(METRICS))
def test_task_trains_and_reports_its_metrics(tmp_path, task, precision):
    out = tmp_path / f"{task}-{precision}"
    # one fixed batch of 16 rows, seen every step: the loss must fall as the model fits it
    argv = f"--config recipes/tiny/task_{task}.yaml --output_dir {out} --max_steps {STEPS} --max_train_samples 16"
    argv += " --per_device_train_batch_size 16 --max_eval_samples 8 --disable_tqdm true"
    metrics = run_recipe("task", argv.split() + PRECISIONS[precision])
    losses = train_losses(out)
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, f"loss did not fall: {losses}"
    for key in METRICS[task]:
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
    lineage = json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]
    assert lineage["task"] == TASK_KEYS.get(task, task)
    if task == "mlm":  # the same masked eval tokens, scored before and after training
        assert metrics["eval_perplexity"] < metrics["before_perplexity"]

"""The console summary every stage and task run ends with (rank 0): its metrics before and after, where the outputs
are and the commands to use them next. Built only from the metrics the run records (``alignkit_run.json``), so a
new stage or head gets it without code of its own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Trainer bookkeeping, not results
_NOT_RESULTS = (
    "runtime", "samples_per_second", "steps_per_second", "epoch", "total_flos", "wall_seconds", "preparation_time",
    "num_tokens",
)  # fmt: skip


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, before, after)`` rows: every ``eval_X`` (after training) next to its ``before_X`` (the untrained
    model, when the stage evaluated it, or the step-0 evaluation of ``eval_on_start``), the headline metrics first
    (the eval split's loss last, named so), then ``train_loss``."""
    names: list[str] = []
    for key in metrics:
        for prefix in ("before_", "eval_"):
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name not in names and not any(name.endswith(n) for n in _NOT_RESULTS):
                    names.append(name)
    names.sort(key=lambda n: n == "loss")  # stable: the task's own metrics first, in the order they were logged
    rows = [(n if n != "loss" else "loss (eval split)", _number(metrics.get(f"before_{n}", "-")),
             _number(metrics.get(f"eval_{n}", "-"))) for n in names]  # fmt: skip
    # tool-use GRPO: the share of rollouts that ran a tool (alignkit.train.tools)
    if "train_tools/used_ratio" in metrics:
        rows.append(("tools/used_ratio (train mean)", "-", _number(metrics["train_tools/used_ratio"])))
    if "train_loss" in metrics:
        rows.append(("train_loss (mean)", "-", _number(metrics["train_loss"])))
    return rows


def next_commands(
    output_dir: Path, head: str, adapter: bool, pipeline_task: str | None, auto_class: str | None = None,
    inference: dict | None = None,
) -> list[str]:  # fmt: skip
    """What to run on the output: merge an adapter, then chat / eval (causal LMs) or a transformers pipeline.
    ``inference``: how the run says its model is used (the run record's ``inference``): a pipeline gets its
    ``aggregation_strategy``; qa's predict reads its windows from the merged model's run record itself."""
    out = str(output_dir)
    merged = f"{out}-merged" if adapter else out
    commands = [f"alignkit merge {out}        # standalone model in {merged}"] if adapter else []
    if head == "causal_lm":
        commands += [
            f"alignkit chat {out}",
            f"alignkit eval {out} --data held_out.jsonl --metric exact",
        ]
    elif pipeline_task:
        aggregation = (inference or {}).get("aggregation_strategy")
        extra = f", aggregation_strategy='{aggregation}'" if aggregation else ""
        commands.append(
            f"python -c \"from transformers import pipeline; p = pipeline('{pipeline_task}', model='{merged}'{extra})\""
        )
    elif head == "qa":  # transformers 5 removed its question-answering pipeline
        commands.append(
            f"python -c \"from alignkit.tasks.qa import predict; from transformers import AutoModelForQuestionAnswering as M, AutoTokenizer as T; print(predict(M.from_pretrained('{merged}'), T.from_pretrained('{merged}'), 'question?', 'context'))\""
        )
    elif auto_class:
        commands.append(
            f"python -c \"from transformers import {auto_class}; m = {auto_class}.from_pretrained('{merged}')\""
        )
    if adapter:
        commands.append(f"python -c \"from alignkit.models import load_trained; model, tok = load_trained('{out}')\"")
    return commands


def run_summary(
    stage: str,
    head: str,
    metrics: dict[str, Any],
    output_dir: Path,
    adapter: bool,
    pipeline_task: str | None = None,
    steps: int | None = None,
    new_head: bool = False,
    auto_class: str | None = None,
    data: dict | None = None,
    inference: dict | None = None,
) -> str:
    """The summary text (see the module docstring). ``adapter``: the output is a LoRA adapter (plus trained head);
    ``steps``: optimizer steps run; ``new_head``: the head was trained in full next to the adapter; ``pipeline_task``
    / ``auto_class``: how transformers loads the (merged) model; ``data``: what loading the data found (the eval
    split's sources, rows skipped by ``on_bad_rows: skip``); ``inference``: how the model is used (the record's)."""
    seconds = metrics.get("train_wall_seconds")
    name = stage if head in (stage, "causal_lm") or stage != "task" else f"{stage} {head}"  # task runs name their head
    lines = [f"== alignkit {name}: finished" + (f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else "")]
    rows = metric_rows(metrics)
    if rows:
        width = max(len(r[0]) for r in rows)
        lines.append(f"  {'metric':<{width}}  {'before':>10}  {'after':>10}")
        lines += [f"  {n:<{width}}  {b:>10}  {a:>10}" for n, b, a in rows]
    else:
        lines.append("  no held-out metrics (the recipe has no test split: set test_size to measure one)")
    data = data or {}
    held = data.get("held_out") or {}
    if held.get("rows"):
        lines.append(f"  eval split: {held['rows']} rows from {', '.join(held.get('sources') or ['test_size'])}")
    if data.get("skipped_rows"):
        lines.append(
            f"  skipped rows (on_bad_rows: skip): {data['skipped_rows']}, listed in alignkit_run.json (data.skipped)"
        )
    what = "LoRA adapter" + (" + trained head" if new_head else "") if adapter else "full model weights"
    lines.append(f"  outputs: {output_dir} ({what}; metrics in alignkit_run.json, model card README.md)")
    if steps:
        lines.append(f"  steps: {steps}")
    lines.append("  next:")
    lines += [f"    {c}" for c in next_commands(Path(output_dir), head, adapter, pipeline_task, auto_class, inference)]
    return "\n".join(lines)

"""Task heads: every shipped task recipe's held-out metrics and time, each recipe in its own child process.

    python benchmarks/tasks.py                                              # the five tiny recipes
    flock /tmp/alignkit-heavy.lock python benchmarks/tasks.py --minilm     # all-MiniLM-L6-v2: NER, topics, QA
    python benchmarks/tasks.py --recipes recipes/minilm/qa.yaml            # chosen recipes

Wall time covers the whole recipe (load, tokenize, train, evaluate, save); train time is the trainer's own; peak
MiB is the child process's peak RSS (imports, model, data and training: what the recipe needs on a CPU), and the
load average is read as each child ends (1 min), as the machine is shared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import harness
import yaml

TINY = [f"recipes/tiny/task_{name}.yaml" for name in ("ner", "cls", "qa", "mlm", "seq2seq")]
MINILM = [f"recipes/minilm/{name}.yaml" for name in ("ner", "cls", "qa")]
# task: the metrics the table shows, headline first
METRICS = {
    "token_cls": ("eval_f1", "eval_precision", "eval_recall"),
    "seq_cls": ("eval_accuracy", "eval_macro_f1"),
    "qa": ("eval_exact_match", "eval_f1"),
    "mlm": ("eval_perplexity", "before_perplexity"),
    "seq2seq": ("eval_bleu", "eval_rougeL"),
}


def child(recipe: str) -> None:
    config = yaml.safe_load((harness.REPO / recipe).read_text())
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        metrics = harness.run_recipe("task", ["--config", recipe, "--output_dir", out, "--disable_tqdm", "true"])
        wall = time.time() - started
    shown = ", ".join(
        f"{k.split('_', 1)[1] if k.startswith('eval_') else k} {metrics[k]:.3f}" for k in METRICS[config["task"]]
    )
    harness.emit(
        {
            "task": config["task"],
            "model": config["model_name_or_path"],
            "precision": "4-bit QLoRA" if config.get("load_in_4bit") else "full",
            "steps": round(metrics["train_runtime"] * metrics["train_steps_per_second"]),
            "wall_s": wall,
            "train_s": metrics["train_runtime"],
            "samples_per_s": metrics["train_samples_per_second"],
            "metrics": shown,
            "peak_mib": harness.peak_memory_mib(),
            "load": harness.load_average().split("/")[0],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minilm", action="store_true", help="the all-MiniLM-L6-v2 recipes instead of the tiny ones")
    parser.add_argument("--recipes", nargs="+", help="these task recipes instead")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    rows = harness.run_variants(__file__, args.recipes or (MINILM if args.minilm else TINY), [])
    print(harness.machine())
    columns = [("recipe", "variant", ""), ("task", "task", ""), ("model", "model", ""), ("precision", "precision", "")]
    columns += [
        ("steps", "steps", "d"),
        ("wall s", "wall_s", ".1f"),
        ("train s", "train_s", ".1f"),
        ("rows/s", "samples_per_s", ".1f"),
        ("peak MiB", "peak_mib", ".0f"),
        ("load", "load", ""),
        ("held-out metrics", "metrics", ""),
    ]
    print(harness.table(rows, columns))


if __name__ == "__main__":
    sys.exit(main())

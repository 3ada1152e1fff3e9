"""Golden trajectories: what each stage's recipe computes, step by step, on the tiny model (fixed seed and data, CPU,
fp32), pinned in ``golden.json`` next to this file.

Each run passes only what makes it small (model, data, steps, batch, learning rate); everything else is alignkit's
default, so a changed default (lr schedule, warmup, optimizer, loss normalisation, LoRA settings, packing) changes the
numbers and fails the suite. Regenerate after an intended change with ``python -m tests.regression.regenerate`` and
review the diff of golden.json.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden.json")
RTOL, ATOL = 1e-4, 1e-6  # CPU fp32 is bitwise reproducible here; the slack absorbs other CPUs' kernels
SIGNIFICANT_DIGITS = 7


@dataclass(frozen=True)
class GoldenRun:
    name: str
    stage: str  # recipes/<stage>.py
    args: str  # its command line, on top of _COMMON
    metrics: tuple[str, ...] = ("loss", "grad_norm", "learning_rate")  # keys of the trainer's per-step log entries

    @property
    def argv(self) -> list[str]:
        return shlex.split(f"{self.args} {_COMMON}")

    @property
    def command(self) -> str:
        return f"python recipes/{self.stage}.py {self.args} {_COMMON}"


_COMMON = "--max_steps 8 --learning_rate 5e-3 --seed 42 --disable_tqdm true"
_D = "recipes/tiny/data"
_DPO_METRICS = ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins")
_SFT_METRICS = ("loss", "grad_norm", "learning_rate", "num_tokens")
_TASK = "--per_device_train_batch_size 8 --model_name_or_path"

RUNS = (
    GoldenRun(
        "cpt",
        "cpt",
        f"--model_name_or_path tiny:llama --datasets [{_D}/cpt.jsonl] --per_device_train_batch_size 4 --block_size 64",
    ),
    GoldenRun(
        "sft",
        "sft",
        f"--model_name_or_path tiny:llama --datasets [{_D}/sft.jsonl] --per_device_train_batch_size 4",
        _SFT_METRICS,
    ),
    GoldenRun(
        "sft_qlora_assistant_only",
        "sft",
        f"--model_name_or_path tiny:llama --datasets [{_D}/sft.jsonl] --per_device_train_batch_size 4 --load_in_4bit true "
        "--assistant_only_loss true",
        _SFT_METRICS,
    ),
    GoldenRun(
        "dpo",
        "dpo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/dpo.jsonl] --per_device_train_batch_size 4",
        _DPO_METRICS,
    ),
    GoldenRun(
        "task_seq_cls",
        "task",
        f"--task seq_cls {_TASK} tiny:bert --datasets [{_D}/tasks/cls.jsonl] --max_length 64 --label_list '[sports, food, tech]'",
    ),
    GoldenRun(
        "task_token_cls",
        "task",
        f"--task token_cls {_TASK} tiny:bert --datasets [{_D}/tasks/ner.jsonl] --max_length 64 "
        "--label_list '[O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG]'",
    ),
    GoldenRun(
        "task_qa",
        "task",
        f"--task qa {_TASK} tiny:bert --datasets [{_D}/tasks/qa.jsonl] --max_length 64 --doc_stride 16",
    ),
    GoldenRun(
        "task_mlm",
        "task",
        f"--task mlm {_TASK} tiny:bert --datasets [{_D}/tasks/mlm.jsonl] --max_length 64 --remove_unused_columns false",
    ),
    GoldenRun(
        "task_seq2seq",
        "task",
        f"--task seq2seq {_TASK} tiny:bart --datasets [{_D}/tasks/seq2seq.jsonl] --max_length 32 --max_target_length 32",
    ),
)
RUNS_BY_NAME = {r.name: r for r in RUNS}


def run_recipe(stage: str, argv: list[str]):
    """Run ``recipes/<stage>.py`` in this process, as ``accelerate launch`` does with one process."""
    cwd = os.getcwd()
    os.chdir(REPO)  # recipes name their data relative to the repo root
    try:
        return runpy.run_path(str(REPO / "recipes" / f"{stage}.py"), run_name="alignkit_recipe")["main"](argv)
    finally:
        os.chdir(cwd)


def trajectory(run: GoldenRun, output_dir: Path) -> dict[str, list[float]]:
    """Train ``run`` into ``output_dir`` and return its per-step metrics, rounded as stored."""
    run_recipe(run.stage, [*run.argv, "--output_dir", str(output_dir), "--overwrite_output_dir", "true"])
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    return {key: [_round(entry[key]) for entry in steps] for key in run.metrics}


def _round(value: float) -> float:
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"runs": {}}


def save_golden(runs: dict[str, dict]) -> None:
    """One value per line and sorted keys, so that a regenerated file reads as a step-by-step diff."""
    from importlib.metadata import version

    golden = {
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "regenerate": "python -m tests.regression.regenerate",
        "generated_with": {
            p: version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes")
        },
        "runs": runs,
    }
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def mismatches(name: str, golden: dict, now: dict[str, list[float]]) -> list[str]:
    """Human-readable differences between a stored and a fresh trajectory (empty when they agree)."""
    problems = []
    for key in sorted(set(golden) | set(now)):
        want, got = golden.get(key), now.get(key)
        if want is None or got is None or len(want) != len(got):
            problems.append(f"{name}/{key}: golden {want} vs now {got}")
            continue
        bad = [i for i, (w, g) in enumerate(zip(want, got)) if not math.isclose(g, w, rel_tol=RTOL, abs_tol=ATOL)]
        if bad:
            steps = ", ".join(f"step {i + 1}: {want[i]} -> {got[i]}" for i in bad)
            problems.append(f"{name}/{key} differs at {len(bad)}/{len(want)} steps ({steps})")
    return problems

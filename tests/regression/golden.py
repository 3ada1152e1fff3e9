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
# Goldens are fp32 on every CPU: 'auto' must not turn into bf16 mixed precision on a CPU with bf16 units (AMX,
# AVX512-BF16), here and in the processes regenerate.py and spread.py start (they inherit the environment).
os.environ["ALIGNKIT_CPU_AMP"] = "off"
GOLDEN = Path(__file__).with_name("golden.json")
SIGNIFICANT_DIGITS = 7
# Per metric (rtol, atol), derived from `python -m tests.regression.spread`: the largest relative difference between
# numerics variants of one CPU (oneDNN/MKL/ATen at AVX-512+AMX vs capped at AVX2, 1 vs 2 threads) at any step of any
# run, times a safety factor of at least 10 (the measured figures are in the closing note of issue 15 and in
# tests/regression/README.md). Step metrics derived from counts and the schedule alone (learning_rate, num_tokens)
# are exact on every CPU: any difference there is a changed default.
TOLERANCES: dict[str, tuple[float, float]] = {
    "loss": (1e-4, 1e-6),  # measured spread 9.0e-7 (task_seq_cls step 5)
    "grad_norm": (1e-4, 1e-6),  # measured spread 8.5e-7 (sft step 2)
    "rewards/*": (1e-3, 1e-6),  # DPO rewards/chosen, rejected, margins: measured spread 1.6e-5 (dpo step 2)
    "reward": (1e-3, 1e-6),  # GRPO's mean reward of the sampled completions (alignkit.testing.rewards)
    "learning_rate": (1e-7, 0.0),  # exact: the schedule
    "num_tokens": (0.0, 0.0),  # exact: what was trained
}
# Per run, where a loss amplifies rounding by design, derived the same way: vespo weighs each completion by a Gamma
# function of its sequence-level importance ratio (a product over its tokens), so its loss moved 1.87e-4 relative
# between AMX and AVX2 caps at 2 threads (`python -m tests.regression.spread grpo_vespo`, 2026-12-06; the suite under
# the AVX2 caps failed on 1.0e-4 at step 5), against 9.0e-7 for every other run's loss.
RUN_TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "grpo_vespo": {"loss": (2e-3, 1e-6)},  # 10.7x the measured spread
}


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
# GRPO's loss variants (docs/methods.md): the grpo run's command with the variant's keys and num_iterations 2, so that
# every second step is off-policy and the clipping, gates and sequence-level ratios act (on-policy the ratio is 1).
_GRPO_VARIANTS = {
    "dapo": "--loss_type dapo",
    "grpo": "--loss_type grpo",
    "dr_grpo": "--loss_type dr_grpo",
    "bnpo": "--loss_type bnpo --gradient_accumulation_steps 2",  # one process: bnpo == dapo unless it accumulates
    "cispo": "--loss_type cispo --epsilon_high 5.0",
    "sapo": "--loss_type sapo",
    "luspo": "--loss_type luspo --importance_sampling_level sequence",
    "vespo": "--loss_type vespo",
    "gspo": "--loss_type grpo --importance_sampling_level sequence",
}

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
        "kto",
        "kto",
        f"--model_name_or_path tiny:llama --datasets [{_D}/dpo.jsonl] --per_device_train_batch_size 4",
        _DPO_METRICS,
    ),
    GoldenRun(
        "orpo",
        "orpo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/dpo.jsonl] --per_device_train_batch_size 4",
        (*_DPO_METRICS, "nll_loss"),
    ),
    GoldenRun(
        "simpo",
        "simpo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/dpo.jsonl] --per_device_train_batch_size 4",
        _DPO_METRICS,
    ),
    GoldenRun(
        "reward",
        "reward",
        f"--model_name_or_path tiny:llama --datasets [{_D}/dpo.jsonl] --per_device_train_batch_size 8",
        ("loss", "grad_norm", "learning_rate", "margin"),
    ),
    GoldenRun(
        "grpo",
        "grpo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/grpo.jsonl] --reward_funcs alignkit.testing.rewards:plain_letters "
        "--num_generations 4 --per_device_train_batch_size 8 --max_completion_length 16 --lora_modules_to_save [lm_head]",
        ("loss", "grad_norm", "learning_rate", "reward"),
    ),
    GoldenRun(
        "rloo",
        "rloo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/grpo.jsonl] --reward_funcs alignkit.testing.rewards:plain_letters "
        "--num_generations 4 --per_device_train_batch_size 8 --max_completion_length 16 --lora_modules_to_save [lm_head]",
        ("loss", "grad_norm", "learning_rate", "reward"),
    ),
    # trl logs online DPO's loss rounded to 4 decimals: its inputs (the pair's log-ratios, rewards/*) are pinned instead
    GoldenRun(
        "online_dpo",
        "online_dpo",
        f"--model_name_or_path tiny:llama --datasets [{_D}/grpo.jsonl] --reward_funcs alignkit.testing.rewards:plain_letters "
        "--per_device_train_batch_size 4 --max_new_tokens 16 --lora_modules_to_save [lm_head]",
        ("grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins", "objective/scores"),
    ),
    # the recipe's student (4-bit + LoRA) against its own base in fp32 as the teacher: the only tiny model that shares
    # tiny:llama's vocabulary; the divergence starts at the 4-bit rounding and the adapter learns it away
    GoldenRun(
        "distill",
        "distill",
        f"--model_name_or_path tiny:llama --load_in_4bit true --teacher_model_name_or_path tiny:llama "
        f"--datasets [{_D}/grpo.jsonl] --per_device_train_batch_size 4 --max_completion_length 16 "
        "--lora_modules_to_save [lm_head]",
        ("loss", "grad_norm", "learning_rate"),
    ),
    *(
        GoldenRun(
            f"grpo_{variant}",
            "grpo",
            f"--model_name_or_path tiny:llama --datasets [{_D}/grpo.jsonl] --reward_funcs alignkit.testing.rewards:plain_letters "
            f"--num_generations 4 --per_device_train_batch_size 8 --max_completion_length 16 --lora_modules_to_save [lm_head] "
            f"--num_iterations 2 {keys}",
            ("loss", "grad_norm", "learning_rate"),  # reward: logged only at the steps that sample
        )
        for variant, keys in _GRPO_VARIANTS.items()
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
    GoldenRun(
        "embed",
        "embed",
        f"--model_name_or_path tiny:bert --datasets [{_D}/tasks/embed.jsonl] --per_device_train_batch_size 16",
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


def tolerance(key: str, run: str | None = None) -> tuple[float, float]:
    """(rtol, atol) of metric ``key`` (of golden run ``run``: RUN_TOLERANCES first)."""
    if key in RUN_TOLERANCES.get(run, {}):
        return RUN_TOLERANCES[run][key]
    if key.startswith("rewards/") or key == "margin":  # preference rewards and the reward model's margin
        return TOLERANCES["rewards/*"]
    if key == "objective/scores":  # online DPO's mean reward of the sampled completions, as GRPO's 'reward'
        return TOLERANCES["reward"]
    if key == "nll_loss":
        return TOLERANCES["loss"]
    return TOLERANCES[key]


def machine_facts() -> dict:
    """What decides the floating-point results of a run on this machine: CPU model and vendor, the instruction sets
    that matter for float kernels, what torch, oneDNN and MKL use of them (and the caps set in the environment), the
    library versions and the intra-op thread count."""
    import platform
    import re

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M)
        return match.group(1).strip() if match else platform.processor() or "unknown"

    flags = set(field("flags").split())
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    onednn = re.search(r"MKL-DNN v([\w.]+)", config)
    return {
        "cpu": field("model name"),
        "vendor": field("vendor_id"),
        "isa": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "caps": {
            k: os.environ[k]
            for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "MKL_CBWR")
            if k in os.environ
        },  # fmt: skip
        "torch": torch.__version__,
        "mkl": mkl.group(1) if mkl else None,
        "onednn": onednn.group(1) if onednn else None,
        "threads": torch.get_num_threads(),
    }


def describe_machine(facts: dict | None) -> str:
    if not facts:
        return "unknown machine (golden.json predates machine facts)"
    caps = ", ".join(f"{k}={v}" for k, v in facts.get("caps", {}).items()) or "none"
    return (
        f"{facts['cpu']} ({facts['vendor']}; {' '.join(facts['isa'])}); torch {facts['torch']} with CPU capability "
        f"{facts['cpu_capability']}, MKL {facts['mkl']}, oneDNN {facts['onednn']}; caps: {caps}; "
        f"{facts['threads']} thread(s)"
    )


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"runs": {}}


def save_golden(runs: dict[str, dict], machine: dict | None = None) -> None:
    """One value per line and sorted keys, so that a regenerated file reads as a step-by-step diff. ``machine``: the
    facts of the machine most runs were recorded on (default: this one); a run recorded elsewhere carries its own
    ``machine`` entry."""
    from importlib.metadata import version

    golden = {
        "tolerances": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES.items()},
        "regenerate": "python -m tests.regression.regenerate",
        "generated_with": {
            p: version(p)
            for p in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "tokenizers", "datasets")
        },
        "machine": machine or machine_facts(),
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
        rtol, atol = tolerance(key, name)
        bad = [i for i, (w, g) in enumerate(zip(want, got)) if not math.isclose(g, w, rel_tol=rtol, abs_tol=atol)]
        if bad:
            steps = ", ".join(f"step {i + 1}: {want[i]} -> {got[i]}" for i in bad)
            problems.append(f"{name}/{key} differs at {len(bad)}/{len(want)} steps, rtol {rtol:g} ({steps})")
    return problems

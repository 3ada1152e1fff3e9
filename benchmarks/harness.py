"""What every benchmark shares: the models, the data, one child process per variant, step timing, peak memory and the
table. Benchmarks print tables; they assert nothing about speed (tests do not time things)."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "


@dataclass(frozen=True)
class Size:
    """One model size: what alignkit's recipes call it, where plain trl loads it from, and the work per run."""

    name: str
    alignkit_name: str  # model_name_or_path for alignkit's recipes
    max_length: int  # the sequence length every variant uses (rows are built to fit, so nothing is truncated)
    batch: int  # effective batch (per device, no accumulation)
    steps: int  # the first step is warm-up; throughput is measured over the rest
    dpo_batch: int
    dpo_steps: int
    load_in_4bit: bool = False  # QLoRA (nf4, double quantization, the LM head kept out), both sides alike
    chat_template: str | None = None  # a family template for a model that has none (alignkit's chat_template key)

    def adapter(self) -> str:
        """The adapter as the tables name it."""
        return f"{'QLoRA (nf4)' if self.load_in_4bit else 'LoRA'} r{LORA['r']}"

    def alignkit_argv(self) -> list[str]:
        """What alignkit's recipe is told beyond its defaults for this model: its 4-bit load and chat format."""
        argv = ["--load_in_4bit", "true"] if self.load_in_4bit else []
        return argv + (["--chat_template", self.chat_template] if self.chat_template else [])

    def tokenizer(self):
        """The model's tokenizer, with the family's stock chat template where the model has none (what a plain trl
        user sets: ``tokenizer.chat_template = ...``)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path())
        if self.chat_template and not tokenizer.chat_template:
            from alignkit.data.chat_families import stock_template

            tokenizer.chat_template = stock_template(self.chat_template)
        return tokenizer

    def path(self) -> str:
        """A plain model directory, for the plain trl scripts."""
        if self.alignkit_name.startswith("tiny:"):
            from alignkit.testing import tiny_model_path

            return str(tiny_model_path(self.alignkit_name.split(":", 1)[1]))
        from alignkit.models.packaged import packaged_path

        return str(packaged_path(self.alignkit_name))


SIZES = {
    "tiny": Size("tiny", "tiny:llama", max_length=256, batch=8, steps=6, dpo_batch=8, dpo_steps=6),
    "smollm2": Size(
        "smollm2", "smollm2:SmolLM2-135M-Instruct", max_length=256, batch=8, steps=6, dpo_batch=4, dpo_steps=5
    ),
    # tiny:gemma3 the way gemma3 runs (QLoRA, Gemma's template installed on a model without one): the CI smoke run
    "tiny_gemma3": Size(
        "tiny_gemma3",
        "tiny:gemma3",
        max_length=128,
        batch=4,
        steps=3,
        dpo_batch=2,
        dpo_steps=3,
        load_in_4bit=True,
        chat_template="gemma3",
    ),  # fmt: skip
    # Gemma 3 270M base (docs/gemma3.md): as alignkit's demo recipes train it, QLoRA in Gemma's own chat format;
    # batch 4 x 256 tokens (the size issue 38 states peak RSS at); a step costs ~4x SmolLM2's
    "gemma3": Size(
        "gemma3",
        "gemma3:gemma-3-270m",
        max_length=256,
        batch=4,
        steps=5,
        dpo_batch=2,
        dpo_steps=5,
        load_in_4bit=True,
        chat_template="gemma3",
    ),  # fmt: skip
}

LORA = dict(
    r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"
)  # = alignkit's AdapterArguments defaults
LEARNING_RATE = 2e-4
SEED = 42


# ------------------------------------------------------------------------------------------------------------- data
def sft_rows(tokenizer, max_length: int, n: int = 256, seed: int = 0) -> list[dict]:
    """Chat rows whose token lengths spread from ~1/5 of max_length up to max_length, as real SFT data does (the demo's
    rows are all alike, which would hide what padding costs). Rows that would not fit are dropped, so no variant
    truncates and all of them train on the same tokens."""
    from alignkit.demo.data import prompt_messages

    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        steps = " ".join(f"Step {k}: {a} + {b} = {a + b}." for k in range(1, rng.randint(1, 16)))
        messages = [*prompt_messages(a, b), {"role": "assistant", "content": f"{steps}\nANSWER: {a + b}".strip()}]
        if len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) <= max_length:
            rows.append({"messages": messages})
    return rows


def dpo_rows(n: int = 128) -> list[dict]:
    from alignkit.demo.data import make_rows

    return make_rows(n_train=n, n_eval=8, n_dpo_test=8)["dpo"][:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------------- measuring
def step_timer():
    """A callback that stamps the end of every optimizer step (built lazily: transformers is slow to import)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time over all its threads)

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()
            _stamp_file("begin")

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append((time.perf_counter(), time.process_time()))
            _stamp_file(f"step {state.global_step}")

    return StepTimer()


STEPS_FILE = "BENCH_STEPS_FILE"  # where a child stamps its training start and each step (read by a time box)


def _stamp_file(event: str) -> None:
    if path := os.environ.get(STEPS_FILE):
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {event}\n")


def _read_stamps(path: Path) -> tuple[float | None, int]:
    """(wall time training began, or None; steps done) from a child's stamp file."""
    begin, steps = None, 0
    if path.exists():
        for line in path.read_text().splitlines():
            stamp, event = line.split(" ", 1)
            if event == "begin":
                begin = float(stamp)
            elif event.startswith("step"):
                steps += 1
    return begin, steps


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def peak_memory_mib() -> float:
    """Peak device memory on GPU, else this process's peak RSS (imports included: the same for every variant)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_parameters(model) -> tuple[int, int]:
    """(frozen, trainable) parameters that enter matmuls: every Linear weight, LoRA's included; embeddings are lookups
    and not counted, a tied lm_head is (it is a matmul)."""
    import torch

    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.weight.numel()
            if module.weight.requires_grad:
                trainable += n
            else:
                frozen += n
        elif type(module).__name__ == "Linear4bit":  # bitsandbytes packs two 4-bit weights per byte
            frozen += module.in_features * module.out_features
    return frozen, trainable


def train_measurements(trainer, timer, batch: int) -> dict:
    """Steady-state throughput over steps 2..N (step 1 is warm-up), from the trainer's own logs. Per wall second and
    per CPU second: on a shared machine a neighbour's load stretches wall time far more than CPU time."""
    logs = [e for e in trainer.state.log_history if "loss" in e]
    (wall_0, cpu_0), (wall_n, cpu_n) = timer.stamps[0], timer.stamps[-1]
    seconds, cpu_seconds = wall_n - wall_0, cpu_n - cpu_0
    steps = len(timer.stamps) - 1
    result = {
        "steps_timed": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "samples_per_s": steps * batch / seconds,
        "samples_per_cpu_s": steps * batch / cpu_seconds,
        "final_loss": logs[-1]["loss"],
        "losses": [round(e["loss"], 4) for e in logs],
        "peak_mib": peak_memory_mib(),
        "bf16": bool(trainer.args.bf16),
        "threads": torch_threads(),  # as the run trained: alignkit.speedups.cpu.fit_cpu_threads may lower torch's count
    }
    if "num_tokens" in logs[-1]:  # trl counts non-padding tokens (attention mask, or positions when padding-free)
        tokens = logs[-1]["num_tokens"] - logs[0]["num_tokens"]
        result.update(tokens_per_s=tokens / seconds, tokens_per_cpu_s=tokens / cpu_seconds)
    frozen, trainable = matmul_parameters(trainer.model)
    quantized = sum(m.in_features * m.out_features for m in trainer.model.modules() if type(m).__name__ == "Linear4bit")
    result.update(frozen_params=frozen, trainable_params=trainable, quantized_params=quantized)
    return result


@contextmanager
def timed_alignkit_trainer(timer, extra=None):
    """Let alignkit's recipe run untouched, but time its trainer: Run.train gets the timer callback first (and
    ``extra``, another callback, if given). Yields a dict that holds the trainer afterwards."""
    from alignkit.train import runner

    captured = {}
    original = runner.Run.train

    def timed_train(self, trainer, *args, **kwargs):
        trainer.add_callback(timer)
        if extra is not None:
            trainer.add_callback(extra)
        captured["trainer"] = trainer
        return original(self, trainer, *args, **kwargs)

    runner.Run.train = timed_train
    try:
        yield captured
    finally:
        runner.Run.train = original


def run_recipe(stage: str, argv: list[str]):
    import runpy

    return runpy.run_path(str(REPO / "recipes" / f"{stage}.py"), run_name="alignkit_recipe")["main"](argv)


# ------------------------------------------------------------------------------------------------- process tree
def run_variants(
    script: str, variants: list[str], common: list[str], repeats: int = 1, in_process=None,
    time_box: float | None = None, batch: int | None = None,
) -> list[dict]:  # fmt: skip
    """Each variant in its own child process (clean peak memory, no shared caches), one after the other, ``repeats``
    rounds interleaved (A B C A B C): on a shared machine a neighbour's burst hits one run, not one variant. A row keeps
    its fastest round (``rate``) and lists every round's rate. With ``in_process`` (a function variant -> result), run
    them here instead: the CI smoke run, where time is short.

    ``time_box``: seconds of training a child may take (after its model and data load); one still training then is
    stopped, and its row says how many steps it finished in that time (``time_boxed``): its rates are upper bounds
    (``batch`` x (steps done + 1) rows in the box's seconds, as if the next step ended at that moment), so alignkit's
    ratios over it are lower bounds."""
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            if in_process is not None:
                rounds[variant].append(in_process(variant))
                continue
            rounds[variant].append(_run_child(script, variant, common, time_box, batch))
    rows = []
    for variant, results in rounds.items():
        best = max(results, key=lambda r: r["samples_per_s"])
        rows.append({"variant": variant, **best, "rounds": "/".join(f"{r['samples_per_s']:.2f}" for r in results)})
    finished = [r for r in rows if not r.get("time_boxed") and r.get("tokens_per_s")]
    for row in rows:  # the same rows, so a finished variant's tokens per row bound a stopped one's tokens/s
        if row.get("time_boxed") and finished:
            row["tokens_per_s"] = row["samples_per_s"] * finished[0]["tokens_per_s"] / finished[0]["samples_per_s"]
    return rows


def _run_child(script: str, variant: str, common: list[str], time_box: float | None, batch: int | None) -> dict:
    import tempfile

    cmd = [sys.executable, script, "--child", variant, *common]
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-stamps-") as tmp:
        stamps = Path(tmp) / "steps"
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, STEPS_FILE: str(stamps)})  # fmt: skip
        boxed = None
        while True:
            try:
                out, err = proc.communicate(timeout=None if time_box is None else 2)
                break
            except subprocess.TimeoutExpired:
                begin, steps = _read_stamps(stamps)
                if begin is not None and time.time() - begin > time_box:
                    seconds = time.time() - begin
                    proc.kill()
                    out, err = proc.communicate()
                    boxed = {"time_boxed": True, "steps_done": steps, "seconds": seconds}
                    break
    if boxed is not None:
        rate = (boxed["steps_done"] + 1) * (batch or 1) / boxed["seconds"]
        return {**boxed, "samples_per_s": rate}
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(out[-4000:] + err[-8000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], steps: int) -> None:
    """The table, then the footnote of any time-boxed row."""
    print(table(rows, columns))
    if note := boxed_note(rows, steps):
        print(note)


def boxed_note(rows: list[dict], steps: int) -> str:
    """The footnote for time-boxed rows ('' when none)."""
    notes = [
        f"{r['variant']}: stopped after {r['seconds']:.0f} s of training with {r['steps_done']} of {steps} steps done "
        "(rates are upper bounds: as if its next step ended then; alignkit's ratios over it are lower bounds)"
        for r in rows
        if r.get("time_boxed")
    ]
    return "\n".join(["time-boxed: " + n for n in notes])


def train_plain_trl(stage: str, size: Size, data: Path, out: Path, steps: int, batch: int, settings: dict):
    """What a user writes with trl alone: load, LoraConfig, <Stage>Config, <Stage>Trainer, train. Returns the trainer
    and its measurements."""
    import datasets
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config_cls, trainer_cls = {"sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer)}[stage]
    quantization = None
    if size.load_in_4bit:  # alignkit's QuantizationArguments defaults; 4-bit compute in the run's precision
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if settings.get("bf16", True) else torch.float32,
            llm_int8_skip_modules=["lm_head"],
        )  # fmt: skip
    transformers.set_seed(SEED)
    args = config_cls(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LEARNING_RATE,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, disable_tqdm=True, **settings,
    )  # fmt: skip
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(size.path(), quantization_config=quantization),
        args=args,
        train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
        processing_class=size.tokenizer(),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    return trainer, train_measurements(trainer, timer, batch)


def train_alignkit(
    stage: str, size: Size, data: Path, out: Path, steps: int, batch: int, argv: list[str] = (), timer=None
):
    """alignkit's recipe with nothing but the shared work set (and ``argv``): every other setting is its default.
    ``timer``: one more callback for the trainer (the profiler's window). Returns the trainer and its measurements."""
    extra, timer = timer, step_timer()
    argv = [
        "--model_name_or_path", size.alignkit_name, "--datasets", f"[{data}]", *size.alignkit_argv(), *argv,
        "--per_device_train_batch_size", str(batch), "--max_steps", str(steps),
        "--learning_rate", str(LEARNING_RATE), "--seed", str(SEED), "--disable_tqdm", "true",
        "--output_dir", str(out), "--overwrite_output_dir", "true",
    ]  # fmt: skip
    with timed_alignkit_trainer(timer, extra) as captured:
        run_recipe(stage, argv)
    trainer = captured["trainer"]
    return trainer, train_measurements(trainer, timer, batch)


# Opt-in variants that isolate the CPU allocator setting (alignkit.speedups.cpu.fit_cpu_allocator) in one interleaved
# table: alignkit with glibc's malloc defaults, and trl tuned with alignkit's mallopt settings (what a user who tunes
# the allocator for trl by hand, e.g. GLIBC_TUNABLES or a preloaded jemalloc, would get).
ALLOCATOR_VARIANTS = {"alignkit_glibc_malloc": "alignkit", "trl_tuned_mallopt": "trl_tuned"}


def allocator_variant(variant: str) -> str:
    """In a child process, before anything trains: apply an ALLOCATOR_VARIANTS setting; returns the variant it runs."""
    if variant == "alignkit_glibc_malloc":
        os.environ["ALIGNKIT_CPU_ALLOCATOR"] = "system"
    elif variant == "trl_tuned_mallopt":
        from alignkit.speedups.cpu import fit_cpu_allocator

        if not fit_cpu_allocator():
            raise SystemExit("trl_tuned_mallopt: the allocator settings do not apply here (GPU, not glibc, or set)")
    return ALLOCATOR_VARIANTS.get(variant, variant)


def variant_parser(doc: str, variants: list[str]) -> argparse.ArgumentParser:
    """The command line every comparison script shares; --child/--data/--work are how it calls itself per variant.
    ``--variants`` defaults to ``variants``; ALLOCATOR_VARIANTS can be named too (children only)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default: the size's)")
    choices = [*variants, *(v for v, base in ALLOCATOR_VARIANTS.items() if base in variants)]
    parser.add_argument("--variants", nargs="+", choices=choices, default=list(variants))
    parser.add_argument("--repeats", type=int, default=2, help="rounds per variant, interleaved; the fastest is shown")
    parser.add_argument("--time_box", type=float, help="seconds of training per child; a slower one is stopped "
                        "and shown as a bound (e.g. bf16 on a CPU without bf16 units)")  # fmt: skip
    parser.add_argument("--child", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser


def add_ratios(rows: list[dict], rate: str) -> None:
    """alignkit's row over each row: throughput (``rate`` per wall and per CPU second), peak memory, final loss."""
    mine = next((r for r in rows if r["variant"] == "alignkit"), None)
    if mine is None:
        return
    cpu_rate = rate.replace("_per_s", "_per_cpu_s")

    def ratio(key):
        return mine[key] / row[key] if mine.get(key) and row.get(key) else None

    for row in rows:  # a time-boxed row has rates only (no CPU time, memory or loss)
        row.update(
            speedup=ratio(rate), cpu_speedup=ratio(cpu_rate), memory_ratio=ratio("peak_mib"),
            loss_ratio=ratio("final_loss"),
        )  # fmt: skip


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format). Missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for _, k, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags() -> str:
    """The matmul-relevant ISA flags this CPU reports (avx2, fma, avx512f, avx512_bf16, amx_bf16...), plus the caps set
    in the environment (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY) and ATen's own kernel level."""
    import torch

    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(x for x in text.splitlines() if x.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    present = [f for f in wanted if f in flags] or ["unknown"]
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if k in os.environ]
    cap = f"; capped: {' '.join(caps)}" if caps else ""
    return f"{' '.join(present)}{cap}; ATen kernels {torch.backends.cpu.get_cpu_capability()}"


# What an AVX2-only CPU runs (no AVX-512, no AMX: no bf16 units), set before torch is imported: oneDNN, MKL and
# ATen's own kernels capped at AVX2
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ISA_CAPS = tuple(AVX2_CAPS)


def fast_bf16() -> bool:
    """bf16 autocast pays here: a GPU with bf16, or a CPU where alignkit's 'auto' rule (bf16 units and a GEMM probe,
    alignkit.runtime.cpu_mixed_precision) picks bf16 mixed precision. What "tuned" trl rows use."""
    import torch

    from alignkit import runtime

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return runtime.cpu_mixed_precision()["bf16"]


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine(load_at_start: str | None = None) -> str:
    """The header line of every table: device, CPU model, ISA flags, threads, load average (1/5/15 min; also at the
    start of the measurement when given), torch."""
    import torch

    load = f"load average {load_average()}" + (f" (at start {load_at_start})" if load_at_start else "")
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {load}"
    return (
        f"CPU {cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
        f"ISA {isa_flags()}, {load}, torch {torch.__version__}"
    )

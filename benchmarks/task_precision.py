"""Task heads on all-MiniLM-L6-v2: step time of 4-bit QLoRA vs LoRA on full-precision (fp32) weights vs full
fine-tuning, on generated data in the published formats (a CoNLL column file for NER, a SQuAD v1.1 JSON for QA),
each variant in its own child process, the shipped MiniLM recipe otherwise unchanged.

    flock /tmp/alignkit-heavy.lock python benchmarks/task_precision.py [--steps 9] [--repeats 2]

Step time is the steady state over steps 2..N (step 1 warms up), wall and CPU seconds. The header names the CPU
model, its ISA flags, torch threads and the load average (a shared machine stretches wall time, not CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness

VARIANTS = {
    "ner-4bit": ("ner", ["--load_in_4bit", "true"]),
    "ner-lora-fp32": ("ner", ["--load_in_4bit", "false"]),
    "ner-full-fp32": ("ner", ["--load_in_4bit", "false", "--use_peft", "false", "--learning_rate", "5e-5"]),
    "qa-4bit": ("qa", ["--load_in_4bit", "true"]),
    "qa-lora-fp32": ("qa", ["--load_in_4bit", "false"]),
    "qa-full-fp32": ("qa", ["--load_in_4bit", "false", "--use_peft", "false", "--learning_rate", "5e-5"]),
}
TASK_DATA = harness.REPO / "recipes" / "tiny" / "data" / "tasks"


def write_conll(path: Path) -> Path:
    """recipes/tiny/data/tasks/ner.jsonl as a CoNLL-2003-style file: word POS chunk NER, IOB1 tags, -DOCSTART-."""
    from alignkit.data.file_formats import iob1_to_iob2

    lines = ["-DOCSTART- -X- -X- O", ""]
    for row in map(json.loads, (TASK_DATA / "ner.jsonl").read_text().splitlines()):
        tags = row["ner_tags"]
        assert iob1_to_iob2(tags) == tags
        iob1, previous = [], "O"  # B- only where an entity follows one of the same type, as CoNLL-2003 ships
        for tag in tags:
            iob1.append("I-" + tag[2:] if tag.startswith("B-") and previous[2:] != tag[2:] else tag)
            previous = tag
        lines += [f"{w} NN I-NP {t}" for w, t in zip(row["tokens"], iob1)] + [""]
    path.write_text("\n".join(lines))
    return path


def write_squad(path: Path) -> Path:
    """recipes/tiny/data/tasks/qa_large.jsonl as SQuAD v1.1 JSON (data[].paragraphs[].qas[])."""
    rows = [json.loads(line) for line in (TASK_DATA / "qa_large.jsonl").read_text().splitlines() if line.strip()]
    paragraphs = [
        {"context": r["context"], "qas": [{"id": str(i), "question": r["question"], "answers": [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "generated", "paragraphs": paragraphs}]}))
    return path


def child(variant: str, steps: int) -> None:
    task, argv = VARIANTS[variant]
    timer = harness.step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_conll(Path(tmp) / "train.conll") if task == "ner" else write_squad(Path(tmp) / "train.json")
        args = ["--config", f"recipes/minilm/{task}.yaml", "--datasets", str(data), "--output_dir", f"{tmp}/out"]
        args += ["--max_steps", str(steps), "--disable_tqdm", "true", "--save_strategy", "no", "--test_size", "16"]
        with harness.timed_alignkit_trainer(timer) as captured:
            harness.run_recipe("task", args + argv)
        trainer = captured["trainer"]
        result = harness.train_measurements(trainer, timer, trainer.args.per_device_train_batch_size)
    result["s_per_step"] = result["seconds"] / result["steps_timed"]
    result["cpu_s_per_step"] = result["cpu_seconds"] / result["steps_timed"]
    harness.emit(result)


def header() -> str:
    import platform

    import torch

    flags = ""
    model = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        present = set(next(line for line in info.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        flags = " ".join(
            f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in present
        )
    except (OSError, StopIteration):
        pass
    isa = os.environ.get("ATEN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"CPU {model}; ISA flags: {flags}; torch {torch.__version__} kernels: {isa}; {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    print(header(), flush=True)
    rows = harness.run_variants(__file__, args.variants, ["--steps", str(args.steps)], repeats=args.repeats)
    columns = [("variant", "variant", ""), ("s/step", "s_per_step", ".2f"), ("CPU s/step", "cpu_s_per_step", ".2f")]
    columns += [
        ("steps timed", "steps_timed", "d"),
        ("peak MiB", "peak_mib", ".0f"),
        ("trainable", "trainable_params", "d"),
        ("frozen", "frozen_params", "d"),
        ("rows/s per round", "rounds", ""),
    ]
    print(harness.table(rows, columns))
    print(header())


if __name__ == "__main__":
    sys.exit(main())

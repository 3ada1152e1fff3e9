"""Sentence embeddings (recipes/embed.py): held-out retrieval before and after training, time, and how far the saved
folder (plain ``SentenceTransformer(path)``; merged for LoRA) is from the model trained in memory. Each recipe runs
in its own child process.

    python benchmarks/embed.py                                              # the tiny BERT, 4-bit QLoRA and full
    flock /tmp/alignkit-heavy.lock python benchmarks/embed.py --minilm     # all-MiniLM-L6-v2, LoRA

Wall time covers the whole recipe (load, train, evaluate before and after, save, merge); train time is the trainer's.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import harness

FULL = "--load_in_4bit false --use_peft false --learning_rate 1e-3"
TINY = ["recipes/tiny/embed.yaml", f"recipes/tiny/embed.yaml {FULL}"]
MINILM = ["recipes/minilm/embed.yaml"]
R = "heldout_cosine_"


def child(variant: str) -> None:
    recipe, *extra = variant.split()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--config", recipe, "--output_dir", f"{tmp}/out", "--disable_tqdm", "true", *extra]
        started = time.time()
        m = harness.run_recipe("embed", argv)
        wall = time.time() - started
    harness.emit(
        {"wall_s": wall, "train_s": m["train_runtime"], "samples_per_s": m["train_samples_per_second"],
         "steps": round(m["train_runtime"] * m["train_steps_per_second"]),
         **{f"{when}_{k}": m[f"{when}_{R}{k}"] for when in ("before", "eval") for k in ("recall@1", "mrr@10", "ndcg@10")},
         "saved_diff": m["saved_vs_trained_max_abs_diff"]}
    )  # fmt: skip


def header() -> str:
    """harness.machine() plus the CPU model, the float ISA flags and the load: timings only mean something next to them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    isa = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{harness.machine()}\n{model.group(1) if model else '?'}; ISA: {isa or '?'}; load average (1 min) {load:.2f}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 instead of the tiny BERT")
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    rows = harness.run_variants(__file__, MINILM if args.minilm else TINY, [])
    print(header())
    columns = [
        ("recipe", "variant", ""),
        ("steps", "steps", "d"),
        ("wall s", "wall_s", ".1f"),
        ("train s", "train_s", ".1f"),
    ]
    for k in ("recall@1", "mrr@10", "ndcg@10"):
        columns += [(f"{k} before", f"before_{k}", ".3f"), (f"{k} after", f"eval_{k}", ".3f")]
    columns.append(("saved vs trained max|diff|", "saved_diff", ".2g"))
    print(harness.table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)

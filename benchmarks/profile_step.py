"""Where a training step's time goes: torch.profiler over 3 optimizer steps after warm-up, alignkit's SFT and DPO
recipes untouched (defaults), ops sorted into GEMM, attention, LoRA, loss, elementwise, optimizer, collation and
Python/framework overhead (step wall time not covered by any aten op). (Not named profile.py: in benchmarks/, which is
first on sys.path for every script there, that would shadow the standard library's ``profile``, which cProfile and
through it torch._dynamo import.)

    python benchmarks/profile_step.py --size smollm2 [--stages sft dpo] [--isa native avx2] [--attn auto ...]

Each (stage, ISA) runs in its own child process: ``avx2`` caps oneDNN, MKL and ATen's kernels at AVX2 (what a CPU
without AVX-512/AMX runs) through ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS`` and ``ATEN_CPU_CAPABILITY``,
which must be set before torch is imported.

How ops are sorted (self CPU time of each aten op, on the training thread): under ``Optimizer.step``/``zero_grad``
-> optimizer; under the DataLoader's ``__next__`` -> collation; a matmul with a dimension equal to the LoRA rank, or a
dropout -> LoRA; other matmuls -> GEMM; scaled-dot-product/flex/flash attention kernels and their backward ->
attention; inside the LM head (trl's fused one or alignkit's CPU one) or log-softmax/cross-entropy -> LM head+loss; the rest -> elementwise (norms,
activations, casts, copies, adds). Python overhead = profiled wall time - the sum of all of those.

Steps: 1 warm-up, 3 timed without the profiler ("unprofiled s/step"), then 3 profiled. torch.profiler (with shapes)
costs time per op, so the profiled step is slower than a plain one and categories of many small ops, python/other
most, read larger than they are; compare the two s/step columns before reading small shares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

ISA_CAPS = {
    "native": {},
    "avx2": harness.AVX2_CAPS,
}
CATEGORIES = ["GEMM", "attention", "LoRA", "LM head+loss", "elementwise", "optimizer", "collation", "python/other"]
WARMUP, ACTIVE = 1, 3  # the first step is warm-up (oneDNN primitives, allocator); then 3 unprofiled, 3 profiled
LORA_RANK = harness.LORA["r"]
_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm", "aten::mkldnn_mm"}
_ATTN = ("scaled_dot_product", "flash_attention", "flex_attention", "efficient_attention", "_flash_attention")
_LOSS = ("log_softmax", "cross_entropy", "nll_loss", "logsumexp", "_softmax_backward", "aten::gather")
_DROPOUT = ("dropout", "bernoulli")


def categorize(event, ancestors: list[str]) -> str:
    """The category of one aten op's self time (see the module docstring)."""
    if any(a.startswith("Optimizer.") for a in ancestors):
        return "optimizer"
    if any("DataLoader" in a or "_next_data" in a for a in ancestors):
        return "collation"
    name = event.name
    if any("LogProb" in a or "lm_head" in a for a in ancestors):  # trl's fused LM head, or alignkit's CPU one
        return "LM head+loss"
    if any(d in name for d in _DROPOUT):
        return "LoRA"
    if name in _GEMM:
        shapes = [s for s in (event.input_shapes or []) if s]
        return "LoRA" if any(LORA_RANK in s for s in shapes) else "GEMM"
    if any(a in name for a in _ATTN):
        return "attention"
    if any(a in name for a in _LOSS):
        return "LM head+loss"
    return "elementwise"


def shares(prof, wall_seconds: float) -> dict:
    """Seconds per category over the profiled steps, from the profiler's event tree."""
    events = prof.events()
    threads: dict[int, float] = {}
    for e in events:
        if e.name.startswith("aten::"):
            threads[e.thread] = threads.get(e.thread, 0.0) + e.self_cpu_time_total
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, float] = {}
    for e in events:
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        ancestors, parent = [], e.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        category = categorize(e, ancestors)
        seconds[category] += e.self_cpu_time_total / 1e6
        key = f"{category}: {e.name}"
        per_op[key] = per_op.get(key, 0.0) + e.self_cpu_time_total / 1e6
    covered = sum(seconds.values())
    # ops on other threads (autograd workers) overlap the main thread: "python/other" never goes below zero
    seconds["python/other"] = max(0.0, wall_seconds - covered)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {"seconds": seconds, "wall": wall_seconds, "threads_with_ops": len(threads), "top_ops": top}


def _label_lm_head() -> None:
    """Name the LM head's forward in the profile (its backward is the autograd node ``...LogProbBackward``): wrap the
    function trl's fused LM head calls as training starts (trl's own, or alignkit's CPU one)."""
    from torch.profiler import record_function
    from trl.trainer import utils as trl_utils

    inner = trl_utils._ChunkedLogProbFunction

    class Labelled:
        @staticmethod
        def apply(*args):
            with record_function("lm_head"):
                return inner.apply(*args)

    trl_utils._ChunkedLogProbFunction = Labelled


def profile_child(stage: str, size: harness.Size, work: Path, steps: int, extra: list[str]) -> dict:
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
    marks = {}

    class Window(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _label_lm_head()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:  # ACTIVE steps without the profiler: its own per-op cost is not small
                marks["plain_start"] = time.perf_counter()
            elif state.global_step == WARMUP + ACTIVE:
                marks["plain_end"] = marks["start"] = time.perf_counter()
                prof.start()
            elif state.global_step == WARMUP + 2 * ACTIVE:
                prof.stop()
                marks["end"] = time.perf_counter()

    timer = Window()
    if stage == "sft":
        tokenizer = size.tokenizer()
        data = harness.write_jsonl(work / "sft.jsonl", harness.sft_rows(tokenizer, size.max_length))
        argv, batch = ["--max_length", str(size.max_length), *extra], size.batch
    else:
        data = harness.write_jsonl(work / "dpo.jsonl", harness.dpo_rows())
        argv, batch = list(extra), size.dpo_batch
    trainer, result = harness.train_alignkit(stage, size, data, work / stage, steps, batch, argv, timer=timer)
    found = shares(prof, marks["end"] - marks["start"])
    return {
        **found,
        "plain_wall": marks["plain_end"] - marks["plain_start"],
        "final_loss": result["final_loss"],
        "threads": torch.get_num_threads(),  # as training ran (alignkit.speedups.cpu.fit_cpu_threads may lower it)
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def _profile_run(stage: str, isa: str, label: str, extra: str, args) -> dict:
    env = {**os.environ, **ISA_CAPS[isa]}
    cmd = [sys.executable, __file__, "--child", stage, "--size", args.size, f"--extra={extra}"]
    proc = subprocess.run(cmd, cwd=harness.REPO, env=env, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(harness.RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"profile {stage}/{isa} failed (exit {proc.returncode})")
    found = json.loads(lines[-1][len(harness.RESULT_PREFIX) :])
    name = f"{stage} {isa} ({found['isa']}){' ' + label if label else ''}"
    row = {"run": name, "wall": found["wall"], "final_loss": found["final_loss"], "top_ops": found["top_ops"]}
    row.update({c: 100 * found["seconds"][c] / found["wall"] for c in CATEGORIES})
    row["per_step"], row["threads"] = found["wall"] / ACTIVE, found["threads"]
    row["plain_per_step"] = found["plain_wall"] / ACTIVE
    print(harness.RESULT_PREFIX + json.dumps({k: v for k, v in row.items() if k != "top_ops"}), flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(harness.SIZES), default="smollm2")
    parser.add_argument("--stages", nargs="+", choices=["sft", "dpo"], default=["sft", "dpo"])
    parser.add_argument("--isa", nargs="+", choices=sorted(ISA_CAPS), default=["native", "avx2"])
    parser.add_argument("--extra", default="", help="recipe flags for every run, e.g. '--attn_implementation sdpa'")
    parser.add_argument(
        "--before",
        action="store_true",
        help="each run also with the old defaults, first (sdpa, trl LM head, torch threads, glibc malloc)",
    )
    parser.add_argument("--top", action="store_true", help="also print each run's 12 costliest ops")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    steps = WARMUP + 2 * ACTIVE
    if args.child:
        with tempfile.TemporaryDirectory(prefix="alignkit-profile-") as tmp:
            extra = args.extra.split()
            if "--old_defaults" in extra:  # before: sdpa, trl's own LM head on CPU, torch's threads, glibc's malloc
                extra.remove("--old_defaults")
                extra += ["--attn_implementation", "sdpa", "--speedups", "[padding_free]"]  # every other row off
            harness.emit(profile_child(args.child, size, Path(tmp), steps, extra))
        return []

    settings = {"": args.extra}
    if args.before:  # the old defaults first: sdpa (block-diagonal mask), trl's LM head, torch's threads, glibc malloc
        settings = {"before": f"--old_defaults {args.extra}".strip(), "after": args.extra}
    rows = []
    for stage in args.stages:
        for isa in args.isa:
            for label, extra in settings.items():
                rows.append(_profile_run(stage, isa, label, extra, args))
                if args.top:
                    print(f"{rows[-1]['run']}: top ops (% of wall): " + ", ".join(
                        f"{name} {100 * t / rows[-1]['wall']:.1f}" for name, t in rows[-1].pop("top_ops")), flush=True)  # fmt: skip
    print(f"\nProfile, {size.name} ({size.alignkit_name}), alignkit defaults {args.extra}: {ACTIVE} profiled steps after "
          f"{WARMUP} warm-up and {ACTIVE} unprofiled, % of profiled step wall time\n{harness.machine()}")  # fmt: skip
    columns = [("run", "run", "s"), ("threads", "threads", "d"), ("s/step", "per_step", ".2f")]
    columns += [("unprofiled s/step", "plain_per_step", ".2f")]
    columns += [(f"{c} %", c, ".1f") for c in CATEGORIES] + [("final loss", "final_loss", ".4f")]
    print(harness.table(rows, columns))
    return rows


if __name__ == "__main__":
    main()

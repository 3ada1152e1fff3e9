"""SFT throughput and memory: alignkit's default SFT recipe vs a plain trl SFTTrainer script, with trl's defaults and
with trl's best settings for the device, on the same model, data, sequence length, effective batch and step count.

    python benchmarks/sft.py --size tiny            # seconds
    flock /tmp/alignkit-heavy.lock python benchmarks/sft.py --size smollm2   # minutes
    python benchmarks/sft.py --size gemma3 --variants alignkit trl_tuned --steps 3 --time_box 180   # Gemma 3 270M, QLoRA, its chat format

One process tree: each variant runs in its own child process, one after the other, after a GEMM probe. Throughput
counts non-padding tokens over steps 2..N (step 1 is warm-up). MFU = model FLOPs / probe FLOP/s in the row's compute
dtype and against the fastest dtype the probe measured (bf16 on AMX/AVX512-BF16 CPUs: the machine's real limit), with model FLOPs per token = 6 x params for full training and, for LoRA, 4 x frozen + 6 x trainable matmul
params (frozen weights need no weight gradient: forward 2, input-gradient 2; attention score FLOPs are not counted;
recomputation by gradient checkpointing is not model FLOPs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness

# The plain trl script's settings per variant, on top of what every variant shares (see plain_trl).
# alignkit: its defaults ('auto' precision: bf16 mixed precision where the CPU has bf16 units, else fp32);
# alignkit_fp32: the same with --dtype float32 (pinned fp32).
VARIANTS = ["alignkit", "alignkit_fp32", "trl_defaults", "trl_tuned"]


def trl_settings(variant: str) -> dict:
    """trl_defaults: trl 1.16's own (bf16=True, packing and padding_free off, gradient_checkpointing on), plus the one
    flag a CPU needs to start at all (transformers refuses bf16 on CPU without use_cpu=True). trl_tuned: trl's best for
    the device: bf16 autocast where it pays (GPUs; CPUs with bf16 units, harness.fast_bf16), else fp32, padding-free (rows concatenated; trl then needs max_length=None,
    and the rows are built to fit, so nothing would be truncated anyway), no activation recomputation where memory is
    plentiful (CPU RAM), liger-kernel on GPU when installed."""
    import torch

    on_gpu = torch.cuda.is_available()
    if variant == "trl_defaults":
        return {} if on_gpu else {"use_cpu": True}
    bf16 = harness.fast_bf16()
    return {
        "bf16": bf16,
        **({"use_cpu": True} if bf16 and not on_gpu else {}),
        "padding_free": True,
        "max_length": None,
        "gradient_checkpointing": on_gpu,
        "use_liger_kernel": on_gpu and _liger_installed(),
    }


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def plain_trl(size: harness.Size, data: Path, out: Path, steps: int, overrides: dict) -> dict:
    settings = {"max_length": size.max_length, **overrides}
    return _describe(*harness.train_plain_trl("sft", size, data, out, steps, size.batch, settings))


def alignkit_default(size: harness.Size, data: Path, out: Path, steps: int, dtype: str = "auto") -> dict:
    argv = ["--max_length", str(size.max_length), "--dtype", dtype]
    return _describe(*harness.train_alignkit("sft", size, data, out, steps, size.batch, argv))


def _describe(trainer, result: dict) -> dict:
    args = trainer.args
    padding_free = getattr(trainer.data_collator, "padding_free", False)
    packing = "packed" if args.packing else ("padding-free" if padding_free else "padded")
    return {**result, "batching": packing, "grad_ckpt": bool(args.gradient_checkpointing)}


def run_variant(variant: str, size: harness.Size, data: Path, work: Path, steps: int) -> dict:
    out = work / variant
    if variant.startswith("alignkit"):
        return alignkit_default(size, data, out, steps, "float32" if variant == "alignkit_fp32" else "auto")
    return plain_trl(size, data, out, steps, trl_settings(variant))


def main(argv=None, in_process: bool = False) -> list[dict]:
    parser = harness.variant_parser(__doc__, VARIANTS)
    parser.add_argument("--gemm_n", type=int, default=2048, help="largest matrix size of the GEMM probe")
    parser.add_argument("--gemm_budget", type=float, default=4.0, help="seconds per dtype for the GEMM probe")
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    steps = args.steps or size.steps
    if args.child:
        harness.emit(run_variant(harness.allocator_variant(args.child), size, Path(args.data), Path(args.work), steps))
        return []

    import gemm

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-sft-") as tmp:
        tokenizer = size.tokenizer()
        data = harness.write_jsonl(Path(tmp) / "sft.jsonl", harness.sft_rows(tokenizer, size.max_length))
        probes = {name: gemm.probe(name, args.gemm_n, args.gemm_budget) for name in ("float32", "bfloat16")}
        peaks = {name: p["flops"] for name, p in probes.items()}
        common = ["--size", args.size, "--steps", str(steps), "--data", str(data), "--work", tmp]
        run_here = (lambda v: run_variant(v, size, data, Path(tmp), steps)) if in_process else None
        started_at = harness.load_average()
        rows = harness.run_variants(
            __file__, args.variants, common, args.repeats, in_process=run_here, time_box=args.time_box, batch=size.batch
        )

    for row in rows:
        if row.get("time_boxed"):
            continue
        flops_per_token = 4 * row["frozen_params"] + 6 * row["trainable_params"]
        own, fastest = peaks["bfloat16" if row["bf16"] else "float32"], max(peaks.values())
        rate = flops_per_token * row["tokens_per_s"]
        row.update(dtype="bf16" if row["bf16"] else "fp32", mfu=100 * rate / fastest, mfu_own=100 * rate / own)
    harness.add_ratios(rows, "tokens_per_s")
    print(
        f"\nSFT, {size.name} ({size.alignkit_name}): max_length {size.max_length}, batch {size.batch}, {steps} steps (timed: 2..{steps}), best of {args.repeats} rounds, {size.adapter()}, "
        f"{harness.machine(started_at)}"
    )
    print("GEMM probe: " + ", ".join(
        f"{name} {p['flops'] / 1e9:.1f} GFLOP/s (n={p['n']}{', time-boxed' if p['timeboxed'] else ''})"
        for name, p in probes.items()))  # fmt: skip
    harness.print_table(rows, [
        ("variant", "variant", "s"), ("threads", "threads", "d"), ("dtype", "dtype", "s"), ("batching", "batching", "s"), ("grad ckpt", "grad_ckpt", "d"),
        ("tokens/s", "tokens_per_s", ".0f"), ("samples/s", "samples_per_s", ".2f"), ("samples/s per round", "rounds", "s"),
        ("tok/CPU-s", "tokens_per_cpu_s", ".0f"), ("peak MiB", "peak_mib", ".0f"),
        ("final loss", "final_loss", ".4f"), ("MFU % (fastest probe)", "mfu", ".1f"), ("MFU % (own dtype)", "mfu_own", ".1f"), ("alignkit/this tok/s", "speedup", ".2f"),
        ("alignkit/this tok/CPU-s", "cpu_speedup", ".2f"),
        ("mem", "memory_ratio", ".2f"), ("loss", "loss_ratio", ".3f"),
    ], steps)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

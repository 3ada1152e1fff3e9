"""DPO throughput and memory: alignkit's default DPO recipe vs a plain trl DPOTrainer script, with trl's defaults and
with trl's best settings for the device, on the same model, preference pairs, effective batch and step count.

    python benchmarks/dpo.py --size tiny
    flock /tmp/alignkit-heavy.lock python benchmarks/dpo.py --size smollm2
    python benchmarks/dpo.py --size gemma3 --variants alignkit trl_tuned --steps 3 --time_box 180   # Gemma 3 270M, QLoRA, its chat format

Both start from the base model with a fresh LoRA adapter; the reference policy is the base (adapter disabled), as trl
does for PEFT models. Throughput is preference pairs per second over steps 2..N. trl 1.16's DPO has no padding-free
mode (it warns and pads), so "tuned" is bf16 autocast where it pays (GPUs, CPUs with bf16 units) and no activation recomputation on CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness

VARIANTS = ["alignkit", "alignkit_fp32", "trl_defaults", "trl_tuned"]  # alignkit_fp32: --dtype float32


def trl_settings(variant: str) -> dict:
    import torch

    on_gpu = torch.cuda.is_available()
    if variant == "trl_defaults":  # trl 1.16: bf16=True, gradient_checkpointing=True; a CPU also needs use_cpu
        return {} if on_gpu else {"use_cpu": True}
    bf16 = harness.fast_bf16()  # bf16 autocast where it pays (GPUs; CPUs with bf16 units)
    return {"bf16": bf16, **({"use_cpu": True} if bf16 and not on_gpu else {}), "gradient_checkpointing": on_gpu}


def plain_trl(size: harness.Size, data: Path, out: Path, steps: int, overrides: dict) -> dict:
    return _describe(*harness.train_plain_trl("dpo", size, data, out, steps, size.dpo_batch, overrides))


def alignkit_default(size: harness.Size, data: Path, out: Path, steps: int, dtype: str = "auto") -> dict:
    return _describe(*harness.train_alignkit("dpo", size, data, out, steps, size.dpo_batch, ["--dtype", dtype]))


def _describe(trainer, result: dict) -> dict:
    result.pop("tokens_per_s", None)  # DPO is measured in preference pairs
    return {
        **result,
        "grad_ckpt": bool(trainer.args.gradient_checkpointing),
        "dtype": "bf16" if result["bf16"] else "fp32",
    }


def run_variant(variant: str, size: harness.Size, data: Path, work: Path, steps: int) -> dict:
    if variant.startswith("alignkit"):
        return alignkit_default(size, data, work / variant, steps, "float32" if variant == "alignkit_fp32" else "auto")
    return plain_trl(size, data, work / variant, steps, trl_settings(variant))


def main(argv=None, in_process: bool = False) -> list[dict]:
    parser = harness.variant_parser(__doc__, VARIANTS)
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    steps = args.steps or size.dpo_steps
    if args.child:
        harness.emit(run_variant(harness.allocator_variant(args.child), size, Path(args.data), Path(args.work), steps))
        return []

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-dpo-") as tmp:
        data = harness.write_jsonl(Path(tmp) / "dpo.jsonl", harness.dpo_rows())
        common = ["--size", args.size, "--steps", str(steps), "--data", str(data), "--work", tmp]
        run_here = (lambda v: run_variant(v, size, data, Path(tmp), steps)) if in_process else None
        started_at = harness.load_average()
        rows = harness.run_variants(
            __file__,
            args.variants,
            common,
            args.repeats,
            in_process=run_here,
            time_box=args.time_box,
            batch=size.dpo_batch,
        )

    harness.add_ratios(rows, "samples_per_s")
    print(f"\nDPO, {size.name} ({size.alignkit_name}): batch {size.dpo_batch} pairs, {steps} steps (timed: 2..{steps}), best of {args.repeats} rounds, "
          f"{size.adapter()}, {harness.machine(started_at)}")  # fmt: skip
    harness.print_table(rows, [
        ("variant", "variant", "s"), ("threads", "threads", "d"), ("dtype", "dtype", "s"), ("grad ckpt", "grad_ckpt", "d"),
        ("pairs/s", "samples_per_s", ".2f"), ("pairs/s per round", "rounds", "s"),
        ("pairs/CPU-s", "samples_per_cpu_s", ".2f"), ("peak MiB", "peak_mib", ".0f"),
        ("final loss", "final_loss", ".4f"),
        ("alignkit/this pairs/s", "speedup", ".2f"),
        ("alignkit/this pairs/CPU-s", "cpu_speedup", ".2f"), ("mem", "memory_ratio", ".2f"), ("loss", "loss_ratio", ".3f"),
    ], steps)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

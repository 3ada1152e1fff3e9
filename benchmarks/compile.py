"""torch.compile (inductor on CPU) on alignkit's default SFT recipe: every step's wall time with and without
``--torch_compile true`` (transformers compiles the whole model), so both the compile cost and the steady state show.

    python benchmarks/compile.py --size tiny
    flock /tmp/alignkit-heavy.lock python benchmarks/compile.py --size smollm2 --steps 8

Same model, rows, batch and seed for both; each in its own child process, interleaved rounds (``--repeats``).
Steady state = steps 4..N: padding-free batches change length every step, so dynamo compiles at step 1 and again
(with dynamic shapes) at step 2 or 3. The loss column shows whether the compiled model trains the same (dropout
draws from inductor's own random stream there, so a small difference is expected).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import harness

VARIANTS = ["alignkit", "alignkit_compiled"]
STEADY_FROM = 4  # the first step counted as steady state (1-based)


def run_variant(variant: str, size: harness.Size, data: Path, work: Path, steps: int, extra: list[str]) -> dict:
    timer = harness.step_timer()
    argv = ["--max_length", str(size.max_length), *extra]
    if variant == "alignkit_compiled":
        argv += ["--torch_compile", "true"]
    trainer, result = harness.train_alignkit("sft", size, data, work / variant, steps, size.batch, argv, timer=timer)
    walls = [timer.begin] + [w for w, _ in timer.stamps]
    step_s = [b - a for a, b in zip(walls[:-1], walls[1:])]
    steady = step_s[STEADY_FROM - 1 :]
    return {
        **result,
        "step_s": step_s,
        "first_steps_s": sum(step_s[: STEADY_FROM - 1]),
        "steady_s": statistics.median(steady) if steady else None,
        "samples_per_s": size.batch / statistics.median(steady) if steady else result["samples_per_s"],
    }


def main(argv=None) -> list[dict]:
    parser = harness.variant_parser(__doc__, VARIANTS)
    parser.add_argument("--extra", default="", help="recipe flags for both variants, e.g. '--attn_implementation sdpa'")
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    steps = args.steps or max(size.steps, STEADY_FROM + 2)
    if args.child:
        harness.emit(run_variant(args.child, size, Path(args.data), Path(args.work), steps, args.extra.split()))
        return []
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="alignkit-bench-compile-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(size.path())
        data = harness.write_jsonl(Path(tmp) / "sft.jsonl", harness.sft_rows(tokenizer, size.max_length))
        common = [
            "--size",
            args.size,
            "--steps",
            str(steps),
            "--data",
            str(data),
            "--work",
            tmp,
            f"--extra={args.extra}",
        ]
        started_at = harness.load_average()
        rows = harness.run_variants(__file__, args.variants, common, args.repeats, time_box=args.time_box,
                                    batch=size.batch)  # fmt: skip
    eager = next((r for r in rows if r["variant"] == "alignkit" and r.get("steady_s")), None)
    for row in rows:
        if eager and row.get("steady_s"):
            row["steady_speedup"] = eager["steady_s"] / row["steady_s"]
        row["steps"] = " ".join(f"{s:.1f}" for s in row.get("step_s", []))
    print(f"\ntorch.compile, SFT {size.name} ({size.alignkit_name}): max_length {size.max_length}, batch {size.batch}, "
          f"{args.extra + ', ' if args.extra else ''}{steps} steps, steady = median of steps {STEADY_FROM}..{steps}, best of {args.repeats} rounds, "
          f"{harness.machine(started_at)}")  # fmt: skip
    harness.print_table(rows, [
        ("variant", "variant", "s"), ("threads", "threads", "d"), ("steps 1-3 s", "first_steps_s", ".1f"),
        ("steady s/step", "steady_s", ".2f"), ("eager/this steady", "steady_speedup", ".2f"),
        ("peak MiB", "peak_mib", ".0f"), ("final loss", "final_loss", ".4f"), ("every step's s", "steps", "s"),
    ], steps)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

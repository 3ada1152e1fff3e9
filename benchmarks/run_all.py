"""Every benchmark table in one command, one after the other (each script in its own process, so each prints its own
header: CPU model, ISA flags, threads, load average).

    python benchmarks/run_all.py --quick      # < 5 min on 2 cores (AMX Xeon 197 s, AVX2 EPYC 270 s): 1 round, 3 steps
    python benchmarks/run_all.py              # the figures in benchmarks/README.md (~30+ minutes)

Run it alone on the machine (``flock /tmp/alignkit-heavy.lock python benchmarks/run_all.py``): the tables carry the
load average at their start, and a neighbour's load stretches wall time. ``--avx2`` rows cap oneDNN, MKL and ATen at
AVX2 (a CPU without bf16 units; see harness.AVX2_CAPS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent
AVX2 = harness.AVX2_CAPS
# seconds of training per SmolLM2 child: on a CPU without bf16 units trl's bf16 default does not finish one step in 180 s
BOX_QUICK, BOX_FULL = ["--time_box", "30"], ["--time_box", "180"]


def plan(quick: bool) -> list[tuple[str, list[str], dict]]:
    """(script, arguments, extra environment) per table, in order."""
    if quick:
        return [
            ("gemm.py", ["--budget", "2"], {}),
            ("attention.py", ["--repeats", "3"], {}),
            # a variant still training after 30 s (trl's bf16 default on a CPU without bf16 units) is shown as a bound
            ("sft.py", ["--size", "smollm2", "--steps", "3", "--repeats", "1", "--gemm_budget", "2", *BOX_QUICK], {}),
            ("dpo.py", ["--size", "smollm2", "--steps", "3", "--repeats", "1", *BOX_QUICK], {}),
            ("sft.py", ["--size", "tiny", "--repeats", "1", "--gemm_n", "512", "--gemm_budget", "2"], AVX2),
        ]
    return [
        ("gemm.py", [], {}),
        ("gemm.py", [], AVX2),
        ("attention.py", [], {}),
        ("sft.py", ["--size", "tiny"], {}),
        ("sft.py", ["--size", "smollm2", *BOX_FULL], {}),
        ("dpo.py", ["--size", "tiny"], {}),
        ("dpo.py", ["--size", "smollm2", *BOX_FULL], {}),
        ("sft.py", ["--size", "tiny", "--gemm_n", "512"], AVX2),
        # trl's bf16 default runs at ~1 GFLOP/s without bf16 units: stopped after 180 s, shown as a bound
        ("sft.py", ["--size", "smollm2", "--repeats", "1", "--gemm_budget", "2", *BOX_FULL], AVX2),
        ("compile.py", ["--size", "tiny", "--repeats", "1", "--steps", "8"], {}),
        ("memory_4bit.py", ["--size", "smollm2"], {}),
        ("profile_step.py", ["--size", "smollm2", "--before"], {}),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    failed = []
    for script, script_args, env in plan(args.quick):
        caps = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"\n===== {caps + ' ' if caps else ''}python benchmarks/{script} {' '.join(script_args)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *script_args], env={**os.environ, **env})
        if proc.returncode:
            failed.append(script)
    print(f"\nall tables: {time.perf_counter() - started:.0f} s{'; failed: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

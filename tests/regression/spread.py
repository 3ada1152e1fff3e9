"""Measure how far the golden trajectories move between numerics variants of this machine, the evidence behind the
tolerances in ``golden.py``: ``python -m tests.regression.spread [RUN ...]``.

Every run is trained once per variant, each variant in its own process: oneDNN/MKL at their best instruction set or
capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``, what an AVX2-only CPU such as an AMD EPYC
runs), capped at AVX-512 without AMX or bf16 (``ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512
ATEN_CPU_CAPABILITY=avx512``, an AMD Zen 4's numerics without its bf16 units), ATen's own kernels capped at AVX2 too
(``ATEN_CPU_CAPABILITY=avx2``), and 1 or 2 intra-op threads. It prints,
per metric, the largest relative difference from the first variant at any step of any run, next to the tolerance
the suite uses and the margin between the two. The machine's facts head the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# AVX-512 without AMX or bf16 units (what an AMD Zen 4 runs under AVX512_CORE caps; an Intel Xeon without AMX)
AVX512_CORE = {
    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    "ATEN_CPU_CAPABILITY": "avx512",
}
VARIANTS = {
    "best ISA, 1 thread": ({}, 1),
    "best ISA, 2 threads": ({}, 2),
    "oneDNN/MKL/ATen AVX512_CORE, 2 threads": (AVX512_CORE, 2),
    "oneDNN/MKL AVX2, 1 thread": (AVX2, 1),
    "oneDNN/MKL/ATen AVX2, 2 threads": ({**AVX2, "ATEN_CPU_CAPABILITY": "avx2"}, 2),
}


def _child(threads: int, names: list[str]) -> None:
    import torch

    from tests.regression.golden import RUNS, machine_facts, trajectory

    torch.set_num_threads(threads)
    out = {"machine": machine_facts(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="alignkit-spread-") as tmp:
        for run in RUNS:
            if names and run.name not in names:
                continue
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                out["runs"][run.name] = trajectory(run, Path(tmp) / run.name)
    print("SPREAD-JSON " + json.dumps(out))


def _variant(env: dict, threads: int, names: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tests.regression.spread", "--child", str(threads), *names]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(threads), **env}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SPREAD-JSON ")), None)
    if line is None:
        sys.exit(f"variant {env} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def _metric_kind(key: str) -> str:
    return "rewards/*" if key.startswith("rewards/") else key


def main(names: list[str]) -> None:
    from tests.regression.golden import describe_machine, tolerance

    results = {label: _variant(env, threads, names) for label, (env, threads) in VARIANTS.items()}
    first, *others = results
    print(describe_machine(results[first]["machine"]))
    for label in others:
        print(f"  variant: {label}: CPU capability {results[label]['machine']['cpu_capability']}")
    worst: dict[str, tuple[float, float, str]] = {}  # metric kind -> (rel. difference, its rtol, where), tightest
    for label in others:
        for run, metrics in results[label]["runs"].items():
            for key, values in metrics.items():
                ref = results[first]["runs"][run][key]
                for step, (a, b) in enumerate(zip(values, ref, strict=True), start=1):
                    rel = abs(a - b) / max(abs(b), 1e-12)
                    kind = _metric_kind(key)
                    rtol = tolerance(kind, run)[0]
                    old_rel, old_rtol, _ = worst.get(kind, (-1.0, 1.0, ""))
                    if rel * old_rtol > old_rel * rtol:  # the smallest margin rtol / rel (RUN_TOLERANCES included)
                        worst[kind] = (rel, rtol, f"{run} step {step} ({label})")
    print(f"\n{'metric':<16}{'largest rel. difference':>24}  {'rtol':>8}  {'margin':>8}  where")
    for kind, (rel, rtol, where) in sorted(worst.items()):
        margin = f"{rtol / rel:.0f}x" if rel > 0 else "exact"
        print(f"{kind:<16}{rel:>24.2e}  {rtol:>8.0e}  {margin:>8}  {where}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(int(sys.argv[2]), sys.argv[3:])
    else:
        main(sys.argv[1:])

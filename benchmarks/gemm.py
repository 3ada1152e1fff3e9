"""GEMM probe: this machine's dense matmul throughput per dtype, the denominator of model FLOPs utilisation (MFU).

    python benchmarks/gemm.py [--n 2048] [--budget 4]

Time-boxed per dtype: the probe starts at 256^3 and doubles n up to ``--n`` only while one matmul stays well inside
``--budget`` seconds, then times repeats until the budget is spent. A dtype the CPU has no units for (bf16 without
AVX512-BF16/AMX: ~0.3 GFLOP/s, where 2048^3 takes a minute) stops early and is reported at the n it reached, marked
"time-boxed". On CPUs with AMX / AVX512-BF16, bf16 matmuls run several times faster than fp32 ones, while a whole bf16
mixed-precision training step may not (elementwise ops, casts): compare with benchmarks/sft.py, which states MFU against
the fastest dtype measured here (the machine's real limit) and against the row's own dtype.
"""

from __future__ import annotations

import argparse
import time

import harness


def probe(dtype_name: str, n: int = 2048, budget: float = 4.0) -> dict:
    """{"flops": best FLOP/s of an m x m x m matmul (2 m^3 FLOPs), "n": m, "runs", "timeboxed": m < n}."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def once(a, b) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    deadline = time.perf_counter() + budget
    m, best, runs = 256, float("inf"), 0
    while True:
        a = torch.randn(m, m, dtype=dtype, device=device)
        b = torch.randn(m, m, dtype=dtype, device=device)
        once(a, b)  # warm-up (oneDNN primitive creation, page faults)
        best, runs = min(once(a, b), float("inf")), 1
        # the next size costs 8x: go there only if it fits half of what is left
        if m >= n or 8 * best > (deadline - time.perf_counter()) / 2:
            break
        m *= 2
    while time.perf_counter() + best < deadline and runs < 50:
        best = min(best, once(a, b))
        runs += 1
    return {"dtype": dtype_name, "flops": 2 * m**3 / best, "n": m, "runs": runs, "timeboxed": m < n}


def matmul_flops(dtype_name: str, n: int = 2048, budget: float = 4.0) -> float:
    """Best FLOP/s of ``probe`` (time-boxed to ``budget`` seconds)."""
    return probe(dtype_name, n, budget)["flops"]


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per dtype")
    args = parser.parse_args(argv)
    rows = [probe(name, args.n, args.budget) for name in ("float32", "bfloat16")]
    print(f"\nGEMM probe, up to {args.n}^3, {args.budget:g} s per dtype\n{harness.machine()}")
    fastest = max(rows, key=lambda r: r["flops"])  # the machine's limit: what MFU is stated against
    for row in rows:
        note = f"time-boxed at n={row['n']}" if row["timeboxed"] else ""
        note = "fastest (the MFU denominator)" + (f"; {note}" if note else "") if row is fastest else note
        row.update(gflops=row["flops"] / 1e9, note=note)
    print(harness.table(rows, [("dtype", "dtype", "s"), ("GFLOP/s", "gflops", ".1f"), ("n", "n", "d"),
                               ("runs", "runs", "d"), ("note", "note", "s")]))  # fmt: skip
    return {r["dtype"]: r["flops"] for r in rows}


if __name__ == "__main__":
    main()

"""GEMM probe: this machine's dense matmul throughput per dtype, the denominator of model FLOPs utilisation (MFU).

    python benchmarks/gemm.py [--n 2048]

On CPUs with AMX / AVX512-BF16, bf16 matmuls run several times faster than fp32 ones, while a whole bf16
mixed-precision training step may not (elementwise ops, casts): compare with benchmarks/sft.py.
"""

from __future__ import annotations

import argparse
import time

import harness


def matmul_flops(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in ``dtype_name``."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    inner = 20 if device == "cuda" else 3
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args(argv)
    peaks = {name: matmul_flops(name, args.n) for name in ("float32", "bfloat16")}
    print(f"GEMM probe ({harness.machine()}), {args.n}x{args.n}x{args.n}")
    rows = [{"dtype": k, "gflops": v / 1e9} for k, v in peaks.items()]
    print(harness.table(rows, [("dtype", "dtype", "s"), ("GFLOP/s", "gflops", ".1f")]))
    return peaks


if __name__ == "__main__":
    main()

"""Attention of a padding-free batch: transformers' SDPA with the block-diagonal (L, L) mask it builds from the
position ids vs alignkit's ``sdpa_per_document`` (one causal SDPA per row), forward + backward, at SmolLM2-135M's
attention shapes (9 query heads, 3 key/value heads, head_dim 64).

    python benchmarks/attention.py [--rows 8] [--max_length 256] [--repeats 5]

Rows get lengths between max_length/5 and max_length (as benchmarks/sft.py's data); variants are timed in interleaved
rounds and the best round is shown, with the largest output difference between them.
"""

from __future__ import annotations

import argparse
import random
import time

import harness


def main(argv=None) -> list[dict]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from alignkit.speedups.attention import per_document_sdpa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    torch.manual_seed(0)
    lengths = [rng.randint(args.max_length // 5, args.max_length) for _ in range(args.rows)]
    total, heads, kv_heads, dim = sum(lengths), 9, 3, 64
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril())[None, None]

    class Module(torch.nn.Module):  # what transformers' attention functions read off the attention layer
        is_causal = True
        num_key_value_groups = heads // kv_heads

    module = Module()
    variants = {  # transformers' sdpa path as it runs for a padding-free batch, and alignkit's
        "sdpa, block-diagonal mask": lambda: sdpa_attention_forward(module, q, k, v, mask)[0],
        "sdpa_per_document": lambda: per_document_sdpa(module, q, k, v, None, position_ids=position_ids)[0],
    }
    best = dict.fromkeys(variants, float("inf"))
    best_cpu = dict.fromkeys(variants, float("inf"))
    outputs = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            out = run()
            out.sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
            outputs[name] = out.detach()
    diff = (outputs["sdpa, block-diagonal mask"] - outputs["sdpa_per_document"]).abs().max().item()
    base, base_cpu = best["sdpa, block-diagonal mask"], best_cpu["sdpa, block-diagonal mask"]
    rows = [
        {
            "variant": n,
            "ms": 1e3 * t,
            "cpu_ms": 1e3 * best_cpu[n],
            "speedup": base / t,
            "cpu_speedup": base_cpu / best_cpu[n],
        }
        for n, t in best.items()
    ]
    print(f"\nAttention fwd+bwd, {args.rows} rows of {min(lengths)}-{max(lengths)} tokens (L={total}), best of "
          f"{args.repeats} interleaved rounds, max |difference| {diff:.1e}\n{harness.machine()}")  # fmt: skip
    print(harness.table(rows, [("variant", "variant", "s"), ("wall ms", "ms", ".1f"), ("CPU ms", "cpu_ms", ".1f"),
                               ("vs mask (wall)", "speedup", ".2f"), ("vs mask (CPU)", "cpu_speedup", ".2f")]))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

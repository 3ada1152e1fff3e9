"""The CPU LM head under bf16 autocast on a real model: bf16 GEMMs (what ``dtype: auto`` runs on a CPU with bf16
units) against the same head in fp32, on the same hidden states, targets and weights. Per-token log-probs, per-row
sums (what DPO/KTO compare), gradients (hidden states) and the head's forward + backward time.

    python benchmarks/lm_head_bf16.py --size smollm2     # ~1 min on 2 cores
    python benchmarks/lm_head_bf16.py --size gemma3      # after `alignkit fetch gemma3:gemma-3-270m`

The hidden states are the model's own (its backbone on the benchmark's SFT rows, under bf16 autocast, no adapter),
so the logits are as large and as peaked as a trained model's: the regime where bf16 rounding of the logits would
matter most.
"""

from __future__ import annotations

import argparse
import time

import harness


def main(argv=None) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.speedups import lm_head

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(harness.SIZES), default="smollm2")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per precision; the fastest is shown")
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    tokenizer = size.tokenizer()
    rows = harness.sft_rows(tokenizer, size.max_length, n=size.batch)
    ids = [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(size.path(), dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    hidden, targets = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for row in ids:  # one row at a time: no padding, the rows concatenated as padding-free batching does
            out = model.base_model(input_ids=torch.tensor([row])).last_hidden_state[0, :-1]
            hidden.append(out.float())
            targets.append(torch.tensor(row[1:]))
    hidden, targets = torch.cat(hidden), torch.cat(targets)
    lengths = [len(r) - 1 for r in ids]
    weight = head.weight.detach()

    def run(context) -> tuple[torch.Tensor, torch.Tensor, float]:
        best = float("inf")
        for _ in range(args.repeats):
            h = hidden.clone().requires_grad_()
            started = time.perf_counter()
            with context():
                lp = lm_head.CpuFirstLogProbFunction.apply(h, weight, None, targets, 1.0, 4096, None, 1.0, ())[0]
            lp.sum().backward()
            best = min(best, time.perf_counter() - started)
        return lp.detach(), h.grad, best

    def fp32():
        return torch.autocast("cpu", enabled=False)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    lp32, g32, t32 = run(fp32)
    lp16, g16, t16 = run(bf16)
    sums32, sums16 = lp32.split(lengths), lp16.split(lengths)
    rel = max(((a.sum() - b.sum()).abs() / a.sum().abs()).item() for a, b in zip(sums32, sums16, strict=True))
    cosine = (g32.flatten().double() @ g16.flatten().double() / (g32.norm() * g16.norm())).item()
    row = {
        "tokens": len(targets),
        "vocab": weight.shape[0],
        "token_abs": (lp16 - lp32).abs().max().item(),
        "token_mean_abs": (lp16 - lp32).abs().mean().item(),
        "sum_rel": rel,
        "cosine": cosine,
        "fp32_s": t32,
        "bf16_s": t16,
        "speedup": t32 / t16,
        "mean_log_prob": lp32.mean().item(),
    }
    print(
        f"\nCPU LM head, bf16 GEMMs vs fp32, {size.name} ({size.alignkit_name}): {row['tokens']} tokens "
        f"({len(ids)} rows, hidden states from the model's backbone), vocabulary {row['vocab']}, forward + backward, "
        f"best of {args.repeats}; {harness.machine()}"
    )
    print(
        harness.table(
            [row],
            [
                ("tokens", "tokens", "d"),
                ("mean log p (fp32)", "mean_log_prob", ".3f"),
                ("max |d log p|", "token_abs", ".4f"),
                ("mean |d log p|", "token_mean_abs", ".5f"),
                ("row sums, max rel", "sum_rel", ".1e"),
                ("grad cosine", "cosine", ".6f"),
                ("fp32 s", "fp32_s", ".3f"),
                ("bf16 s", "bf16_s", ".3f"),
                ("fp32/bf16", "speedup", ".2f"),
            ],
        )  # fmt: skip
    )
    return [row]


if __name__ == "__main__":
    main()

"""One SFT training step (forward + backward) of alignkit's model setup, fp32 vs bf16 autocast, interleaved in one
process: where bf16 steps spend their time, and what a bf16-only change buys, without the trainer around it.

    python benchmarks/bf16_step.py --size smollm2 [--rounds 3] [--profile] [--threads 1]

The model is loaded as alignkit's SFT recipe loads it (``load_model``: LoRA r16 on all linear layers, dropout 0.05),
with the model- and trainer-phase speed-ups an SFT run gets on CPU (per-document attention, the CPU LM head, trl's
fused LM head on labeled positions); the batch is the size's SFT batch concatenated padding-free, as the recipe's
collator does. Variants (each timed on the same batch, rounds interleaved: A B A B): ``fp32`` (no autocast), ``bf16``
(``torch.autocast('cpu', torch.bfloat16)``, what a ``bf16: true`` trainer wraps the forward in) and, with
``--variants``, alignkit's bf16-only speed-ups that exist in this checkout. Reports seconds per step (best and
median), the ratio to fp32, the loss of each, and with ``--profile`` the costliest ops of one step per variant.
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness

KINDS = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_mm", "aten::_weight_int4pack_mm"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "casts/copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "dropout": ("bernoulli", "dropout"),
    "softmax/logsumexp/exp": ("logsumexp", "aten::exp", "softmax", "aten::argmax", "aten::max"),
}


def kind(name: str) -> str:
    """An aten op's kind, by name (GEMMs, attention kernels, casts and copies, dropout, softmax-like, the rest)."""
    for k, names in KINDS.items():
        if name in names or any(n in name for n in names if not n.startswith("aten::")):
            return k
    return "other elementwise"


def _batch(size: harness.Size, tokenizer):
    """The size's SFT batch, padding-free: (1, T) input ids, position ids restarting per row, labels (prompt -100)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = harness.sft_rows(tokenizer, size.max_length, n=size.batch)
    examples = []
    for row in rows:
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=False)  # fmt: skip
        examples.append({"input_ids": out["input_ids"]})
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id or 0, padding_free=True)
    batch = collator(examples)
    return {k: batch[k] for k in ("input_ids", "position_ids", "labels")}  # documents: where position ids restart


def trimmed(batch: dict, drop: int) -> dict:
    """The batch without its last ``drop`` tokens: another sequence length, as every padding-free step has (oneDNN
    builds its bf16 GEMM kernels per shape; the same batch every round would hide that)."""
    return {k: v[:, : v.shape[1] - drop] for k, v in batch.items()} if drop else batch


def _model(size: harness.Size):
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from alignkit.config import AdapterArguments, ModelArguments
    from alignkit.models.loader import load_model
    from alignkit.speedups.attention import use_fast_attention
    from alignkit.speedups.lm_head import use_cpu_lm_head

    torch.manual_seed(harness.SEED)
    model = load_model(ModelArguments(model_name_or_path=size.alignkit_name), adapter_args=AdapterArguments())
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    use_fast_attention(model)
    use_cpu_lm_head()
    model.train()
    return model


def _weights_only_forward(self, x, *args, **kwargs):
    """peft's forward with only the frozen weight's bf16 copy (its adapter branch unchanged): isolates that part."""
    import torch

    from alignkit.speedups import bf16_lora

    if not bf16_lora._fast(self, x, args, kwargs):
        return _weights_only_forward.upstream(self, x, *args, **kwargs)
    base = self.base_layer
    result = torch.nn.functional.linear(x, bf16_lora.frozen_bf16_weight(self), base.bias)
    for name in self.active_adapters:
        a = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
        result = result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](a))) * self.scaling[name]
    return result


_weights_only_forward.alignkit = True


class Patched:
    """A bf16-only change switched on around one variant's step (process-wide patches, undone after)."""

    def __init__(self, variant: str):
        self.variant = variant

    def __enter__(self):
        from peft.tuners.lora import layer as lora_layer

        from alignkit.speedups import attention, bf16_lora

        self.saved = lora_layer.Linear.forward
        self.saved_attention = attention._fp32_under_cpu_bf16
        if self.variant == "bf16_before":  # attention in bf16 too, as before this branch

            def as_given(query, key, value):
                import contextlib

                return query, key, value, contextlib.nullcontext()

            attention._fp32_under_cpu_bf16 = as_given
        if self.variant == "bf16_lora":
            bf16_lora._patched_forward.upstream = self.saved
            lora_layer.Linear.forward = bf16_lora._patched_forward
        elif self.variant == "bf16_weights":
            _weights_only_forward.upstream = self.saved
            lora_layer.Linear.forward = _weights_only_forward

    def __exit__(self, *exc):
        from peft.tuners.lora import layer as lora_layer

        from alignkit.speedups import attention

        lora_layer.Linear.forward = self.saved
        attention._fp32_under_cpu_bf16 = self.saved_attention


def step(model, batch, bf16: bool, variant: str = "") -> float:
    """One forward + backward; returns the loss."""

    with Patched(variant):
        return _step(model, batch, bf16)


def _step(model, batch, bf16: bool) -> float:
    import torch

    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with context:
        out = model(**batch, use_cache=False, fused_lm_head=True)
    out.loss.backward()
    return float(out.loss)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(harness.SIZES), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--profile", action="store_true", help="profile one step per variant, print the top ops")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--vary", type=int, default=0, help="each step this many tokens shorter than the one before")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = harness.SIZES[args.size]
    model = _model(size)
    batch = _batch(size, size.tokenizer())
    tokens = int(batch["input_ids"].numel())
    setups = {
        "fp32": (False, None),
        "bf16": (True, None),
        "bf16_weights": (True, None),
        "bf16_lora": (True, None),
        "bf16_before": (True, None),
    }
    for name in args.variants:
        if name not in setups:
            raise SystemExit(f"unknown variant {name}")

    torch.manual_seed(0)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    losses: dict[str, float] = {}
    n = 0
    for v in args.variants:  # warm-up (oneDNN primitives, allocator)
        torch.manual_seed(0)
        step(model, batch, setups[v][0], v)
    for _ in range(args.rounds):
        for v in args.variants:
            n += 1
            torch.manual_seed(0)
            start = time.perf_counter()
            losses[v] = step(model, trimmed(batch, n * args.vary), setups[v][0], v)
            times[v].append(time.perf_counter() - start)
    print(f"\n{size.name}: {tokens} tokens per step (padding-free), {args.rounds} interleaved rounds\n"
          f"{harness.machine()}{f'; each step {args.vary} tokens shorter' if args.vary else ''}")  # fmt: skip
    base = min(times[args.variants[0]])
    rows = [{"variant": v, "best": min(t), "median": statistics.median(t), "ratio": base / min(t),
             "tok_s": tokens / min(t), "loss": losses[v], "all": " ".join(f"{x:.2f}" for x in t)}
            for v, t in times.items()]  # fmt: skip
    print(harness.table(rows, [("variant", "variant", "s"), ("best s", "best", ".3f"), ("median s", "median", ".3f"),
                               (f"{args.variants[0]}/this", "ratio", ".2f"), ("tokens/s", "tok_s", ".0f"),
                               ("loss", "loss", ".5f"), ("rounds s", "all", "s")]))  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for v in args.variants:
            torch.manual_seed(0)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                start = time.perf_counter()
                step(model, batch, setups[v][0], v)
                wall = time.perf_counter() - start
            agg: dict[str, list] = {}
            for e in prof.key_averages():
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                    agg[e.key] = [e.self_cpu_time_total / 1e6, e.count]
            total = sum(t for t, _ in agg.values())
            print(f"\n{v}: profiled step {wall:.3f} s, aten self time {total:.3f} s")
            kinds: dict[str, float] = {}
            for name, (t, _) in agg.items():
                kinds[kind(name)] = kinds.get(kind(name), 0.0) + t
            kinds["python/other"] = max(0.0, wall - total)
            print(
                "  shares: "
                + ", ".join(f"{k} {100 * t / wall:.1f}%" for k, t in sorted(kinds.items(), key=lambda kv: -kv[1]))
            )
            for name, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[: args.top]:
                print(f"  {name:45s} {t:7.3f} s {100 * t / wall:5.1f}%  x{n}")


if __name__ == "__main__":
    main()

"""Backbone weight memory: 4-bit (bitsandbytes nf4, double quantization: alignkit's QLoRA default) vs full precision,
both loaded through alignkit's loader without an adapter.

    python benchmarks/memory_4bit.py --size smollm2

Bytes counted: every parameter and buffer, plus the 4-bit layers' quantization constants (absmax, nested absmax,
code book), i.e. what the 4-bit model keeps in memory besides the packed weights. Embeddings, norms and the lm_head stay
in the compute dtype (bitsandbytes quantizes Linear layers only, and alignkit keeps task heads out of quantization).
"""

from __future__ import annotations

import argparse

import harness


def weight_bytes(model) -> dict[str, int]:
    import torch

    seen, counts = set(), {"4-bit packed": 0, "quant constants": 0, "unquantized": 0}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            counts["quant constants"] += sum(
                t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)
            )
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:  # tied embeddings count once
            continue
        seen.add(id(tensor))
        key = "4-bit packed" if hasattr(tensor, "quant_state") else "unquantized"
        counts[key] += tensor.numel() * tensor.element_size()
    counts["total"] = sum(counts.values())
    return counts


def measure(size: harness.Size) -> list[dict]:
    from alignkit.config import ModelArguments, QuantizationArguments
    from alignkit.models.loader import load_base_model

    model_args = ModelArguments(model_name_or_path=size.alignkit_name)
    rows = []
    for name, quant in (
        ("full precision", QuantizationArguments()),
        ("4-bit nf4", QuantizationArguments(load_in_4bit=True)),
    ):
        model = load_base_model(model_args, quant)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        rows.append({"backbone": name, "dtype": str(dtype).replace("torch.", ""), **weight_bytes(model)})
        del model
    full = rows[0]["total"]
    for row in rows:
        row["ratio"] = row["total"] / full
        for key in ("4-bit packed", "quant constants", "unquantized", "total"):
            row[key] /= 2**20
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(harness.SIZES), default="smollm2")
    args = parser.parse_args(argv)
    size = harness.SIZES[args.size]
    rows = measure(size)
    print(f"\nBackbone weight memory, {size.name} ({size.alignkit_name}), {harness.machine()}")
    print(harness.table(rows, [
        ("backbone", "backbone", "s"), ("unquantized dtype", "dtype", "s"), ("4-bit packed MiB", "4-bit packed", ".1f"),
        ("quant constants MiB", "quant constants", ".2f"), ("unquantized MiB", "unquantized", ".1f"),
        ("total MiB", "total", ".1f"), ("vs full precision", "ratio", ".3f"),
    ]))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

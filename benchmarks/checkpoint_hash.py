"""What the checkpoint manifest's sha256 costs: for a LoRA adapter checkpoint of SmolLM2 size, the time to save the
files transformers writes into checkpoint-N (the adapter in safetensors, AdamW's two moments in optimizer.pt) next to
the time alignkit then spends hashing them (alignkit.models.folders.file_sha256, after the save, from the page cache)
and checking them again on resume.

    python benchmarks/checkpoint_hash.py [--rank 16] [--sizes smollm2-135m smollm2-360m smollm2-1.7b]

The tensors have the shapes of LoRA on every linear layer of each model (q, k, v, o, gate, up, down; shapes from the
models' configs), in fp32 as a LoRA adapter trains; the values are random (hashing does not depend on them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import harness

# hidden, intermediate, layers, kv dim (heads x head_dim for k and v), from the released configs
CONFIGS = {
    "smollm2-135m": (576, 1536, 30, 192),
    "smollm2-360m": (960, 2560, 32, 320),
    "smollm2-1.7b": (2048, 8192, 24, 2048),
}


def lora_tensors(size: str, rank: int) -> dict:
    import torch

    hidden, inter, layers, kv = CONFIGS[size]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        for name, (n_in, n_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            out[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g)
            out[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g)
    return out


def measure(size: str, rank: int, folder: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from alignkit.models.folders import file_sha256

    weights = lora_tensors(size, rank)
    state = {i: {"step": torch.tensor(1.0), "exp_avg": t.clone(), "exp_avg_sq": t.clone() ** 2}
             for i, t in enumerate(weights.values())}  # fmt: skip
    start = time.perf_counter()
    save_file(weights, folder / "adapter_model.safetensors")
    torch.save({"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}, folder / "optimizer.pt")
    saved = time.perf_counter() - start
    files = [folder / "adapter_model.safetensors", folder / "optimizer.pt"]
    start = time.perf_counter()
    for f in files:
        file_sha256(f)
    hashed = time.perf_counter() - start
    mb = sum(f.stat().st_size for f in files) / 1e6
    return {"size": size, "params": sum(t.numel() for t in weights.values()), "mb": mb, "save": saved, "hash": hashed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sizes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args(argv)
    print(harness.machine())
    print(f"LoRA r={args.rank} on q,k,v,o,gate,up,down; fp32 adapter + AdamW moments (optimizer.pt)")
    print(
        f"{'model':<14} {'LoRA params':>12} {'MB written':>11} {'save s':>8} {'sha256 s':>9} {'hash/save':>10} {'MB/s hashed':>12}"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(size, args.rank, Path(tmp))
        print(f"{r['size']:<14} {r['params']:>12,} {r['mb']:>11.1f} {r['save']:>8.2f} {r['hash']:>9.2f} "
              f"{r['hash'] / r['save']:>10.2f} {r['mb'] / r['hash']:>12.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

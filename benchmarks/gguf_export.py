"""GGUF export per outtype, checked in llama.cpp itself (issue 40): file size, seconds to export (converter, plus
llama.cpp's quantizer for K-quants), and the export gate's figures against the merged transformers model (float32):

- on the demo's 50 held-out questions (its system prompt, greedy, ``--max_new_tokens``): reply-token agreement,
  identical replies, stop rate (replies ending on the family's end-of-turn token within the limit; the merged
  model's in brackets), and the perplexity change on the same 50 rows with their gold replies (chat text, rendered by
  the model's template);
- the export gate as ``alignkit export gguf`` runs it by default (its 12 built-in prompts, ``GATE_TEXTS``): the figures
  :data:`alignkit.export.gguf.GATE_BOUNDS` is derived from (docs/serving.md states the rule).

    PYTHONPATH=$PWD python3 benchmarks/gguf_export.py --model MERGED_DIR [--outtypes f16,q8_0,...] [--n 50]
                                                      [--json rows.json]
    PYTHONPATH=$PWD python3 benchmarks/gguf_export.py --derive smollm2.json gemma3.json   # GATE_BOUNDS by RULE

RULE (per outtype, over every model and both prompt sets measured): agreement >= the lowest measured less 20
points, rounded down to 5 points; stop rate >= the merged model's less (the largest measured drop + 10 points,
rounded up to 5 points; none for f16/q8_0, whose stop rate must equal the merged model's); perplexity change <= twice
the largest measured change **in either direction** + 1 point, rounded up to a whole percent (rounding moves
perplexity both ways; measured moves of -40% at q5_k_m would otherwise leave it a 1% bound, tighter than f16's). Then
the bounds are made monotone in the types' precision (f16, q8_0, q6_k, q5_k_m, q4_k_m): a coarser type is never held
to a tighter bound than a finer one.

llama.cpp runs on one thread (the gate's setting); the reference replies are computed once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path


def held_out(n: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """The demo's held-out questions (its ``eval`` split, as ``python -m alignkit.demo.pipeline`` writes it) and the
    same conversations closed by their gold reply (for perplexity)."""
    from alignkit.demo.data import make_rows

    prompts, scored = [], []
    for row in make_rows(n_eval=n)["eval"]:
        a, b = map(int, re.search(r"(\d+) \+ (\d+)", row["messages"][-1]["content"]).groups())
        prompts.append(row["messages"])
        scored.append([*row["messages"], {"role": "assistant", "content": f"{a} + {b} = {a + b}.\nANSWER: {a + b}"}])
    return prompts, scored


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def derive(paths: list[str]) -> dict[str, dict[str, float]]:
    """GATE_BOUNDS per outtype from benchmark JSON files, by RULE (module docstring)."""
    import math

    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {}
    for outtype in dict.fromkeys(r["outtype"] for run in runs for r in run["rows"]):
        figures = [r[k] for run in runs for r in run["rows"] if r["outtype"] == outtype for k in ("held_out", "gate")
                   if k in r]  # fmt: skip
        agreement = math.floor((min(f["agreement"] for f in figures) - 0.20) * 20 + 1e-9) / 20
        drop = max(max(f["merged_stop_rate"] - f["stop_rate"] for f in figures), 0.0)
        stop_drop = 0.0 if outtype in ("f32", "f16", "bf16", "q8_0") else math.ceil((drop + 0.10) * 20 - 1e-9) / 20
        moved = max(abs(f["ppl_change"]) for f in figures)
        ppl = math.ceil((2 * moved + 0.01) * 100 - 1e-9) / 100
        out[outtype] = {"agreement": max(agreement, 0.0), "stop_drop": stop_drop, "ppl_change": ppl}
        print(f"{outtype}: measured agreement >= {min(f['agreement'] for f in figures):.1%}, stop-rate drop <= "
              f"{drop:.0%}, perplexity moved <= {moved:.2%} -> {out[outtype]}")  # fmt: skip
    finer = None
    for outtype in PRECISION_ORDER:  # monotone: a coarser type never gets a tighter bound than a finer one
        if outtype in out and finer is not None:
            b, f = out[outtype], out[finer]
            b.update(agreement=min(b["agreement"], f["agreement"]), stop_drop=max(b["stop_drop"], f["stop_drop"]),
                     ppl_change=max(b["ppl_change"], f["ppl_change"]))  # fmt: skip
        finer = outtype if outtype in out else finer
    return out


PRECISION_ORDER = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def main() -> None:
    import sys

    if sys.argv[1:2] == ["--derive"]:
        print(json.dumps(derive(sys.argv[2:]), indent=1))
        return
    from transformers import AutoTokenizer

    from alignkit.export.gguf import GATE_BOUNDS, GATE_TEXTS, OUTTYPES, convert, gate_conversations
    from alignkit.export.llamacpp import chat_gate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="A merged model folder (the demo's final/, a merged Gemma run).")
    p.add_argument("--outtypes", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    p.add_argument("--n", type=int, default=50, help="Held-out questions (the demo's eval split).")
    p.add_argument("--max_new_tokens", type=int, default=64, help="The gate's default limit.")
    p.add_argument("--json", default=None, help="Also write the rows here (JSON), one update per outtype.")
    p.add_argument("--sets", default="held_out,gate", help="held_out (the demo's questions), gate (the default gate).")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="Threads for the transformers reference (1 on a loaded machine: OpenMP barriers spin).")  # fmt: skip
    args = p.parse_args()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    model = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts, scored = held_out(args.n)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in scored]
    print(f"model: {model.name}; {len(prompts)} held-out questions; max_new_tokens {args.max_new_tokens}")
    print(f"CPU: {_cpu()}, {os.cpu_count()} logical cores, llama.cpp on 1 thread; load at start {os.getloadavg()}")
    head = "| outtype | MiB | export s | agreement | identical | stop rate (merged) | ppl change | gate |"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            assert outtype in OUTTYPES, outtype
            out = Path(tmp) / f"model-{outtype}.gguf"
            started = time.monotonic()
            convert(model, out, outtype)
            seconds = time.monotonic() - started
            mib = out.stat().st_size / 2**20
            bounds = GATE_BOUNDS[outtype]
            sets = {}
            if "held_out" in args.sets:
                sets["held_out"] = chat_gate(model, out, outtype, prompts, texts, bounds, args.max_new_tokens)
            if "gate" in args.sets:
                sets["gate"] = chat_gate(model, out, outtype, gate_conversations(), GATE_TEXTS, bounds,
                                         args.max_new_tokens)  # fmt: skip
            row = {"outtype": outtype, "mib": round(mib, 1), "seconds": round(seconds, 1), "load": os.getloadavg()[0]}
            for name, c in sets.items():
                row[name] = {"prompts": c.prompts, "agreement": c.agreement, "exact": c.exact,
                             "stop_rate": c.stop_rate, "merged_stop_rate": c.merged_stop_rate,
                             "ppl_merged": c.ppl_merged, "ppl_gguf": c.ppl_gguf, "ppl_change": c.ppl_change,
                             "same_prompt_ids": c.same_prompt_ids, "failures": c.failures()}  # fmt: skip
            rows.append(row)
            said = "; ".join(f"{name}: {c.summary()}" for name, c in sets.items())
            print(f"[{outtype}] {mib:.1f} MiB in {seconds:.1f} s (load {row['load']:.1f}); {said}", flush=True)
            out.unlink()
            if args.json:
                Path(args.json).write_text(json.dumps({"model": model.name, "cpu": _cpu(), "rows": rows}, indent=1))
    for name, title in (("held_out", f"{len(prompts)} held-out demo questions"), ("gate", "the default gate")):
        if not any(name in r for r in rows):
            continue
        print(f"\n{model.name}, {title}:\n{head}\n|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if name in r):
            c = r[name]
            print(f"| {r['outtype']} | {r['mib']:.1f} | {r['seconds']:.1f} | {c['agreement']:.1%} | {c['exact']:.0%} | "
                  f"{c['stop_rate']:.0%} ({c['merged_stop_rate']:.0%}) | {c['ppl_change']:+.2%} | "
                  f"{'; '.join(c['failures']) or 'ok'} |")  # fmt: skip
    print(f"load at end {os.getloadavg()}")


if __name__ == "__main__":
    main()

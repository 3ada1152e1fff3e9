"""GGUF export per outtype, checked in llama.cpp itself (issue 40): file size, seconds to export (converter, plus
llama.cpp's quantizer for K-quants), and the export gate's figures against the merged transformers model: reply-token
agreement and identical replies on held-out chat prompts, stop rate (replies ending on the family's end-of-turn
token within the limit), perplexity change on the gate's held-out text.

    PYTHONPATH=$PWD python3 benchmarks/gguf_export.py [--model DIR] [--outtypes f16,q8_0,...] [--n 50]

Prompts: the demo's held-out questions (alignkit.demo.data, the 'eval' split, with its system prompt).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    from alignkit.demo.data import make_rows
    from alignkit.export.gguf import GATE_BOUNDS, GATE_TEXTS, OUTTYPES, convert
    from alignkit.export.llamacpp import chat_gate
    from alignkit.models.packaged import packaged_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="A merged model folder (default: the embedded SmolLM2).")
    p.add_argument("--outtypes", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    p.add_argument("--n", type=int, default=50, help="Held-out questions (the demo's eval split).")
    p.add_argument("--max_new_tokens", type=int, default=64)
    args = p.parse_args()
    model = Path(args.model or packaged_path("smollm2:SmolLM2-135M-Instruct"))
    conversations = [row["messages"] for row in make_rows(n_eval=args.n)["eval"]]
    import os

    print(f"model: {model.name}; {len(conversations)} held-out prompts; max_new_tokens {args.max_new_tokens}")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} threads, load {os.getloadavg()}")
    print("| outtype | MiB | export s | agreement | identical | stop rate (merged) | ppl change | gate |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            assert outtype in OUTTYPES, outtype
            out = Path(tmp) / f"model-{outtype}.gguf"
            started = time.monotonic()
            convert(model, out, outtype)
            seconds = time.monotonic() - started
            g = chat_gate(model, out, outtype, conversations, GATE_TEXTS, GATE_BOUNDS[outtype], args.max_new_tokens)
            mib = out.stat().st_size / 2**20
            row = {"outtype": outtype, "mib": round(mib, 1), "seconds": round(seconds, 1),
                   "agreement": g.agreement, "exact": g.exact, "stop_rate": g.stop_rate,
                   "merged_stop_rate": g.merged_stop_rate, "ppl_change": g.ppl_change, "passed": g.passed}  # fmt: skip
            rows.append(row)
            print(
                f"| {outtype} | {mib:.1f} | {seconds:.1f} | {g.agreement:.1%} | {g.exact:.0%} | {g.stop_rate:.0%} "
                f"({g.merged_stop_rate:.0%}) | {g.ppl_change:+.2%} | {'ok' if g.passed else '; '.join(g.failures())} |",
                flush=True,
            )
            out.unlink()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

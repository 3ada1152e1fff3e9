"""Model cards (README.md) written from a run's alignkit_run.json: base model, datasets, lineage, metrics."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.models.loader import RUN_METADATA


def render_model_card(meta: dict) -> str:
    base = meta.get("base_model_args", {})
    lineage = meta.get("lineage", [])
    lines = [
        "---",
        "library_name: peft" if any(e.get("adapter") for e in lineage[-1:]) else "library_name: transformers",
        "tags: [alignkit]",
        "---",
        "",
        f"# {lineage[-1]['stage'].upper() if lineage else 'alignkit'} output",
        "",
        f"Trained with alignkit {meta.get('alignkit_version', '')}.",
        "",
        "## Base model",
        "",
        f"- `{base.get('model_name_or_path')}`" + (f" (GGUF file `{base['gguf_file']}`, dequantized)" if base.get("gguf_file") else ""),
        "",
        "## Lineage",
        "",
        "| # | stage | datasets | adapter | quantization | hand-off | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(lineage, 1):
        data = ", ".join(f"{d['path']} (x{d['weight']})" for d in e.get("datasets", []))
        lines.append(
            f"| {i} | {e['stage']} | {data} | {e.get('adapter') or 'full'} | {e.get('quantization') or 'none'} | "
            f"{e.get('adapter_handoff') or '-'} | `{e.get('output_dir')}` |"
        )
    if meta.get("merge"):
        m = meta["merge"]
        lines += ["", "## Merge", "", f"- method: {m.get('method')}", f"- parity max abs logit diff: {m.get('max_abs_diff')}"]
    if meta.get("metrics"):
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(meta["metrics"].items())]
    lines += [
        "",
        "## Intended use",
        "",
        "Research and experimentation; check the datasets' licences and evaluate on your own task before deploying.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    meta = json.loads((output_dir / RUN_METADATA).read_text())
    path = output_dir / "README.md"
    path.write_text(render_model_card(meta))
    return path

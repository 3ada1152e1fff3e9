"""Model cards (README.md) written from a run's alignkit_run.json: base model, datasets, stage lineage with each
stage's key settings, hand-off and merge method, final metrics, intended use. For adapter and merged outputs."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from alignkit.export.portable import portable_name
from alignkit.models.sources import is_hub_id
from alignkit.runs import LineageEntry, RunRecord

# The settings a reader needs to reproduce a stage; the full resolved config is in alignkit_run.json.
KEY_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "block_size", "assistant_only_loss", "beta", "loss_type",
    "load_in_4bit", "bnb_4bit_quant_type", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "use_dora", "use_rslora", "chat_template", "seed",
)  # fmt: skip
MERGE_METHOD_TEXT = {
    "dequantize": "the 4-bit base was dequantized and the adapter merged into it: the merged model is the model "
    "that was trained and evaluated",
    "full_precision": "the adapter was merged into the full-precision base",
}


def _stage_settings(entry: LineageEntry) -> dict:
    flat = entry.settings()
    return {k: flat[k] for k in KEY_SETTINGS if k in flat and flat[k] is not None}


def _dataset(d: dict) -> str:
    """A dataset as a reader can find it: Hub id or file name, its rows and sha256 (first 12 hex) when a file."""
    name = d.get("name") or portable_name(d["path"])
    facts = [f"x{d['weight']}"]
    if d.get("rows") is not None:
        facts.append(f"{d['rows']} rows")
    if d.get("sha256"):
        facts.append(f"sha256 {d['sha256'][:12]}")
    if d.get("files") is not None:
        facts.append(f"{d['files']} files")
    if d.get("streaming"):
        facts.append("streamed")
    return f"`{name}` ({', '.join(facts)})"


def render_model_card(record: RunRecord) -> str:
    base = record.base_model_args
    lineage = record.lineage
    merge = record.merge
    stages = [e.stage.upper() for e in lineage if e.stage != "merge"]
    is_adapter = bool(lineage and lineage[-1].adapter) and not merge
    embedding = bool(lineage and lineage[-1].task == "embedding")
    library = "peft" if is_adapter else "sentence-transformers" if embedding else "transformers"
    header = ["---", f"library_name: {library}"]
    if is_hub_id(base.model_name_or_path):
        header.append(f"base_model: {base.model_name_or_path}")
    lines = [
        *header,
        "tags: [alignkit]",
        "---",
        "",
        f"# {' -> '.join(stages) or 'alignkit'} {'merged model' if merge else 'output'}",
        "",
        f"Trained with alignkit {record.alignkit_version}, stages: {' -> '.join(stages) or '-'}.",
        "",
        "## Base model",
        "",
        f"- `{portable_name(base.model_name_or_path)}`"
        + (f" (GGUF file `{portable_name(base.gguf_file)}`, dequantized)" if base.gguf_file else ""),
        "",
        "## Lineage",
        "",
        "| # | stage | datasets | adapter | quantization | hand-off / method | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(lineage, 1):
        data = ", ".join(_dataset(d) for d in e.datasets) or "-"
        run = portable_name(e.output_dir)
        if e.merge is not None:
            lines.append(f"| {i} | merge | - | merged | none | {e.merge.method} | `{run}` |")
            continue
        lines.append(
            f"| {i} | {e.stage} | {data} | {e.adapter or 'full'} | {e.quantization or 'none'} | "
            f"{e.adapter_handoff or '-'} | `{run}` |"
        )
    formats = [f"{e.stage}: {e.chat_template['family'] or 'custom template'} ({e.chat_template['source']})" for e in lineage if e.chat_template]  # fmt: skip
    if formats:
        lines += ["", "## Chat format", "", *(f"- {f}" for f in formats)]
    for e in lineage:
        if settings := _stage_settings(e):
            dump = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False).strip()
            lines += [
                "",
                f"<details><summary>{e.stage} settings</summary>",
                "",
                "```yaml",
                dump,
                "```",
                "",
                "</details>",
            ]
    if any(e.speedups for e in lineage):  # what alignkit.speedups applied: exact, but a bug report needs them
        lines += ["", "## Speed-ups", "", "| stage | process | model | trainer |", "|---|---|---|---|"]
        lines += [
            f"| {e.stage} | "
            + " | ".join(", ".join(e.speedups.get(p, [])) or "-" for p in ("process", "model", "trainer"))
            + " |"
            for e in lineage
            if e.merge is None
        ]
    if merge:
        lines += [
            "",
            "## Merge",
            "",
            f"- method: `{merge.method}` ({MERGE_METHOD_TEXT[merge.method]})",
            f"- merged from: `{portable_name(lineage[-1].from_adapter)}`",
            f"- parity vs base + adapter: max |logit diff| {merge.max_abs_logit_diff:.3g} "
            f"(bound {merge.max_logit_diff_bound:g}, {'passed' if merge.parity_passed else 'NOT passed'})"
            + (f"; loss delta {merge.loss_delta:+.3g}" if merge.loss_delta is not None else ""),
        ]
    if record.exports:
        lines += [
            "",
            "## GGUF exports",
            "",
            "| file | outtype | MiB | max \\|logit diff\\| vs merged (bound) | loss delta (bound) | llama.cpp: agreement, "
            "stop rate, perplexity change |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        lines += [
            f"| `{x['file']}` | {x['outtype']} | {x['mib']} | "
            + (f"{x['max_abs_logit_diff']:.3g} ({x['bound']:g}) | {x['loss_delta']:+.3g} ({x.get('loss_bound', '-')})"
               if "max_abs_logit_diff" in x else "- | -")
            + " | "
            + (f"{x['agreement']:.1%}, {x['stop_rate']:.0%}, {x['ppl_change']:+.2%}"
               + ("" if x.get("gate_passed") else " (outside the gate)") if "agreement" in x else "not gated")
            + " |"
            for x in record.exports
        ]  # fmt: skip
    if record.metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(record.metrics.items())]
    lines += ["", "## Intended use", ""]
    lines += [
        "Research and experimentation; check the datasets' licences and evaluate on your own task before deploying.",
        "",
        "See 'Sentence embeddings' below."
        if embedding
        else "Load with `peft.AutoPeftModelForCausalLM.from_pretrained(...)` (the base model must be available)."
        if is_adapter
        else "Load with `transformers.AutoModelForCausalLM.from_pretrained(...)`.",
        "",
    ]
    if embedding:
        lines += _embedding_section(lineage[-1].head_config, is_adapter)
    if all((e.task or "causal_lm") == "causal_lm" for e in lineage):
        lines += [
            "## Chat, evaluate, export",
            "",
            "```bash",
            "alignkit chat MODEL                                   # streams replies; piped stdin: a prompt per line",
            "alignkit generate MODEL --prompts p.jsonl --out replies.jsonl",
            "alignkit eval MODEL --data held_out.jsonl --metric exact   # or regex --pattern, rouge, bleu",
            "alignkit export gguf MODEL --outtype q8_0              # llama.cpp / Ollama / LM Studio, parity-gated",
            "```",
            "",
            "`MODEL` is this folder (downloaded from the Hub: `huggingface-cli download <repo> --local-dir MODEL`).",
            "",
        ]
    return "\n".join(lines)


def _embedding_section(head: dict, is_adapter: bool) -> list[str]:
    """A sentence-embedding output (the embed stage): its format, loss and pooling, and how to load it."""
    facts = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in head.items())
    load = (
        "This folder is a PEFT adapter: `alignkit merge THIS_FOLDER` writes the plain SentenceTransformer folder."
        if is_adapter
        else "Load with `sentence_transformers.SentenceTransformer(THIS_FOLDER)`; `model.encode(texts)` gives one "
        "embedding per text."
    )
    return ["## Sentence embeddings", "", f"- {facts}", f"- {load}", ""]


def write_model_card(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    path = output_dir / "README.md"
    tmp = path.with_name(f".README.md.alignkit-{os.getpid()}")  # written beside it and renamed: never half a card
    tmp.write_text(render_model_card(RunRecord.read(output_dir)))
    tmp.replace(path)
    return path

"""Model cards (README.md) written from a run's alignkit_run.json: base model, datasets, stage lineage with each
stage's key settings, hand-off and merge method, final metrics, intended use. For adapter and merged outputs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alignkit.models.loader import RUN_METADATA

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


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not name.startswith("tiny:") and name.count("/") == 1 and not Path(name).exists()


def _stage_settings(entry: dict) -> dict:
    flat = {k: v for group in (entry.get("config") or {}).values() for k, v in group.items()}
    return {k: flat[k] for k in KEY_SETTINGS if k in flat and flat[k] is not None}


def render_model_card(meta: dict) -> str:
    base = meta.get("base_model_args", {})
    lineage = meta.get("lineage", [])
    merge = meta.get("merge")
    stages = [e["stage"].upper() for e in lineage if e["stage"] != "merge"]
    is_adapter = bool(lineage and lineage[-1].get("adapter")) and not merge
    header = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}"]
    if _is_hub_id(base.get("model_name_or_path")):
        header.append(f"base_model: {base['model_name_or_path']}")
    lines = [
        *header,
        "tags: [alignkit]",
        "---",
        "",
        f"# {' -> '.join(stages) or 'alignkit'} {'merged model' if merge else 'output'}",
        "",
        f"Trained with alignkit {meta.get('alignkit_version', '')}, stages: {' -> '.join(stages) or '-'}.",
        "",
        "## Base model",
        "",
        f"- `{base.get('model_name_or_path')}`"
        + (f" (GGUF file `{base['gguf_file']}`, dequantized)" if base.get("gguf_file") else ""),
        "",
        "## Lineage",
        "",
        "| # | stage | datasets | adapter | quantization | hand-off / method | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(lineage, 1):
        data = ", ".join(f"{d['path']} (x{d['weight']})" for d in e.get("datasets", [])) or "-"
        if e["stage"] == "merge":
            lines.append(f"| {i} | merge | - | merged | none | {e['method']} | `{e.get('output_dir')}` |")
            continue
        lines.append(
            f"| {i} | {e['stage']} | {data} | {e.get('adapter') or 'full'} | {e.get('quantization') or 'none'} | "
            f"{e.get('adapter_handoff') or '-'} | `{e.get('output_dir')}` |"
        )
    for e in lineage:
        if settings := _stage_settings(e):
            dump = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False).strip()
            lines += [
                "",
                f"<details><summary>{e['stage']} settings</summary>",
                "",
                "```yaml",
                dump,
                "```",
                "",
                "</details>",
            ]
    if merge:
        lines += [
            "",
            "## Merge",
            "",
            f"- method: `{merge['method']}` ({MERGE_METHOD_TEXT[merge['method']]})",
            f"- merged from: `{merge['from_adapter']}`",
            f"- parity vs base + adapter: max |logit diff| {merge['max_abs_logit_diff']:.3g} "
            f"(bound {merge['max_logit_diff_bound']:g}, {'passed' if merge['parity_passed'] else 'NOT passed'}); "
            f"loss delta {merge['loss_delta']:+.3g}",
        ]
    if meta.get("metrics"):
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(meta["metrics"].items())]
    lines += ["", "## Intended use", ""]
    lines += [
        "Research and experimentation; check the datasets' licences and evaluate on your own task before deploying.",
        "",
        "Load with `peft.AutoPeftModelForCausalLM.from_pretrained(...)` (the base model must be available)."
        if is_adapter
        else "Load with `transformers.AutoModelForCausalLM.from_pretrained(...)`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    meta = json.loads((output_dir / RUN_METADATA).read_text())
    path = output_dir / "README.md"
    path.write_text(render_model_card(meta))
    return path

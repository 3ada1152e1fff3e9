"""Label preview: one collated training example with the tokens that carry a label marked, so a user sees
exactly what the model learns (as the trainer's own collator builds it)."""

from __future__ import annotations


def label_preview(trainer, index: int = 0, max_tokens: int = 400) -> str:
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    ids = batch["input_ids"][index].tolist()
    labels = batch.get("labels", batch["input_ids"])[index].tolist()
    if "completion_mask" in batch and "labels" not in batch:
        labels = [t if m else -100 for t, m in zip(ids, batch["completion_mask"][index].tolist())]
    trained = sum(label != -100 for label in labels)
    shown_pairs = list(zip(ids, labels))[:max_tokens]
    pieces = [f"[{tokenizer.decode([t])}]" if label != -100 else tokenizer.decode([t]) for t, label in shown_pairs]
    shown = f" (the first {max_tokens} shown)" if len(ids) > max_tokens else ""
    legend = f"label preview: {trained}/{len(ids)} tokens are trained{shown}; trained tokens are shown [in brackets]"
    return chat_format_line(tokenizer) + legend + "\n" + "".join(pieces)


def chat_format_line(tokenizer) -> str:
    """'chat format: family qwen3, template twin (stock's training twin, proven by rendering)' + newline, or ''."""
    info = getattr(tokenizer, "alignkit_template", None)
    if info is None:
        return ""
    what = {
        "stock": "the tokenizer's own",
        "twin": "the stock template's training twin, proven to render the same text",
        "installed": "installed by the recipe's chat_template",
        "installed, twin": "installed by the recipe's chat_template, trained with its proven twin",
        "rendered": "a custom template without generation marks; assistant spans found by rendering",
    }.get(info.source, info.source)
    return f"chat format: family {info.family or 'unknown (custom template)'}, template {info.source} ({what})\n"

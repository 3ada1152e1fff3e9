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
    pieces, trained = [], 0
    for token_id, label in list(zip(ids, labels))[:max_tokens]:
        text = tokenizer.decode([token_id])
        if label != -100:
            trained += 1
            pieces.append(f"[{text}]")
        else:
            pieces.append(text)
    legend = f"label preview: {trained}/{len(ids)} tokens are trained; trained tokens are shown [in brackets]"
    return legend + "\n" + "".join(pieces)

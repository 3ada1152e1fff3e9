"""Causal-LM pretraining data: tokenize raw text and pack it into fixed-size blocks (no padding at all)."""

from __future__ import annotations


def pack_text_blocks(dataset, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenize ``text``, join documents with eos, and cut the stream into ``block_size`` blocks.

    The tail that does not fill a block is dropped, as in the HF course's group_texts.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in batch["text"]]}

    def group(batch):
        stream = [tok for ids in batch["input_ids"] for tok in ids]
        usable = (len(stream) // block_size) * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenize")
    packed = tokenized.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"pack into {block_size}-token blocks")
    if len(packed) == 0:
        from alignkit.errors import DataError

        raise DataError("datasets", None, f"the text is shorter than one block of {block_size} tokens", "lower block_size or add text")
    return packed

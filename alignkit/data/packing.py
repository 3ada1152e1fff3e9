"""No compute on padding: CPT text packed into fixed-size blocks, SFT batches concatenated instead of padded."""

from __future__ import annotations


def collate_blocks(features: list[dict]) -> dict:
    """Stack packed blocks (:func:`pack_text_blocks`) into a batch of ``[batch, block_size]`` tensors with
    transformers' ``default_data_collator``: blocks are full and carry their labels, so nothing is padded or masked."""
    from transformers import default_data_collator

    return default_data_collator(features)


def pack_text_blocks(dataset, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenize ``text`` (each document with the tokenizer's special tokens, e.g. bos, as trl tokenizes text), join
    documents with eos, and cut the stream into ``block_size`` blocks.

    The tail that does not fill a block is dropped, as in the HF course's group_texts (per 1000 documents). A
    ``datasets.IterableDataset`` (a streamed source) is packed lazily, as the trainer reads it; ``num_proc``
    (``dataset_num_proc``) tokenizes a loaded one in that many processes (the blocks are the same).
    """
    import datasets

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        # Each document as trl's SFTTrainer (and transformers' run_clm) tokenizes text: with the tokenizer's own
        # special tokens, so a family that starts every sequence with bos (Llama 3, Gemma, Mistral) trains on the
        # sequences it sees at inference; then eos, unless the tokenizer already ends the document with it.
        ids = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": [doc if eos and doc[-1:] == eos else doc + eos for doc in ids]}

    def group(batch):
        stream = [tok for ids in batch["input_ids"] for tok in ids]
        usable = (len(stream) // block_size) * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        # Labels are the blocks themselves: no collator masks "padding" by token id, which would also hide every
        # document-separating eos when pad == eos (SmolLM2, GPT-2). Blocks are full, so there is no padding.
        labels = [list(block) for block in blocks]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": labels}

    streamed = isinstance(dataset, datasets.IterableDataset)
    if streamed:
        ids = datasets.List(datasets.Value("int32"))
        tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
        packed = tokenized.map(
            group, batched=True, batch_size=1000,
            features=datasets.Features({"input_ids": ids, "attention_mask": ids, "labels": ids}),
        )  # fmt: skip
        empty = next(iter(packed), None) is None  # reads only as far as the first block
    else:
        tokenized = dataset.map(
            tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenize"
        )
        # one process cuts the blocks (cheap next to tokenizing): so the blocks do not depend on num_proc, whose
        # workers would each drop the tail of their own share
        packed = tokenized.map(group, batched=True, batch_size=1000, desc=f"pack into {block_size}-token blocks")
        empty = len(packed) == 0
    if empty:
        from alignkit.errors import DataError

        raise DataError(
            "datasets",
            None,
            f"the text is shorter than one block of {block_size} tokens",
            "lower block_size or add text",
        )
    return packed

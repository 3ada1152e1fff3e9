"""Label preview: one collated training example with the tokens that carry a label marked, so a user sees
exactly what the model learns (as the trainer's own collator builds it); and :func:`long_rows`, the rows of a source
longer than ``max_length`` named by file and line (a single 50 MB row among them), which training truncates or drops
and the truncation report counts; and :func:`prompts_filling`, the DPO/KTO rows trl drops (their prompt alone fills
``max_length``), named the same way."""

from __future__ import annotations

from alignkit.data.places import place

ELIDE_EDGE = 40  # an untrained stretch longer than 3x this shows its first and last ELIDE_EDGE tokens only


def label_preview(trainer, index: int = 0, max_tokens: int = 400) -> str:
    """One collated training example as text, each trained token (label != -100) shown ``[in brackets]``, headed by
    the chat format line (family and template source). A long untrained stretch (a tools preamble, a tool's
    result) is shortened to its two ends, so the trained calls, thinking and replies after it stay in view; at most
    ``max_tokens`` tokens are shown."""
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    ids = batch["input_ids"][index].tolist()
    labels = batch.get("labels", batch["input_ids"])[index].tolist()
    if "completion_mask" in batch and "labels" not in batch:
        labels = [t if m else -100 for t, m in zip(ids, batch["completion_mask"][index].tolist())]
    flags = [label != -100 for label in labels]
    trained = sum(flags)
    pieces, shown, elided, i = [], 0, 0, 0
    while i < len(ids) and shown < max_tokens:
        j = i
        while j < len(ids) and flags[j] == flags[i]:
            j += 1
        run = list(range(i, j))
        if not flags[i] and len(run) > 3 * ELIDE_EDGE:
            cut = len(run) - 2 * ELIDE_EDGE
            run = [*run[:ELIDE_EDGE], None, *run[-ELIDE_EDGE:]]
            elided += cut
        for k in run[: max_tokens - shown + (None in run)]:
            if k is None:
                pieces.append(f" ⟨…{cut} untrained tokens not shown…⟩ ")
                continue
            text = tokenizer.decode([ids[k]])
            pieces.append(f"[{text}]" if flags[k] else text)
            shown += 1
        i = j
    notes = []
    if elided:
        notes.append(f"{elided} untrained tokens elided")
    if shown < len(ids) - elided:
        notes.append(f"the first {shown} shown")
    extra = f" ({'; '.join(notes)})" if notes else ""
    legend = f"label preview: {trained}/{len(ids)} tokens are trained{extra}; trained tokens are shown [in brackets]"
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


def _row_text(tokenizer, row: dict) -> str:
    """The text a row trains on, rendered as the run renders it: a chat row through the template; prompt +
    completion (SFT) or prompt + the longer reply (DPO) as text or chat."""

    from alignkit.data.tools import row_tools

    def render(part) -> str:
        if isinstance(part, list):  # chat messages, with the row's tools as the run renders them
            return tokenizer.apply_chat_template(part, tools=row_tools(row), tokenize=False)
        return part if isinstance(part, str) else ""

    if "messages" in row:
        return render(row["messages"])
    prompt = row.get("prompt")
    replies = [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    if isinstance(prompt, list) and replies and isinstance(replies[0], list):
        return max((render(prompt + reply) for reply in replies), key=len)
    return render(prompt) + max((render(reply) for reply in replies), key=len, default="")


def count_tokens(tokenizer, text: str, max_length: int) -> tuple[int, bool]:
    """``(tokens, exact)``: how many tokens ``text`` has, for telling whether it exceeds ``max_length``. Every token
    covers at least one UTF-8 byte, so a text of no more bytes than ``max_length`` is not tokenized (its byte count is
    returned). A longer one is tokenized in growing prefixes (16 x max_length bytes, then x4) until a prefix exceeds
    max_length; the whole text's count is then that prefix's scaled by bytes (``exact`` False): a 50 MB row costs a
    few kB of tokenization instead of gigabytes of token ids."""
    data = text.encode("utf-8")
    if len(data) <= max_length:
        return len(data), False
    size = 16 * max_length
    while size < len(data):
        prefix = len(tokenizer(data[:size].decode("utf-8", errors="ignore"), add_special_tokens=False)["input_ids"])
        if prefix > max_length:
            return round(prefix * len(data) / size), False
        size *= 4
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]), True


def long_rows(tokenizer, rows, places, label: str, max_length: int) -> list[tuple[str, int, int, bool]]:
    """``(source, row, tokens, exact)`` of every row of ``rows`` (a checked source split, in its file's order) whose
    rendered text is longer than ``max_length`` tokens, longest first (:func:`count_tokens`: ``exact`` False for an
    estimate). ``places``: :func:`alignkit.data.sources.row_places`."""
    found = []
    for index, row in enumerate(rows):
        tokens, exact = count_tokens(tokenizer, _row_text(tokenizer, row), max_length)
        if tokens > max_length:
            found.append((*place(places, label, index), tokens, exact))
    return sorted(found, key=lambda f: -f[2])


def prompts_filling(tokenizer, rows, places, label: str, max_length: int) -> list[tuple[str, int]]:
    """``(source, row)`` of each row of ``rows`` (a checked DPO or KTO source split, in its file's order) whose prompt
    alone has ``max_length`` tokens or more, rendered as trl 1.16's DPOTrainer and KTOTrainer render it (a chat prompt
    through the template with the generation prompt and the row's ``tools``; a text prompt tokenized with its
    special tokens): with ``truncation_mode: keep_start`` (KTO's only mode) those trainers drop such a row, whose
    reply the collator would cut whole. The prompt alone is measured (trl keeps the part of it that prefixes
    prompt + reply, the same tokens with every stock template); a huge one is estimated (:func:`count_tokens`).
    ``places``: :func:`alignkit.data.sources.row_places`."""
    from alignkit.data.tools import row_tools

    if "prompt" not in (rows.column_names or []):
        return []
    specials = len(tokenizer("")["input_ids"])  # what tokenizing a text prompt adds (a bos)
    found = []
    for index, row in enumerate(rows):
        prompt, extra = row["prompt"], 0
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(
                prompt, tools=row_tools(row), add_generation_prompt=True, tokenize=False
            )
        else:
            text, extra = prompt or "", specials
        size = len(text.encode("utf-8"))  # every token covers at least one byte
        if size + extra < max_length:
            continue
        if size <= 16 * max_length:
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            tokens = count_tokens(tokenizer, text, max_length)[0]
        if tokens + extra >= max_length:
            found.append(place(places, label, index))
    return found


def long_rows_line(found: list[tuple[str, int, int, bool]], max_length: int, shown: int = 5) -> str:
    """'2 row(s) longer than max_length 128 tokens (...): data.jsonl line 65 (~600,016 tokens), ...' or ''."""
    if not found:
        return ""
    named = ", ".join(f"{source} line {row} ({'' if exact else '~'}{tokens:,} tokens)"
                      for source, row, tokens, exact in found[:shown])  # fmt: skip
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return (f"   {len(found)} row(s) longer than max_length {max_length} tokens (training truncates them, or drops a "
            f"row whose trained part lies wholly beyond; the truncation report counts them): {named}{more}")  # fmt: skip

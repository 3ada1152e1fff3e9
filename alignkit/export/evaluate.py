"""Generation-based evaluation (``alignkit eval``; the demo pipeline scores its models with the same code).

Rows (JSON lines or a JSON array, plain or compressed, CSV, parquet: the same rows read the same way whatever the file,
alignkit.export.generate.held_out_rows): ``messages`` ending on a user turn plus a reference ``answer``, ``messages``
ending on the reference assistant turn, or ``prompt`` + ``answer``; or held-out rows in any training data format
(alpaca, sharegpt, hh, ...), read as training reads them, the final reply the reference. Replies are greedy
(alignkit.export.generate). Metrics:

- ``exact``: the stripped reply equals the reference.
- ``regex``: ``--pattern`` (one group) finds the answer in the reply: ``format`` is the share of replies where it
  matches, ``exact`` the share whose group equals the reference (as numbers when both are numbers).
- ``rouge``: mean ROUGE-L F1 (Lin 2004; the ``rouge-score`` package, stemming on).
- ``bleu``: corpus BLEU (Papineni et al. 2002; ``sacrebleu`` defaults), per-row sentence BLEU alongside.

Each row's reply and scores go to ``eval_rows.jsonl``, the summary to ``eval_summary.json``, in ``--out``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignkit.errors import ConfigError, DataError
from alignkit.export.outputs import check_output, staged_output

METRICS = ("exact", "regex", "rouge", "bleu")


def read_eval_rows(path: str | Path, with_tools: bool = False):
    """(conversations ending on a user turn, references) of an eval file; DataError naming the line otherwise.
    JSON lines in the layout above (a row may carry ``tools``), or any training data format (alpaca, sharegpt, hh,
    ...: read by the training readers, the final reply the reference; alignkit.export.generate.training_format_rows).
    ``with_tools``: (conversations, references, tools), each row's tools (or None) to render its prompt with."""
    from alignkit.data.schemas import check_messages
    from alignkit.data.tools import with_object_arguments
    from alignkit.export.generate import own_layout_rows, own_row_tools, training_format_rows

    own = own_layout_rows(path)
    if own is None:
        published = training_format_rows(path)
        for (file, row), _, _, reply, _ in published:
            if reply is None or not str(reply).strip():
                raise DataError(file, row, "has no final reply to score against", "end the row on the reference reply")
        conversations, references = [p[2] for p in published], [p[3] for p in published]
        return (conversations, references, [p[4] for p in published]) if with_tools else (conversations, references)
    conversations, references, tools = [], [], []
    for line_no, row in own:
        messages, answer = row.get("messages"), row.get("answer")
        if messages is not None:
            check_messages(messages, str(path), line_no, "messages", must_end_on_assistant=False)
        ends_on_reply = bool(messages) and messages[-1]["role"] == "assistant"
        if ends_on_reply and "answer" in row:
            raise DataError(
                str(path), line_no, "has an 'answer' and 'messages' that end on an assistant reply: which is the reference?",
                "drop 'answer' (the last reply is the reference) or the last reply (the model answers the user turn)",
            )  # fmt: skip
        if "answer" in row and (answer is None or isinstance(answer, (list, dict))):
            raise DataError(
                str(path), line_no, f"'answer' is {answer!r}", "give the reference answer as text or a number"
            )
        if ends_on_reply and len(messages) > 1:
            conversations.append(with_object_arguments(messages[:-1]))
            references.append(messages[-1]["content"])
        elif "answer" in row and messages and not ends_on_reply:
            conversations.append(with_object_arguments(messages))
            references.append(answer)
        elif "answer" in row and messages is None and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            conversations.append([{"role": "user", "content": row["prompt"]}])
            references.append(answer)
        else:
            raise DataError(
                str(path), line_no, "needs 'messages' ending on the reference reply after a user turn, or "
                "'messages'/'prompt' and 'answer'",
                "add the reference as 'answer', or end 'messages' with the assistant's reply",
            )  # fmt: skip
        tools.append(own_row_tools(row, path, line_no))
    if not conversations:
        raise DataError(str(path), None, "has no rows", "add held-out rows, one JSON object per line")
    return (conversations, references, tools) if with_tools else (conversations, references)


def _same(found: str, reference) -> bool:
    try:
        return float(found) == float(reference)
    except (TypeError, ValueError):
        return found.strip() == str(reference).strip()


def score(replies: list[str], references: list, metric: str, pattern: str | None = None) -> tuple[list[dict], dict]:
    """(per-row scores, summary) of ``replies`` against ``references`` by ``metric`` (see the module docstring)."""
    if metric not in METRICS:
        raise ConfigError(f"--metric: '{metric}' is not one of {list(METRICS)}. Fix: pick one of them.")
    n = len(replies)
    if metric == "exact":
        rows = [{"exact": r.strip() == str(ref).strip()} for r, ref in zip(replies, references)]
        return rows, {"exact": sum(r["exact"] for r in rows) / n}
    if metric == "regex":
        if not pattern:
            raise ConfigError("--metric regex needs --pattern with one group, e.g. 'ANSWER:\\s*(-?\\d+)'.")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--pattern: not a valid regular expression ({exc}). Fix: correct it.") from None
        if compiled.groups < 1:
            raise ConfigError("--pattern: needs one group around the answer, e.g. 'ANSWER:\\s*(-?\\d+)'.")
        rows = []
        for reply, ref in zip(replies, references):
            match = compiled.search(reply)
            found = match.group(1) if match is not None else None  # an optional group may not take part
            rows.append({"format": found is not None, "exact": found is not None and _same(found, ref)})
        return rows, {"format": sum(r["format"] for r in rows) / n, "exact": sum(r["exact"] for r in rows) / n}
    if metric == "rouge":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rows = [{"rougeL": scorer.score(str(ref), r)["rougeL"].fmeasure} for r, ref in zip(replies, references)]
        return rows, {"rougeL": sum(r["rougeL"] for r in rows) / n}
    import sacrebleu

    rows = [{"bleu": sacrebleu.sentence_bleu(r, [str(ref)]).score} for r, ref in zip(replies, references)]
    return rows, {"bleu": sacrebleu.corpus_bleu(replies, [[str(ref) for ref in references]]).score}


def check_eval_out(out: str | Path, model: str | Path) -> Path:
    """``--out`` for ``alignkit eval``: a new or empty folder, or an earlier eval's (which is replaced); a file or a
    folder of something else is refused (ConfigError), before the model loads."""
    return check_output(out, "folder", inputs=[model], ours=lambda p: (p / "eval_summary.json").is_file(), flag="--out")


def evaluate(
    model, tokenizer, conversations: list[list[dict]], references: list, metric: str, pattern: str | None = None,
    out: str | Path | None = None, max_new_tokens: int = 256, batch_size: int = 64, tools: list | None = None,
) -> tuple[list[dict], dict]:  # fmt: skip
    """Generate replies, score them, write ``eval_rows.jsonl`` and ``eval_summary.json`` into ``out`` (if given;
    an earlier eval folder there is replaced whole, anything else refused: see :func:`check_eval_out`).
    ``tools``: each conversation's tools (or None), rendered with its prompt as training renders it."""
    from alignkit.export.generate import generate_replies

    score(["x"], ["x"], metric, pattern)  # a bad metric or pattern fails before any generation
    replies = generate_replies(
        model, tokenizer, conversations, batch_size=batch_size, max_new_tokens=max_new_tokens, tools=tools
    )
    rows, summary = score(replies, references, metric, pattern)
    rows = [
        {"prompt": c[-1]["content"], "reference": ref, "reply": reply, **s}
        for c, ref, reply, s in zip(conversations, references, replies, rows)
    ]
    summary = {"metric": metric, "rows": len(rows), **summary}
    if out is not None:
        with staged_output(Path(out)) as scratch:  # built beside it and swapped in whole
            (scratch / "eval_rows.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
            (scratch / "eval_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows, summary

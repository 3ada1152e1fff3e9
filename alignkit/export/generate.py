"""Generation from trained outputs: one loader and one generate loop for ``alignkit chat``, ``alignkit generate``
and the demo pipeline's evaluation (no second copy).

A model is loaded as it was trained: a merged or plain model directory as it is; an adapter run on its base, the
way the run loaded it (4-bit if it trained so). ``merge=True`` (the demo's evaluation) instead merges the adapter in
memory into the base, 4-bit dequantized back to float32 as ``alignkit merge`` does, so the adapter costs nothing
per generated token. Replies stop at the chat template's end-of-turn token and at eos
(:func:`alignkit.data.templates.end_of_turn_ids`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from alignkit.data.schemas import check_messages
from alignkit.data.templates import end_of_turn_ids
from alignkit.errors import ConfigError, DataError
from alignkit.export.outputs import check_output, make_folders, remove_folders, staged_output


def load_for_generation(path: str | Path, merge: bool = False):
    """(model, tokenizer) of a run or model folder, in eval mode, with the head it was trained with (a causal LM
    for cpt/sft/dpo/..., a one-output sequence-classification head for a reward model): see
    :func:`alignkit.models.trained.load_trained`."""
    from alignkit.models.trained import load_trained

    return load_trained(path, merge=merge)


def check_generates(path: str | Path, command: str) -> None:
    """ConfigError, before any model loads, when ``path`` is an alignkit run (or its merge, or a checkpoint) whose
    head does not write replies: a reward model, a task head (classification, NER, QA, masked-LM, seq2seq) or
    sentence embeddings. ``alignkit chat/generate/eval/serve`` render chat prompts for a causal LM's ``generate``;
    such a model would fail inside transformers (no ``generate``, no chat template) with a traceback."""
    from alignkit.errors import ConfigError
    from alignkit.runs import RunRecord
    from alignkit.stages import stages_training

    record = RunRecord.for_model(path) if Path(path).is_dir() else None
    last = record.lineage[-1] if record and record.lineage else None
    head = (last.task or "causal_lm") if last else "causal_lm"
    if head == "causal_lm":
        return
    if last.stage == "reward":
        what = "a reward model (a one-output score head)"
        use = (
            f"score (prompt, reply) pairs with alignkit.export.reward_model.RewardModel('{path}').score(prompts, "
            "replies), or name the folder in reward_funcs of a grpo, rloo or online_dpo recipe"
        )
    else:
        what = f"the {last.stage} stage's {head} model"
        use = f"use it as its model card ({Path(path) / 'README.md'}) says, e.g. alignkit.models.load_trained('{path}')"
    raise ConfigError(
        f"{path}: {what}, which does not write replies, so alignkit {command} cannot run it. Fix: {use}; "
        f"alignkit {command} takes a run of {'/'.join(stages_training('causal_lm'))} or its merged folder."
    )


def prompt_text(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """The text a chat prompt is generated from: ``messages`` (ending on a user or tool turn) through the chat
    template with the generation prompt and the row's ``tools`` (JSON function schemas), as training renders the
    same row (trl's trainers pass a row's tools to ``apply_chat_template``)."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_replies(
    model, tokenizer, conversations: list[list[dict]], batch_size: int = 64, max_new_tokens: int = 256,
    progress: bool = False, tools: list | None = None, **generation,
) -> list[str]:  # fmt: skip
    """Replies to chat prompts (each a message list ending on a user turn), batched with left padding; greedy unless
    ``generation`` asks for sampling (``do_sample``, ``temperature``, ``top_p``). ``tools``: each conversation's tools
    (a list of JSON function schemas, or None), rendered with it (:func:`prompt_text`)."""
    model.eval()
    tokenizer.padding_side = "left"
    replies: list[str] = []
    cut = 0
    starts = range(0, len(conversations), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", total=len(starts))
    for i in starts:
        texts = [
            prompt_text(tokenizer, c, tools[i + j] if tools else None)
            for j, c in enumerate(conversations[i : i + batch_size])
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **{"do_sample": False, **generation},
        )
        new = out[:, batch["input_ids"].shape[1] :]
        stops = end_of_turn_ids(tokenizer)
        cut += sum(stop_missing(row, stops, max_new_tokens) for row in new.tolist())
        for j, row in enumerate(new.tolist()):
            prefix = tokenizer(texts[j], add_special_tokens=False)["input_ids"]
            replies.append(reply_text(tokenizer, row, prefix, stops, tools[i + j] if tools else None))
    if cut:
        print(
            f"alignkit: {cut} of {len(replies)} replies were cut at max_new_tokens {max_new_tokens} before a stop "
            "token (raise --max_new_tokens to see them whole)", file=sys.stderr,
        )  # fmt: skip
    return replies


def reply_text(tokenizer, ids: list[int], prefix: list[int], stops: list[int], tools: list | None = None) -> str:
    """A generated reply (``ids``, after the prompt ``prefix``) as text: the reply's content, read by the family's
    response parser (trl's ``parse_response``, :func:`alignkit.data.tools.set_response_parser`), without the
    reasoning written before it (Qwen3's and DeepSeek-R1's ``<think>`` block, gpt-oss's analysis channel, whose
    channel markers a plain decode would run together with the answer): what training rendered as the reply's
    ``content``, so ``exact`` compares the answer and a chat's history holds what training saw. A reply with tool
    calls, or from a template without a parser, is the decoded text (special tokens skipped), the calls as the
    family writes them."""
    end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
    ids = ids[:end]
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    from alignkit.data.tools import set_response_parser

    if not set_response_parser(tokenizer):
        return plain
    from trl.chat_template_utils import parse_response

    try:
        parsed = parse_response(tokenizer, ids, prefix=prefix, tools=tools)
    except Exception:  # noqa: BLE001 - a reply the parser cannot read is shown as decoded
        return plain
    content, thought = parsed.get("content"), parsed.get("reasoning_content") or parsed.get("thinking")
    if parsed.get("tool_calls") or not isinstance(content, str) or not (content or thought):
        return plain  # a call, or nothing the parser could read (a reply cut before any channel): as written
    return content


def stop_missing(ids: list[int], stops: list[int], max_new_tokens: int) -> bool:
    """A generated reply (its new token ids) that ran to ``max_new_tokens`` without a stop token: cut."""
    return len(ids) >= max_new_tokens and not any(t in stops for t in ids)


def _drop_nulls(row: dict) -> dict:
    """A row read through datasets (CSV, parquet) without the keys Arrow filled with null: absent in the file."""
    row = {k: v for k, v in row.items() if v is not None}
    if isinstance(row.get("messages"), list):
        row["messages"] = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in row["messages"]
        ]
    return row


def held_out_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``[(row number, row)]`` of a held-out file, the same rows whatever its name: JSON lines or a JSON array, in
    a ``.jsonl`` or ``.json`` file, plain or compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``), each row as written
    (a JSON-lines row numbered by its line, blank lines counted; an array's by its place, from 1); a CSV or parquet
    file through datasets' readers, the columns a row leaves empty dropped, numbered as a run numbers them. DataError
    naming the file (not found, unreadable, no rows) or the row (bad JSON, not an object)."""
    from alignkit.config.args import DatasetSource
    from alignkit.data.files import data_suffix, read_text, special_format
    from alignkit.data.places import place
    from alignkit.data.sources import load_source_split, row_places

    path = Path(path)
    if not path.is_file():
        raise DataError(
            str(path), None, "file not found", "check the path (relative paths start from the current directory)"
        )
    source = DatasetSource(path=str(path))
    if data_suffix(path) in (".jsonl", ".json") and not special_format(path, source):
        text = read_text(path)
        if text.lstrip().startswith("["):  # a JSON array of rows
            try:
                array = json.loads(text)
            except ValueError as exc:
                raise DataError(str(path), getattr(exc, "lineno", None), f"is not valid JSON ({exc})",
                                "correct the JSON array") from None  # fmt: skip
            numbered = list(enumerate(array if isinstance(array, list) else [array], start=1))
        else:
            numbered = []
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    numbered.append((line_no, json.loads(line)))
                except ValueError as exc:
                    raise DataError(
                        str(path), line_no, f"not valid JSON ({exc})", "write one JSON object per line"
                    ) from None
        for row_no, row in numbered:
            if not isinstance(row, dict):
                raise DataError(str(path), row_no, "is not a JSON object", "write one {...} object per row")
        return numbered
    rows = load_source_split(source)
    if rows is None:
        return []
    places = row_places(source)
    return [(place(places, str(path), i)[1], _drop_nulls(row)) for i, row in enumerate(rows.to_list())]


def own_layout_rows(path: str | Path) -> list[tuple[int, dict]] | None:
    """:func:`held_out_rows` of a file in alignkit's own prompt/eval layout, None for a training data format. Decided
    by the first row's keys, never by the file's name or compression: ``messages`` (ending on a user turn, or on
    the reply), ``answer``, or a ``prompt`` without a reply column (``completion``, ``chosen``) is alignkit's own;
    anything else (alpaca, sharegpt, hh, preference, prompt/completion rows) goes to the training readers
    (:func:`training_format_rows`). A folder, glob or Hub id: None."""
    if not Path(path).is_file():
        return None if Path(path).exists() else held_out_rows(path)  # a missing file: held_out_rows names it
    rows = held_out_rows(path)
    first = rows[0][1] if rows else {}
    own = "messages" in first or "answer" in first or ("prompt" in first and not {"completion", "chosen"} & set(first))
    return rows if own else None


def training_format_rows(path: str | Path) -> list[tuple[tuple[str, int], dict, list[dict], object, object]]:
    """``[((file, row), row as read, conversation, reference, tools)]`` of a file in a training data format (alpaca,
    sharegpt, hh, preference_messages, prompt_completion, messages; a JSON array, a compressed, CSV or parquet
    file), read by the training readers (alignkit.data: the same detection, conversion and row places as a run's
    ``datasets:`` source): the conversation up to the last user turn, the reference its final reply (None when the
    conversation ends on the user), the row's tools as training renders them (JSON function schemas, call
    arguments as objects: :func:`alignkit.data.tools.normalize_tool_rows`; None without). A file in alignkit's own
    layout is read by :func:`own_layout_rows` instead (callers ask it first). DataError naming the file/row."""
    from alignkit.config.args import DatasetSource
    from alignkit.data.formats import convert_source
    from alignkit.data.places import place
    from alignkit.data.sources import load_source_split, row_places
    from alignkit.data.tools import normalize_tool_rows, row_tools

    source = DatasetSource(path=str(path))
    rows = load_source_split(source)
    if rows is None or not len(rows):
        raise DataError(str(path), None, "has no rows", "add held-out rows")
    places = row_places(source)
    converted = normalize_tool_rows(convert_source(rows, source, "sft", str(path), places))
    out = []
    for i, row in enumerate(converted):
        messages = row.get("messages")
        if messages is None:  # prompt_completion: text, or chat messages and a reply
            prompt, reply = row.get("prompt"), row.get("completion")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            reply = reply[-1]["content"] if isinstance(reply, list) and reply else reply
        elif messages and messages[-1].get("role") == "assistant" and len(messages) > 1:
            messages, reply = messages[:-1], messages[-1].get("content")
        else:
            reply = None
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # Arrow's null-filled keys
        out.append((place(places, str(path), i), rows[i], messages, reply, row_tools(row)))
    return out


def own_row_tools(row: dict, path: str | Path, line_no: int) -> list | None:
    """A row of alignkit's own layout's ``tools`` (a list of JSON function schemas, or that list as JSON text) as
    objects, checked (DataError naming the line); None without."""
    from alignkit.data.tools import row_tools, tool_names

    tool_names(row.get("tools"), str(path), line_no)
    return row_tools(row)


def read_prompts(path: str | Path, with_tools: bool = False):
    """``(rows, conversations)`` of a held-out file, the same rows read the same way whatever its name or compression
    (:func:`held_out_rows`). alignkit's own layout (:func:`own_layout_rows`): a ``prompt`` (text), or ``messages``
    (and any ``tools``): ending on a user (or tool) turn, the whole list is the prompt; ending on an assistant reply,
    the messages before that reply are. Any training data format (:func:`training_format_rows`: alpaca, sharegpt,
    hh rows are answered up to their last user turn). Rows are written back as read, with the reply.
    ``with_tools``: ``(rows, conversations, tools)``, each row's tools (or None) to render its prompt with, as
    training does. DataError naming the file and row, with the fix."""
    from alignkit.data.tools import with_object_arguments

    own = own_layout_rows(path)
    if own is None:
        published = training_format_rows(path)
        rows, conversations = [p[1] for p in published], [p[2] for p in published]
        return (rows, conversations, [p[4] for p in published]) if with_tools else (rows, conversations)
    rows, conversations, tools = [], [], []
    for line_no, row in own:
        messages = row.get("messages")
        if messages is not None:
            check_messages(messages, str(path), line_no, "messages", must_end_on_assistant=False)
            if messages[-1]["role"] == "assistant":  # a training row: the model answers what came before the reply
                if not any(m["role"] == "user" for m in messages[:-1]):
                    raise DataError(
                        str(path), line_no, "has 'messages' with no user turn before the final reply",
                        "give the row a user turn for the model to answer",
                    )  # fmt: skip
                messages = messages[:-1]
            conversations.append(with_object_arguments(messages))
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            conversations.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise DataError(
                str(path), line_no, "has neither 'messages' nor a 'prompt' (text)",
                "give each row 'prompt' (text) or 'messages' (a user turn, optionally the reply after it)",
            )  # fmt: skip
        tools.append(own_row_tools(row, path, line_no))
        rows.append(row)
    if not rows:
        raise DataError(str(path), None, "has no rows", "add prompts, one JSON object per line")
    return (rows, conversations, tools) if with_tools else (rows, conversations)


def check_generate_out(out: str | Path, prompts: str | Path, model: str | Path | None = None) -> Path:
    """``--out`` of ``alignkit generate``: not a folder, not the prompts file, not a file of the model folder (an
    earlier replies file elsewhere is replaced). Raises ConfigError."""
    out = Path(out)
    if out.exists() and not out.is_file() and not out.is_dir():  # /dev/null, a pipe: written as a stream
        return out
    if out.exists() and out.resolve() == Path(prompts).resolve():
        raise ConfigError(f"--out {out}: is the --prompts file; writing there would replace it. Fix: choose another "
                          "--out.")  # fmt: skip
    return check_output(out, "file", inputs=[model] if model else [], ours=lambda p: p.suffix == ".jsonl",
                        flag="--out")  # fmt: skip


def generate_file(model, tokenizer, prompts: str | Path, out: str | Path, batch_size: int = 8, **generation) -> Path:
    """``alignkit generate``: every row of ``prompts`` with its ``reply``, written to ``out`` (JSONL). Folders made
    for ``out`` are removed again if generation fails before writing. Raises DataError/ConfigError (bad rows, bad
    ``out``)."""
    rows, conversations, tools = read_prompts(prompts, with_tools=True)
    out = check_generate_out(out, prompts)
    made = make_folders(out.parent)  # before the replies are made, not after (a bad path fails first)
    try:
        replies = generate_replies(
            model, tokenizer, conversations, batch_size=batch_size, progress=True, tools=tools, **generation
        )
        text = "".join(json.dumps({**row, "reply": reply}) + "\n" for row, reply in zip(rows, replies))
        if out.exists() and not out.is_file():  # a device or pipe: no file to replace
            out.write_text(text)
        else:
            with staged_output(out, "file") as scratch:  # written beside it and renamed: never half a file there
                scratch.write_text(text)
    except BaseException:
        remove_folders(made)  # nothing written: no folder left behind
        raise
    print(f"wrote {len(rows)} replies to {out}", file=sys.stderr)
    return out


def chat_loop(model, tokenizer, system: str | None = None, max_new_tokens: int = 256, tools: list | None = None,
              **generation) -> None:  # fmt: skip
    """``alignkit chat``: a conversation on stdin/stdout. At a terminal each reply streams token by token
    (transformers' TextStreamer); with stdin piped, each input line is the next user turn and each reply is printed
    on one line (its newlines as spaces), so a script can drive it. The conversation keeps its history. ``tools``:
    JSON function schemas rendered into every prompt (:func:`prompt_text`); a reply that calls one shows the call as
    the family writes it."""
    from transformers import TextStreamer

    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    tokenizer.padding_side = "left"
    stops = end_of_turn_ids(tokenizer)
    if interactive:
        print("alignkit chat: an empty line or Ctrl-D ends the conversation.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            if interactive:
                break
            continue
        messages.append({"role": "user", "content": line})
        text = prompt_text(tokenizer, messages, tools)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if interactive else None
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                streamer=streamer, **generation,
            )  # fmt: skip
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        reply = reply_text(tokenizer, new, batch["input_ids"][0].tolist(), stops, tools)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            print(" ".join(reply.split("\n")), flush=True)

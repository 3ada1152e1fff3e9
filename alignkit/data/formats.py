"""Dataset formats as published, converted to a stage's canonical columns before its schema checks them.

Each format is a small pure converter of one row (tested on hand-written rows in tests/data/test_formats.py),
applied lazily with ``datasets.map``. (CoNLL and SQuAD files: alignkit.data.file_formats.) A source's ``format:`` names one; unset, it is detected from the columns (and
the first row) and logged once per source; a source that matches two formats is reported, never guessed.

| format | columns (as published) | becomes |
|---|---|---|
| ``messages`` | ``messages``: [{role, content}] (OpenAI / HF chat) | itself |
| ``prompt_completion`` | ``prompt``, ``completion`` | itself |
| ``alpaca`` | ``instruction``, ``input`` (optional), ``output``, ``system``/``history`` (optional) | ``messages`` |
| ``sharegpt`` | ``conversations``: [{from, value}] (``human``/``gpt``/``system``, ``function_call``/``observation``; ``roles:`` maps others), ``tools`` | ``messages`` (tool calls as ``tool_calls``, results as ``tool`` messages), ``tools`` |
| ``hh`` | ``chosen``, ``rejected``: whole ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts (Anthropic hh-rlhf) | DPO: ``prompt`` (the shared turns), ``chosen``/``rejected`` (the final replies); SFT: ``messages`` of ``chosen`` |
| ``preference_messages`` | ``chosen``, ``rejected``: whole message lists with a common prefix (UltraFeedback-binarized) | DPO: ``prompt``, ``chosen``, ``rejected``; SFT: ``messages`` of ``chosen`` |
| ``preference`` | ``prompt``, ``chosen``, ``rejected`` | itself |
| ``text`` | ``text`` (CPT) | itself |
| ``kto`` | ``prompt``, ``completion``, boolean ``label`` (unpaired, KTO) | itself |
| ``prompt`` | ``prompt`` and any reference columns (GRPO: the rewards read them) | itself |
| ``conll`` | a CoNLL column file: ``word [POS chunk] TAG`` per line, blank line between sentences (``tag_column:`` picks the column) | ``tokens``, ``ner_tags`` (IOB1 -> IOB2) |
| ``squad`` | SQuAD v1.1/v2.0 JSON: ``data[].paragraphs[].qas[]`` | ``id``, ``title``, ``question``, ``context``, ``answers`` |

The ``stage`` a converter is given is the kind of data the stage trains on, named by the stage that defined it:
``sft`` (chats), ``dpo`` (preference pairs: also ORPO, SimPO and reward modeling), ``cpt`` (text), ``kto``
(unpaired rows; the pair formats are unpaired for it, as trl's ``unpair_preference_dataset`` does: each pair gives a
desirable row, the chosen reply, and an undesirable one, the rejected) and ``grpo`` (prompts).

``columns:`` renames a source's columns to a format's (``{instruction: question, output: answer}``: the format's
name first); ``roles:`` maps a chat format's role tags (``{bot: assistant}``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.data.places import place
from alignkit.errors import DataError, suggest

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "tool_call", "observation": "tool", "tool": "tool"}  # fmt: skip
# LLaMA-Factory's sharegpt tool turns (its glaive-toolcall demo): a 'function_call' turn holds the call as JSON
# ({"name", "arguments"}, or a list of them), an 'observation' turn the tool's result
_HH_TURN = re.compile(r"\n\n(Human|Assistant):(?: |(?=\n\n)|$)")  # a turn may be empty: "\n\nAssistant:" at the end


class RowError(ValueError):
    """A row a converter cannot convert: ``problem`` and ``fix`` (the caller adds file, row and format)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclass(frozen=True)
class Format:
    name: str
    columns: tuple[str, ...]  # what identifies it
    convert: Callable[[dict, str, dict], dict] | None  # (row, stage, roles) -> canonical columns; None: as is
    stages: tuple[str, ...]  # the stages it feeds
    looks: Callable[[dict], bool] = lambda row: True  # a first-row check that tells apart formats with one layout


def _alpaca(row: dict, stage: str, roles: dict) -> dict:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RowError("'instruction' is empty or not text", "give every row an instruction")
    if not isinstance(output, str) or not output.strip():
        raise RowError("'output' is empty or not text", "give every row an output")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for j, turn in enumerate(row.get("history") or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RowError(f"history[{j}] is not a [question, answer] pair", "write history as [[q, a], ...]")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def _sharegpt(row: dict, stage: str, roles: dict) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' is not a non-empty list of {from, value} turns", "write [{from, value}, ...]")
    mapping = {**SHAREGPT_ROLES, **roles}
    messages = []
    for j, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"turn {j} lacks 'from' or 'value'", "give every turn a 'from' and a 'value'")
        tag = turn["from"]
        if tag not in mapping:
            raise RowError(
                f"turn {j} has from={tag!r}, a role tag it does not know{suggest(str(tag), mapping).rstrip('?')}",
                f"map it with roles: {{{tag}: assistant}} (or user / system) in this source",
            )
        if mapping[tag] == "tool_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(turn["value"], j)})
        else:
            messages.append({"role": mapping[tag], "content": turn["value"]})
    return {"messages": messages, **({"tools": row["tools"]} if "tools" in row else {})}


def _tool_calls(value, j: int) -> list[dict]:
    """A sharegpt ``function_call`` turn's value (``{"name", "arguments"}`` as JSON text, or a list of them) as
    OpenAI ``tool_calls``; the arguments stay JSON text (alignkit.data.tools parses them once the row is checked)."""
    import json

    fix = 'write the call as {"name": "<tool>", "arguments": {...}} (JSON text, as LLaMA-Factory\'s glaive demo does)'
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise RowError(f"turn {j} (function_call) is not JSON ({exc.msg})", fix) from None
    out = []
    for call in calls if isinstance(calls, list) else [calls]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise RowError(f"turn {j} (function_call) names no tool", fix)
        arguments = call.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        out.append({"type": "function", "function": {"name": call["name"], "arguments": text}})
    return out


def hh_turns(transcript: str) -> list[dict]:
    """An hh-rlhf transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages."""
    if not isinstance(transcript, str) or not _HH_TURN.search(transcript):
        raise RowError(
            "is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript", "use format: preference or hh rows"
        )
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise RowError(f"text before the first turn: {parts[0][:40]!r}", "start each transcript with '\\n\\nHuman: '")
    role = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": role[tag], "content": text.strip()} for tag, text in zip(parts[1::2], parts[2::2])]
    for j, turn in enumerate(turns, start=1):
        if not turn["content"]:
            last = " (the transcript ends on '\\n\\nAssistant:' with no reply)" if j == len(turns) else ""
            raise RowError(
                f"turn {j} ({turn['role']}) is empty{last}",
                "write the reply, or drop the row (on_bad_rows: skip drops such rows and lists them)",
            )
    return turns


def _split_preference(chosen: list[dict], rejected: list[dict], what: str) -> dict:
    """prompt = the turns both share; chosen/rejected = what follows (the final assistant replies)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":  # the prompt ends on the user's turn
        shared -= 1
    if shared == 0:
        raise RowError(
            f"the two {what} share no opening user turn, so there is no common prompt",
            "drop the row, or give both the same conversation up to the final reply",
        )
    rest_c, rest_r = chosen[shared:], rejected[shared:]
    if not rest_c or not rest_r or any(m["role"] != "assistant" for m in rest_c + rest_r):
        raise RowError(
            f"after the shared turns the {what} must continue with assistant replies only",
            "end both on one assistant reply each after the same conversation",
        )
    return {"prompt": chosen[:shared], "chosen": rest_c, "rejected": rest_r}


def _hh(row: dict, stage: str, roles: dict) -> dict:
    chosen = hh_turns(row.get("chosen"))
    if stage == "sft":
        return {"messages": chosen}
    return _split_preference(chosen, hh_turns(row.get("rejected")), "transcripts")


def unpair(batch: dict) -> dict:
    """Preference pairs (``prompt``, ``chosen``, ``rejected``; a batch of columns) -> unpaired rows: per pair the
    chosen reply (``label`` True) then the rejected one (False); other columns repeat. Row ``i`` of the source is
    rows ``2i`` and ``2i + 1`` of the result."""
    out: dict = {k: [] for k in batch if k not in ("chosen", "rejected")}
    out.update(completion=[], label=[])
    for i in range(len(batch["prompt"])):
        for column, label in (("chosen", True), ("rejected", False)):
            for k in out:
                if k not in ("completion", "label"):
                    out[k].append(batch[k][i])
            out["completion"].append(batch[column][i])
            out["label"].append(label)
    return out


def _preference_messages(row: dict, stage: str, roles: dict) -> dict:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
            raise RowError(f"'{name}' is not a list of messages", "write [{role, content}, ...]")
    if stage == "sft":
        return {"messages": chosen}
    return _split_preference(chosen, rejected, "conversations")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("messages", ("messages",), None, ("sft",)),
        Format("prompt_completion", ("prompt", "completion"), None, ("sft",)),
        Format("alpaca", ("instruction", "output"), _alpaca, ("sft",)),
        Format("sharegpt", ("conversations",), _sharegpt, ("sft",)),
        Format("preference", ("prompt", "chosen", "rejected"), None, ("dpo", "kto")),
        Format("hh", ("chosen", "rejected"), _hh, ("sft", "dpo", "kto"), lambda r: isinstance(r.get("chosen"), str)),
        Format(
            "preference_messages",
            ("chosen", "rejected"),
            _preference_messages,
            ("sft", "dpo", "kto"),
            lambda r: isinstance(r.get("chosen"), list),
        ),  # fmt: skip
        Format("text", ("text",), None, ("cpt",)),
        Format("kto", ("prompt", "completion", "label"), None, ("kto",)),
        Format("prompt", ("prompt",), None, ("grpo",)),
        # file formats (read whole by read_file_rows, not converted row by row): the task heads' data sets
        Format("conll", ("tokens", "ner_tags"), None, ("token_cls",)),
        Format("squad", ("question", "context", "answers"), None, ("qa",)),
    )
}


def detect(columns: list[str], first_row: dict, stage: str, source: str) -> Format:
    """The one format of ``stage`` whose columns (and first-row shape) the source has; DataError if none or two."""
    present = set(columns)
    matches = [f for f in FORMATS.values() if stage in f.stages and set(f.columns) <= present and f.looks(first_row)]
    for canonical in ("preference", "kto"):  # the canonical columns win over a published layout they contain
        if canonical in {f.name for f in matches}:
            matches = [f for f in matches if f.name == canonical]
    if len(matches) == 1:
        return matches[0]
    names = [f.name for f in matches]
    if matches:
        raise DataError(
            source, None, f"matches the formats {names} (columns {sorted(present)}): ambiguous",
            f"set format: to one of {names} on this source, or drop the other columns",
        )  # fmt: skip
    mine = [f for f in FORMATS.values() if stage in f.stages]
    wanted = " or ".join("/".join(f.columns) for f in mine if f.convert is None)
    published = [f"{f.name} ({'/'.join(f.columns)})" for f in mine if f.convert is not None]
    have = ", ".join(sorted(present)) or "none"
    raise DataError(
        source, None,
        f"missing columns for {stage} data: needs {wanted}" + (f" (or a published format: {', '.join(published)})" if published else "")
        + f", has {have}",
        "rename the columns with columns: {<format column>: <your column>} on this source, or set format: "
        f"(formats for {stage}: {[f.name for f in FORMATS.values() if stage in f.stages]})",
    )  # fmt: skip


def renames(source, column_names, label: str) -> dict[str, str]:
    """``{their column: the format's}`` from a source's ``columns:`` map, checked against ``column_names``."""
    columns = dict(source.columns or {})
    known = {c for f in FORMATS.values() for c in f.columns} | {
        "input",
        "system",
        "history",
        "tools",
        "chat_template_kwargs",
    }
    for ours in columns:
        if ours not in known:
            raise DataError(
                label, None, f"columns: '{ours}' is not a column of any format.{suggest(ours, known)}",
                f"name the format's column first (one of {sorted(known)}), then yours: columns: {{prompt: question}}",
            )  # fmt: skip
    missing = [theirs for theirs in columns.values() if theirs not in column_names]
    if missing:
        raise DataError(
            label, None, f"columns: maps to {missing}, which the source does not have "
            f"(it has {list(column_names)})", "correct the column names in columns:",
        )  # fmt: skip
    return {theirs: ours for ours, theirs in columns.items() if ours != theirs}


def choose(source, stage: str, label: str, column_names, first_row: dict, chosen=None) -> Format:
    """The source's format: ``source.format`` (checked against ``stage``) or detected from its (renamed) columns and
    first row, and logged. ``chosen``: a list that gets ``(format name, 'named' | 'detected')`` appended."""
    if source.format:
        fmt = FORMATS[source.format]
        if stage not in fmt.stages:
            allowed = [f.name for f in FORMATS.values() if stage in f.stages]
            raise DataError(label, None, f"format {fmt.name} does not give {stage} data", f"use one of {allowed}")
    else:
        fmt = detect(list(column_names), first_row, stage, label)
        logger.info("%s: format %s (detected; set format: to choose)", label, fmt.name)
    if chosen is not None:
        chosen.append((fmt.name, "named" if source.format else "detected"))
    return fmt


def convert_source(dataset, source, stage: str, label: str, row_lines=None, chosen=None, num_proc: int | None = None):
    """``dataset`` of one source in its stage's canonical columns: renamed by ``source.columns``, converted by its
    format (``source.format`` or detected). Returns the dataset (lazily mapped; cached by datasets). ``row_lines``:
    where each row is (see :func:`alignkit.data.places.place`); ``chosen``: see :func:`choose`; ``num_proc``:
    processes for the conversion (``dataset_num_proc``)."""
    mapping = renames(source, dataset.column_names, label)
    if mapping:
        dataset = dataset.rename_columns(mapping)
    fmt = choose(source, stage, label, dataset.column_names, dataset[0] if len(dataset) else {}, chosen)
    dataset = wrap_text_replies(dataset, fmt, label)
    if stage == "kto" and "dpo" in fmt.stages:  # pairs: convert to pairs, then unpair (each row gives two)
        from alignkit.data.schemas import DPO

        pairs = _convert(dataset, fmt, "dpo", dict(source.roles or {}), label, row_lines, num_proc)
        dataset = DPO.check(
            pairs, label, row_lines, tools=source.tools
        )  # a pair's own faults (chosen == rejected) before it is split
        return dataset.map(unpair, batched=True, remove_columns=dataset.column_names, desc="unpair preference rows")
    return _convert(dataset, fmt, stage, dict(source.roles or {}), label, row_lines, num_proc)


# The reply columns of the formats whose prompt may be chat messages: trl renders a message-list prompt with the
# chat template and then concatenates the reply to it, so a text reply there fails inside trl after the model loaded
# (``TypeError: can only concatenate list``). A text reply after a message prompt is one assistant turn: converted.
REPLY_COLUMNS = {"preference": ("chosen", "rejected"), "kto": ("completion",), "prompt_completion": ("completion",)}


def wrap_text_replies(dataset, fmt: Format, label: str):
    """Rows whose ``prompt`` is chat messages and whose replies (:data:`REPLY_COLUMNS`) are text: each reply becomes
    ``[{"role": "assistant", "content": reply}]``, the one reading of such a row (logged once per source). Other
    rows pass unchanged. The reverse mix (a text prompt, message replies) is refused by the schema."""
    replies = [c for c in REPLY_COLUMNS.get(fmt.name, ()) if c in dataset.column_names]
    first = dataset[0] if len(dataset) and replies and "prompt" in dataset.column_names else None
    if first is None or not isinstance(first["prompt"], list) or not any(isinstance(first[c], str) for c in replies):
        return dataset
    logger.info(
        "%s: 'prompt' is chat messages and %s text: each reply becomes one assistant message", label,
        "/".join(f"'{c}'" for c in replies),
    )  # fmt: skip

    def wrap(batch):
        for column in replies:
            batch[column] = [
                [{"role": "assistant", "content": v}] if isinstance(v, str) and isinstance(p, list) else v
                for p, v in zip(batch["prompt"], batch[column])
            ]
        return batch

    return dataset.map(wrap, batched=True, desc="replies as assistant messages")


def _convert(dataset, fmt: Format, stage: str, roles: dict, label: str, row_lines, num_proc: int | None = None):
    if fmt.convert is None:
        return dataset

    def convert(row, index):
        try:
            return fmt.convert(row, stage, roles)
        except RowError as exc:
            raise DataError(*place(row_lines, label, index), f"{fmt.name}: {exc.problem}", exc.fix) from None

    return dataset.map(
        convert, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=f"{fmt.name} rows"
    )

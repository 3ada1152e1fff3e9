"""Per-stage schema checks. Each runs over every row before training and fails with file, row and fix."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from alignkit.data.places import place
from alignkit.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool call's result (alignkit.data.tools)
# Columns trl 1.16's SFT and DPO trainers pass to the chat template with each row (SFTTrainer/DPOTrainer tokenize:
# ``tools`` and ``chat_template_kwargs``): kept whenever present, with the stage's own columns.
CHAT_TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
# Columns that would make trl treat the data as vision data: alignkit trains text models, so they are refused.
VISION_COLUMNS = ("image", "images")


@dataclass
class Schema:
    """A stage's data contract: which column sets are accepted, and a per-row check."""

    name: str
    column_sets: tuple[tuple[str, ...], ...]
    check_row: Callable[[dict, str, int], None]
    fix_hint: str
    passthrough: tuple[str, ...] = ()  # optional columns the trainer consumes: kept when present
    data: str | None = None  # the kind of data (alignkit.data.formats): published formats convert to it
    keep_other_columns: bool = False  # every column reaches the trainer (GRPO's reward functions read them)
    check_split: Callable[[object, str], None] | None = None  # the whole train split: can it teach anything?

    def columns_for(self, dataset, source: str) -> tuple[str, ...]:
        return self.columns_of(dataset.column_names, source)

    def columns_of(self, names, source: str) -> tuple[str, ...]:
        """The first of this stage's column sets that ``names`` holds; DataError naming what is missing if none."""
        present = set(names)
        for columns in self.column_sets:
            if set(columns) <= present:
                return columns
        wanted = " or ".join("/".join(c) for c in self.column_sets)
        have = ", ".join(sorted(present)) or "none"
        raise DataError(source, None, f"missing columns for {self.name}: needs {wanted}, has {have}", self.fix_hint)

    def check(self, dataset, source: str, row_numbers=None, tools=None):
        """Check every row; return the dataset with only this stage's columns. ``row_numbers``: each row's line in
        its file (JSON lines), or a :class:`alignkit.data.places.RowPlaces` (shards: each row's file and line), so
        that errors name the file and line an editor shows; else rows count from 1. ``tools``: the source's own
        ``tools`` (data config), given to every chat row without any (:func:`alignkit.data.tools.normalize_tool_rows`
        then stores tools as JSON text and call arguments as objects)."""
        from alignkit.data.tools import normalize_tool_rows, tool_names

        columns = self.columns_for(dataset, source)
        if tools is not None:
            tool_names(tools, f"{source} (the source's tools)", None)
        if self.passthrough:  # a chat stage: refuse what trl would read as images instead of dropping it
            vision = [c for c in VISION_COLUMNS if c in dataset.column_names]
            if vision:
                raise DataError(
                    source, None, f"has an image column ({', '.join(vision)}): alignkit trains text models",
                    f"drop the {vision[0]} column, or train the vision model with trl directly",
                )  # fmt: skip
        tool_column = ["tools"] if self.passthrough and "tools" in dataset.column_names else []
        for i, row in enumerate(dataset.select_columns([*columns, *tool_column])):
            self.check_row(row, *place(row_numbers, source, i))
            if self.passthrough:
                check_row_tools({**row, "tools": row.get("tools") or tools}, *place(row_numbers, source, i))
        if self.passthrough:
            dataset = normalize_tool_rows(dataset, tools)
        if self.keep_other_columns:
            return dataset
        kept = [*columns, *(c for c in self.passthrough if c in dataset.column_names)]
        extra = [c for c in dataset.column_names if c not in kept]
        if extra:
            logger.warning("%s: columns %s are not used by the %s stage and are dropped", source, extra, self.name)
        return dataset.remove_columns(extra) if extra else dataset


def check_row_tools(row: dict, source, i) -> None:
    """A chat row's tool calls and results against its ``tools`` (alignkit.data.tools)."""
    from alignkit.data.tools import check_tool_turns, tool_names, uses_tools

    declared = tool_names(row.get("tools"), source, i)
    for column, value in row.items():
        if column != "tools" and isinstance(value, list) and uses_tools(value):
            check_tool_turns(value, declared, source, i, column)


def _text(value, source, row, column, fix) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(source, row, f"'{column}' is empty or not text", fix)


def check_messages(value, source, row, column="messages", must_end_on_assistant=True) -> None:
    """A chat message list: dicts with a known role and text content, the system message first; DataError with the
    file, row and fix otherwise (the SFT/DPO schemas, alignkit generate and eval check with it)."""
    _messages(value, source, row, column, must_end_on_assistant)


def _messages(value, source, row, column="messages", must_end_on_assistant=True) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(
            source,
            row,
            f"'{column}' is not a non-empty list of messages",
            'write [{"role": "user", "content": "..."}, ...]',
        )
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                source, row, f"{column}[{j}] lacks 'role' or 'content'", "give every message a role and a content"
            )
        if message["role"] not in ROLES:
            raise DataError(
                source,
                row,
                f"{column}[{j}] has role '{message['role']}'",
                f"use one of {ROLES} (e.g. rename 'human' to 'user', 'gpt' to 'assistant')",
            )
        content = message["content"]
        if message.get("tool_calls") and message["role"] == "assistant" and not content:
            continue  # a tool call with no text (OpenAI format); alignkit.data.tools checks the call
        if not isinstance(content, str) or not content.strip():
            problem = (
                "empty content"
                if isinstance(content, str) or content is None
                else f"content that is not text (a {type(content).__name__}: {content!r:.40})"
            )
            raise DataError(
                source, row, f"{column}[{j}] ({message['role']}) has {problem}", "give every message its text as a string, or remove it"
            )  # fmt: skip
        if message["role"] == "system" and j != 0:
            raise DataError(
                source, row, f"{column}[{j}] is a system message after the first turn", "put the system message first"
            )
    if must_end_on_assistant and value[-1]["role"] != "assistant":
        raise DataError(
            source,
            row,
            f"conversation ends on '{value[-1]['role']}', so it has nothing to learn from at the end",
            "end every conversation with an assistant message, or drop the trailing user turn",
        )


def _check_text(row, source, i):
    _text(row["text"], source, i, "text", "give every row non-empty text, or drop the row")


def _check_sft(row, source, i):
    if "messages" in row:
        _messages(row["messages"], source, i)  # ends on an assistant turn, so it has one
        return
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        _messages(prompt, source, i, "prompt", must_end_on_assistant=False)
        _messages(completion, source, i, "completion")
    else:
        _text(prompt, source, i, "prompt", "give every row a non-empty prompt")
        _text(completion, source, i, "completion", "give every row a non-empty completion")


def _as_text(value) -> str:
    if isinstance(value, list):
        return "\n".join(m.get("content", "") for m in value if isinstance(m, dict))
    return value if isinstance(value, str) else ""


def _prompt(prompt, source, i) -> None:
    """A prompt: non-empty text, or chat messages (the trainer adds the reply)."""
    if isinstance(prompt, list):
        _messages(prompt, source, i, "prompt", must_end_on_assistant=False)
    else:
        _text(prompt, source, i, "prompt", "give every row a non-empty prompt")


def _reply(value, source, i, column: str) -> None:
    """A reply: non-empty text, or chat messages ending on the assistant."""
    if isinstance(value, list):
        _messages(value, source, i, column)
    else:
        what = column if column == "completion" else f"{column} response"
        _text(value, source, i, column, f"give every row a non-empty {what}")


def _same_shape(row: dict, columns: tuple[str, ...], source, i) -> None:
    """Every one of ``columns`` is text, or every one is chat messages: trl renders message lists with the chat
    template and concatenates the rest, so a mix fails inside trl after the model loaded. (A message prompt with
    text replies was converted before this check: :func:`alignkit.data.formats.wrap_text_replies`.)"""
    kinds = {c: "messages" if isinstance(row[c], list) else "text" for c in columns}
    if len(set(kinds.values())) > 1:
        lists = [c for c, k in kinds.items() if k == "messages"]
        texts = [c for c, k in kinds.items() if k == "text"]
        raise DataError(
            source, i, f"{'/'.join(lists)} {'is' if len(lists) == 1 else 'are'} chat messages but "
            f"{'/'.join(texts)} {'is' if len(texts) == 1 else 'are'} text: trl cannot join the two",
            'write the prompt as messages ([{"role": "user", "content": ...}]) and every reply as text or as '
            "assistant messages, or write them all as text",
        )  # fmt: skip


def _check_dpo(row, source, i):
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    _prompt(prompt, source, i)
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        _reply(value, source, i, column)
    _same_shape(row, ("prompt", "chosen", "rejected"), source, i)
    if _as_text(chosen).strip() == _as_text(rejected).strip():
        raise DataError(
            source,
            i,
            "chosen and rejected are identical, so there is no preference to learn",
            "drop the row or fix one response",
        )
    # Text rows only: a text reply that starts with the whole prompt was likely stored as prompt + reply (trl joins
    # the two again). A chat reply is its own assistant turn, so one that repeats the question says so itself (hh-rlhf
    # has such replies): nothing to fix in the row's layout.
    prompt_text = _as_text(prompt).strip() if isinstance(prompt, str) else ""
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if len(prompt_text) > 16 and isinstance(value, str) and value.strip().startswith(prompt_text):
            raise DataError(
                source,
                i,
                f"'{column}' repeats the prompt at its start; the trainer prepends the prompt itself",
                f"store only the response in '{column}'",
            )


def _check_kto(row, source, i):
    label = row["label"]
    _prompt(row["prompt"], source, i)
    _reply(row["completion"], source, i, "completion")
    _same_shape(row, ("prompt", "completion"), source, i)
    if not isinstance(label, bool):
        raise DataError(
            source, i, f"'label' is {label!r} (a {type(label).__name__}), not true or false",
            "write label: true for a desirable completion and false for an undesirable one (JSON true/false, no "
            "quotes, no 0/1)",
        )  # fmt: skip


def _kto_both_labels(dataset, source: str) -> None:
    """KTO weighs desirable against undesirable completions: a split with only one kind has nothing to push
    against (it trains and finishes, learning nothing the user meant)."""
    labels = set(dataset["label"])
    for value, kind, other in ((True, "desirable (label: true)", "undesirable (label: false)"),
                               (False, "undesirable (label: false)", "desirable (label: true)")):  # fmt: skip
        if labels == {value}:
            raise DataError(
                source, None, f"every one of its {len(dataset)} rows is {kind}, so KTO has no {other} completions to "
                "weigh them against",
                f"add {other} rows (KTO works best with both kinds, e.g. from DPO pairs: chosen and rejected), or train "
                "with sft on the desirable rows",
            )  # fmt: skip


def _check_prompt(row, source, i):
    prompt = row["prompt"]
    _prompt(prompt, source, i)
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise DataError(
            source, i, "the prompt ends on an assistant turn, so the policy has no turn to complete",
            "end every prompt on the user's turn",
        )  # fmt: skip


CPT = Schema("cpt", (("text",),), _check_text, "give each row a 'text' column of raw text", data="cpt")
SFT = Schema(
    "sft",
    (("messages",), ("prompt", "completion")),
    _check_sft,
    "use a 'messages' column (chat) or 'prompt' + 'completion' columns",
    passthrough=CHAT_TEMPLATE_COLUMNS,
    data="sft",
)
DPO = Schema(
    "dpo",
    (("prompt", "chosen", "rejected"),),
    _check_dpo,
    "give each row 'prompt', 'chosen' and 'rejected'",
    passthrough=CHAT_TEMPLATE_COLUMNS,
    data="dpo",
)
# The reference-free preference methods and reward modeling read DPO's pairs, checked the same way.
ORPO = dataclasses.replace(DPO, name="orpo")
SIMPO = dataclasses.replace(DPO, name="simpo")
REWARD = dataclasses.replace(DPO, name="reward")
KTO = Schema(
    "kto",
    (("prompt", "completion", "label"),),
    _check_kto,
    "give each row 'prompt', 'completion' and a boolean 'label' (or DPO pairs: they are unpaired)",
    passthrough=CHAT_TEMPLATE_COLUMNS,
    data="kto",
    check_split=_kto_both_labels,
)
GRPO = Schema(
    "grpo",
    (("prompt",),),
    _check_prompt,
    "give each row a 'prompt' (text, or messages ending on the user) and the reference columns your rewards read",
    data="grpo",
    keep_other_columns=True,
)
# Online DPO reads GRPO's rows (a prompt and the columns its rewards read); distillation only the prompt, which the
# student completes and the teacher scores token by token.
ONLINE_DPO = dataclasses.replace(GRPO, name="online_dpo")
DISTILL = Schema(
    "distill",
    (("prompt",),),
    _check_prompt,
    "give each row a 'prompt' (text, or messages ending on the user): the student completes it, the teacher scores it",
    data="grpo",
)


def _check_embed(row, source, i):
    """Sentence-embedding rows (alignkit.tasks.embedding): every text column non-empty, a pair's score in [0, 1]."""
    for column, value in row.items():
        if column != "score":
            _text(value, source, i, column, f"give every row a non-empty '{column}', or drop the row")
    if "score" in row:
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise DataError(
                source, i, f"'score' is {score!r}, not a number in [0, 1]",
                "rescale the similarity scores to [0, 1] (e.g. STS-B's 0-5 divided by 5)",
            )  # fmt: skip


# Triplets first: a triplet row also holds a pair's columns. The format (and the default loss) follow the columns.
EMBED = Schema(
    "embed",
    (("anchor", "positive", "negative"), ("anchor", "positive"), ("sentence1", "sentence2", "score")),
    _check_embed,
    "give each row 'anchor' + 'positive' (pairs; + 'negative': triplets) or 'sentence1' + 'sentence2' + a 'score' "
    "in [0, 1] (scored pairs)",
)

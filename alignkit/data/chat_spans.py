"""Assistant spans of a template without ``{% generation %}`` marks, found by rendering (issue 36).

A custom template (no family alignkit knows, no generation marks) can still train with assistant-only loss when
its turns can be separated by rendering. For assistant message ``k`` of a conversation:

- ``P`` = the conversation up to ``k`` rendered with ``add_generation_prompt=True`` (what the model is given),
- ``F`` = the conversation through ``k`` rendered (what the model is given plus what it emits),
- ``T`` = the whole conversation rendered.

The assistant's output is ``F[len(P):]``, provided ``P`` is a prefix of ``F`` and ``F`` a prefix of ``T`` (the
template renders each turn once, in order, and the earlier turns the same whatever follows). That character span
must be whole tokens of ``T`` (the tokens of ``T[:start]`` and ``T[:end]`` are prefixes of ``T``'s tokens: no token
straddles an edge) and must end on a special token (the turn's stop token; blank tokens after it stay untrained).
Anything else means the template's turns cannot be separated by rendering: :class:`SpanError`, which the callers
turn into a ConfigError (probe conversations, before the data is read) or a DataError (a data row).

The masks feed trl's own pre-tokenized path: ``input_ids`` + ``assistant_masks`` columns, from which
``SFTTrainer`` builds the labels (-100 outside the mask), exactly as it does from a marked template's masks.
"""

from __future__ import annotations

from alignkit.errors import ConfigError, DataError

SOURCE = "rendered"  # TemplateInfo.source of a template whose assistant spans come from rendering
_FIX = (
    "use the model family's template (chat_template: <family>, e.g. gemma3, llama3_1, qwen3; chatml or chatml_eos "
    "for a model without a family format), or mark the assistant's output with {% generation %} ... "
    "{% endgeneration %}, or set assistant_only_loss: false"
)


class SpanError(ValueError):
    """A conversation whose assistant turns cannot be separated by rendering; the message says why."""


def has_generation_marks(tokenizer, template, messages, **kwargs) -> bool:
    """Whether ``template`` marks anything of ``messages`` with ``{% generation %}`` (found by rendering)."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return any(out["assistant_masks"])


def _render(tokenizer, template, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def rendered_mask(tokenizer, messages: list[dict], template=None, **kwargs) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of ``messages`` rendered with ``template`` (the tokenizer's by default), the
    mask 1 on each assistant message's output through its stop token. ``kwargs`` go to ``apply_chat_template``
    (``tools``, ``enable_thinking``, ...). SpanError when the turns cannot be separated by rendering."""
    from alignkit.data.templates import special_ids

    full = _render(tokenizer, template, messages, **kwargs)
    ids = _ids(tokenizer, full)
    mask = [0] * len(ids)
    special = special_ids(tokenizer)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        given = _render(tokenizer, template, messages[:k], add_generation_prompt=True, **kwargs) if k else ""
        through = _render(tokenizer, template, messages[: k + 1], **kwargs)
        if not through.startswith(given):
            raise SpanError(
                f"message {k} (assistant): the conversation before it, rendered with add_generation_prompt, is not "
                f"a prefix of the conversation through it (it renders {given[-40:]!r} where the turn renders "
                f"{through[len(given) - 40 : len(given)]!r})"
            )
        if not full.startswith(through):
            raise SpanError(
                f"message {k} (assistant): the conversation through this turn does not render as a prefix of the "
                "whole conversation (the template renders earlier turns differently when more follow)"
            )
        start, end = (len(_ids(tokenizer, full[:cut])) for cut in (len(given), len(through)))
        for cut, n in ((len(given), start), (len(through), end)):
            if _ids(tokenizer, full[:cut]) != ids[:n]:
                raise SpanError(
                    f"message {k} (assistant): a token straddles the edge of the turn at {full[max(0, cut - 20) : cut + 20]!r}, "
                    "so its output is not a contiguous token span"
                )  # fmt: skip
        stop = _last_stop(tokenizer, ids, start, end, special)
        if stop is None:
            raise SpanError(
                f"message {k} (assistant): its output ends on {tokenizer.decode(ids[max(start, end - 3) : end])!r}, "
                "not on a special token generation can stop on, so the model would not learn to stop"
            )
        for i in range(start, stop + 1):
            mask[i] = 1
    return ids, mask


def _last_stop(tokenizer, ids, start, end, special) -> int | None:
    """The position of the special token the span [start, end) ends on, blank tokens after it allowed."""
    for i in range(end - 1, start - 1, -1):
        if ids[i] in special:
            return i
        if tokenizer.decode([ids[i]]).strip():
            return None
    return None


def check_probes(tokenizer, template, accepted: dict[str, str]) -> None:
    """Derive the spans of every probe conversation ``template`` accepts (:mod:`alignkit.data.chat_probes`) and
    check one span per assistant message, each ending on a stop token; ConfigError with the fix otherwise."""
    from alignkit.data.chat_probes import PROBES, assistant_turns
    from alignkit.data.templates import assistant_spans

    for name in accepted:
        messages, kwargs = PROBES[name]
        try:
            _, mask = rendered_mask(tokenizer, messages, template, **kwargs)
        except SpanError as exc:
            raise ConfigError(
                "assistant_only_loss: the chat template has no {% generation %} marks and is no family template "
                f"alignkit has a training twin for, and its assistant turns cannot be separated by rendering (probe "
                f"'{name}': {exc}). Fix: {_FIX}."
            ) from None
        if len(assistant_spans(mask)) != assistant_turns(messages):
            raise ConfigError(
                f"assistant_only_loss: rendering the '{name}' probe separates {len(assistant_spans(mask))} assistant "
                f"spans for {assistant_turns(messages)} assistant turns (adjacent turns run together). Fix: {_FIX}."
            )


def row_messages(row: dict) -> list[dict]:
    """A chat row's conversation: ``messages``, or a conversational ``prompt`` followed by its ``completion``."""
    if isinstance(row.get("messages"), list):
        return row["messages"]
    return [*(row.get("prompt") or []), *(row.get("completion") or [])]


def row_kwargs(row: dict) -> dict:
    """The ``apply_chat_template`` keyword arguments a row carries (``tools``, ``chat_template_kwargs``)."""
    from alignkit.data.tools import row_tools

    kwargs = dict(row.get("chat_template_kwargs") or {})
    tools = row_tools(row)
    if tools:
        kwargs["tools"] = tools
    return kwargs


def tokenize_with_rendered_spans(dataset, tokenizer, source: str):
    """``dataset`` (chat rows) as trl's pre-tokenized SFT rows: ``input_ids`` and ``assistant_masks`` from
    :func:`rendered_mask`; DataError (source, row, fix) for a row whose turns cannot be separated."""

    def convert(row, index):
        try:
            ids, mask = rendered_mask(tokenizer, row_messages(row), **row_kwargs(row))
        except SpanError as exc:
            raise DataError(
                source, index + 1, f"assistant turns cannot be separated by rendering: {exc}", _FIX
            ) from None
        return {"input_ids": ids, "assistant_masks": mask}

    columns = dataset.column_names or list(next(iter(dataset)).keys())  # a streamed split names them on reading
    return dataset.map(convert, with_indices=True, remove_columns=columns)

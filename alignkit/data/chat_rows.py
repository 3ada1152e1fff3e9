"""Data rows against the run's chat template, before step 1: what the template refuses or would drop is an error.

Each chat row is rendered with the template the run trains with. The template's own refusal (``raise_exception``:
a system turn for Gemma 2 or the alternating-roles Mistral templates) is a DataError quoting it, with the row
number; tools or ``reasoning_content`` on a template that does not render them (found by rendering probes,
:func:`alignkit.data.chat_probes.template_features`) is a DataError naming the families that do.
"""

from __future__ import annotations

import logging
import re

from alignkit.errors import DataError

logger = logging.getLogger(__name__)
_CHAT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def families_with(feature: str, tokenizer) -> list[str]:
    """Family names whose stock template renders ``feature`` ('tools' or 'reasoning'), found by rendering the
    probes with each stock template."""
    from alignkit.data.chat_families import FAMILIES, stock_template
    from alignkit.data.chat_probes import template_features

    out = []
    for name in FAMILIES:
        try:
            if getattr(template_features(tokenizer, stock_template(name)), feature):
                out.append(name)
        except Exception:  # noqa: BLE001 - a template this vocabulary cannot render is not offered
            continue
    return out


def _conversations(row: dict) -> list[list[dict]]:
    """The conversations a row trains: its messages / prompt + completion / prompt + chosen, and, for a preference
    row, prompt + rejected (rendered and scored as a reply of its own: a rejected reply the template would drop a part
    of must be refused as a chosen one is)."""
    messages = []
    for column in _CHAT_COLUMNS:
        value = row.get(column)
        if isinstance(value, list) and column != "rejected":
            messages += [m for m in value if isinstance(m, dict)]
    out = [messages] if messages else []
    if isinstance(row.get("rejected"), list):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
        out.append([m for m in [*prompt, *row["rejected"]] if isinstance(m, dict)])
    return out


_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def check_rows(tokenizer, dataset, source: str, *, train_on_reasoning: bool = True, places=None) -> None:
    """Render every chat row of ``dataset`` with ``tokenizer``'s template; DataError (file, row, fix) for a row the
    template refuses, or for tools / reasoning the template cannot render. ``places``: where each row is in
    ``source`` (:func:`alignkit.data.places.place`; None: rows count from 1). A streamed split is not read here."""
    from alignkit.data.places import place

    if not hasattr(dataset, "__len__"):
        return

    info = getattr(tokenizer, "alignkit_template", None)
    features = getattr(info, "features", None)
    name = f"the {info.family}" if info and info.family else "this"
    if features is None or not any(c in dataset.column_names for c in _CHAT_COLUMNS):
        return
    dropped, unasked, extra = 0, 0, features.prompt_extra.strip()
    for i, row in enumerate(dataset):
        row_dropped = row_unasked = False
        for messages in _conversations(row):
            drops, unasks = _check_conversation(
                tokenizer, row, messages, features, name, extra, train_on_reasoning, place(places, source, i)
            )
            row_dropped, row_unasked = row_dropped or drops, row_unasked or unasks
        dropped += row_dropped
        unasked += row_unasked
    if dropped:
        logger.warning(
            "%s: in %d rows the %s template leaves out the reasoning of earlier assistant turns (as at inference); "
            "only the reasoning it renders is trained",
            source, dropped, name.removeprefix("the "),
        )  # fmt: skip
    if unasked:
        logger.warning(
            "%s: in %d rows an assistant reply does not start with %r, which %s chat template's generation prompt "
            "ends with: alignkit chat/generate/eval and every server ask the model after %r, but these rows train "
            "the reply without it. Fix: start each reply with it (DeepSeek-R1's data: '<think>\\n...\\n</think>\\n\\n' "
            "before the answer, an empty block for a reply without reasoning), or use a template whose generation "
            "prompt is where its replies start",
            source, unasked, features.prompt_extra, name, features.prompt_extra,
        )  # fmt: skip


def _check_conversation(
    tokenizer, row, messages, features, name, extra, train_on_reasoning, where
) -> tuple[bool, bool]:
    """Check one conversation of a row (see :func:`check_rows`); DataError at ``where`` (source, row). Returns
    (reasoning left out, a reply not starting where the generation prompt ends)."""
    from alignkit.data.chat_probes import template_error
    from alignkit.data.tools import row_tools

    tools = row_tools(row)
    has_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if has_tools and not features.tools:
        raise DataError(
            *where, f"uses tools, which {name} chat template does not render",
            f"use a model whose template renders tool calls (families: {', '.join(families_with('tools', tokenizer))}), "
            "or drop the tool turns",
        )  # fmt: skip
    reasoning = [m.get("reasoning_content") for m in messages if m.get("reasoning_content")]
    if reasoning and not features.reasoning:
        raise DataError(
            *where, f"has reasoning_content, which {name} chat template does not render (it would be "
            "dropped)", f"use a reasoning family's template ({', '.join(families_with('reasoning', tokenizer))}), or move "
            "the reasoning into content",
        )  # fmt: skip
    inline = any("<think>" in (m.get("content") or "") for m in messages if m.get("role") == "assistant")
    if inline and not train_on_reasoning and not features.reasoning:
        raise DataError(
            *where, f"has an inline <think> block, which {name} chat template renders as plain "
            "reply text, so train_on_reasoning: false cannot mask it",
            "use a reasoning family's template, or set train_on_reasoning: true",
        )  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - the template's own refusal, quoted
        message = template_error(exc)
        if message is None:
            raise
        raise DataError(
            *where, f"the chat template refuses this conversation: {message!r}",
            "drop or rewrite the row (e.g. fold a system message into the first user turn for a template "
            "without system turns)",
        ) from None  # fmt: skip
    thoughts = [
        *reasoning,
        *(t for m in messages if m.get("role") == "assistant" for t in _THINK.findall(str(m.get("content") or ""))),
    ]
    drops = any(t.strip() not in text for t in thoughts if t.strip())
    unasks = bool(extra) and any(
        m.get("role") == "assistant" and not m.get("tool_calls") and not str(m.get("content") or "").lstrip().startswith(extra)
        for m in messages
    )  # fmt: skip
    return drops, unasks

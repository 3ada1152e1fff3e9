"""Probe conversations, and the proofs alignkit runs on a chat template by rendering them.

:func:`prove_twin` shows, for one run, that a training twin renders exactly the stock template's text on every
probe the stock template accepts and marks every assistant turn through a stop token. :func:`template_features`
says what a template renders (system turns, tools, reasoning), found by rendering sentinels, never by reading the
template's text. A template's own ``raise_exception`` (Gemma's "roles must alternate", a system turn refused)
means the probe uses a role the template does not accept: that probe is left out, and the data rows are checked
against the same template (:mod:`alignkit.data.chat_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.errors import ConfigError

TOOL_NAME, TOOL_ARG, TOOL_RESULT = "add_numbers", "probe_arg_7f3", "probe_result_51c"
CALL_VALUE = "probe_value_4a1"  # the call's argument value: rendered only where the assistant's call is
REASONING = "probe_reasoning_9d2"
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "Add two numbers.",
            "parameters": {"type": "object", "properties": {TOOL_ARG: {"type": "string"}}, "required": [TOOL_ARG]},
        },
    }
]
_CALL = {"type": "function", "id": "call00001", "function": {"name": TOOL_NAME, "arguments": {TOOL_ARG: CALL_VALUE}}}

# name -> (messages, apply_chat_template keyword arguments)
PROBES: dict[str, tuple[list[dict], dict]] = {
    "system": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "It is 6."},
        ],
        {},
    ),
    "multi_turn": (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "It is 6."},
        ],
        {},
    ),
    "tools": (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "", "tool_calls": [_CALL]},
            {"role": "tool", "name": TOOL_NAME, "tool_call_id": "call00001", "content": TOOL_RESULT},
            {"role": "assistant", "content": "It is 4."},
        ],
        {"tools": PROBE_TOOLS},
    ),
    # the same call to a tool the template treats as built in (Llama 3.1's ``builtin_tools``: ``<|python_tag|>``
    # and the call's own end token, ``<|eom_id|>``); a template without that branch renders the 'tools' text
    "builtin_tools": (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "", "tool_calls": [_CALL]},
            {"role": "tool", "name": TOOL_NAME, "tool_call_id": "call00001", "content": TOOL_RESULT},
            {"role": "assistant", "content": "It is 4."},
        ],
        {"tools": PROBE_TOOLS, "builtin_tools": [TOOL_NAME]},
    ),
    "reasoning": (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "It is 4.", "reasoning_content": REASONING},
        ],
        {},
    ),
    "no_think": (
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
        {"enable_thinking": False},
    ),
}


def render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def template_error(exc: Exception) -> str | None:
    """The message of a template's own refusal (jinja2's TemplateError, raised by ``raise_exception``), else None."""
    import jinja2

    return str(exc) if isinstance(exc, jinja2.exceptions.TemplateError) else None


@dataclass
class Features:
    """What a template renders: the probes it accepts (name -> text), and whether system turns, tool calls with
    tool results, and reasoning survive rendering; ``refusals`` quotes what the template refused."""

    accepted: dict[str, str] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    system: bool = False
    tools: bool = False
    reasoning: bool = False
    prompt_extra: str = ""  # what the generation prompt ends with that a rendered reply does not start with


def template_features(tokenizer, template: str) -> Features:
    """Render each probe with ``template``; a template error is recorded (not raised) for that probe."""
    features = Features()
    for name, (messages, kwargs) in PROBES.items():
        try:
            features.accepted[name] = render(tokenizer, template, messages, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the template's own refusal, or a field it cannot read
            features.refusals[name] = template_error(exc) or f"{type(exc).__name__}: {exc}"
    text = features.accepted
    features.system = "Answer briefly." in text.get("system", "")
    # the schema, the call (its argument value: a template may render the tools but drop the assistant's calls) and
    # the result must all survive rendering
    features.tools = all(s in text.get("tools", "") for s in (TOOL_NAME, TOOL_ARG, CALL_VALUE, TOOL_RESULT))
    features.reasoning = REASONING in text.get("reasoning", "")
    features.prompt_extra = prompt_extra(tokenizer, template)
    if not text:
        quoted = "; ".join(f"{k}: {v}" for k, v in features.refusals.items())
        raise ConfigError(
            f"chat_template: the template renders none of alignkit's probe conversations ({quoted[:300]}). Fix: "
            "use the model's own template or a family's (chat_template: <family>, e.g. gemma3, llama3, qwen3)."
        )
    return features


def prompt_extra(tokenizer, template: str) -> str:
    """What ``template``'s generation prompt ends with that its rendering of a reply does not have at that place, or
    '': DeepSeek-R1-distill's prompt ends '<｜Assistant｜><think>\n' where a reply renders right after
    '<｜Assistant｜>', so chat, generate, eval and every server ask the model after '<think>\n' while a reply
    without it trains without it. Found by rendering one exchange with and without the generation prompt."""
    import os

    exchange = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
    try:
        given = render(tokenizer, template, exchange[:1], add_generation_prompt=True)
        through = render(tokenizer, template, exchange)
    except Exception:  # noqa: BLE001 - a template that refuses this exchange has its refusal recorded elsewhere
        return ""
    return given[len(os.path.commonprefix([given, through])) :]


def assistant_turns(messages: list[dict]) -> int:
    """How many marked spans a conversation has: runs of assistant messages not interrupted by another role count
    once per message."""
    return sum(m["role"] == "assistant" for m in messages)


def prove_twin(tokenizer, stock: str, twin: str, family: str) -> Features:
    """Check, by rendering, that ``twin`` is a faithful training twin of ``stock``: the same text on every probe
    ``stock`` accepts, with the stock template's refusals refused alike, and every assistant turn marked by
    ``{% generation %}`` through a special token (the turn's stop token). Returns the stock template's
    :class:`Features`; ConfigError naming the probe otherwise."""
    from alignkit.data.templates import span_stop, special_ids, turn_spans

    features = template_features(tokenizer, stock)
    special = special_ids(tokenizer)
    for name, expected in features.accepted.items():
        messages, kwargs = PROBES[name]
        got = render(tokenizer, twin, messages, **kwargs)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ConfigError(
                f"chat_template: the training twin of the '{family}' template renders the '{name}' probe differently "
                f"from the stock template (from character {at}: stock {expected[at : at + 40]!r}, twin "
                f"{got[at : at + 40]!r}). Fix: report this to alignkit; meanwhile set assistant_only_loss: false."
            )
        if name in ("tools", "builtin_tools") and not features.tools:
            continue  # the template drops tool turns (tool rows are refused for it): same text is all there is to prove
        out = tokenizer.apply_chat_template(
            messages, chat_template=twin, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        ids = list(out["input_ids"])
        spans = turn_spans(ids, list(out["assistant_masks"]), tokenizer)
        want = assistant_turns(messages)
        if len(spans) != want or any(span_stop(ids[a:b], special, tokenizer) is None for a, b in spans):
            ends = [tokenizer.decode(ids[max(a, b - 3) : b]) for a, b in spans]
            raise ConfigError(
                f"chat_template: the '{family}' training twin marks {len(spans)} spans for {want} assistant turns in "
                f"the '{name}' probe, ending on {ends}; each must end on the turn's stop token. Fix: report this to "
                "alignkit; meanwhile set assistant_only_loss: false."
            )
    return features

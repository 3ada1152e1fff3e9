"""Chat templates, and what a template trains, proven by rendering a probe conversation.

alignkit's ChatML marks assistant turns with ``{% generation %}`` so trl can build assistant-only loss masks
(``return_assistant_tokens_mask``, transformers' ``apply_chat_template``). A model learns to stop only if each
assistant turn's trained tokens end on a token that generation stops on: a special token of the vocabulary (eos, or
an end-of-turn token such as ``<|im_end|>`` or ``<|eot_id|>``), not text pieces. :func:`check_turn_ends` renders
:data:`PROBE_CHAT` and checks exactly that, for any template; nothing here matches template text against patterns.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import ConfigError

CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML's layout for a vocabulary without ChatML's tokens (a base Llama/Mistral-style tokenizer: <s>, </s>, <unk>):
# the role headers are plain text, and every turn ends with the tokenizer's own eos, the token its generation config
# already stops on. No new tokens, no embedding rows to train.
CHATML_EOS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "chatml_eos": CHATML_EOS}

# Two assistant turns, a system prompt and content without special tokens: what every check renders.
PROBE_CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def resolve_chat_template(spec: str) -> str:
    """A family name (alignkit.data.chat_families.family_names(): 'chatml', 'gemma3', 'qwen3', ...: its stock
    instruct template), a path to a .jinja file, or a literal Jinja string."""
    from alignkit.data.chat_families import family_names, stock_template

    if spec in family_names():
        return stock_template(spec)
    path = Path(spec).expanduser()
    if "{{" not in spec and "{%" not in spec and path.is_file():  # checked to exist (ModelArguments)
        return path.read_text(encoding="utf-8-sig")
    return spec


def default_system_prompt(tokenizer, template: str | None) -> str | None:
    """The system turn ``template`` renders into a conversation that has none (e.g. SmolLM2's "You are a helpful AI
    assistant named SmolLM..."), as text, or None when it adds none (or cannot render). Found by rendering one user
    turn alone and after a placeholder system turn: what the lone rendering holds before their common end is the
    default system turn."""
    if not template:
        return None
    marker = "\x01alignkit-system\x01"
    try:
        alone = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], chat_template=template, tokenize=False
        )
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, {"role": "user", "content": "Hi"}],
            chat_template=template,
            tokenize=False,
        )
    except Exception:  # noqa: BLE001 - a template that cannot render these is judged by check_turn_ends
        return None
    if marker not in with_system:
        return None
    end = 0
    while end < min(len(alone), len(with_system)) and alone[len(alone) - 1 - end] == with_system[-1 - end]:
        end += 1
    start = 0
    while start < len(alone) - end and start < len(with_system) and alone[start] == with_system[start]:
        start += 1
    extra = alone[start : len(alone) - end].strip()
    return extra or None


def default_template(tokenizer) -> tuple[str, str]:
    """(name, template) alignkit installs on a tokenizer without one: ChatML when ``<|im_end|>`` is one special token
    of the vocabulary, else ChatML closed by the tokenizer's eos."""
    if _single_special(tokenizer, "<|im_end|>") or tokenizer.eos_token is None:
        return "chatml", CHATML  # no eos either: check_turn_ends then says what the vocabulary lacks
    return "chatml_eos", CHATML_EOS


def special_ids(tokenizer) -> set[int]:
    """Ids of the vocabulary's special tokens (eos, bos, pad, and added special tokens such as <|im_end|>)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _single_special(tokenizer, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] in special_ids(tokenizer)


def _is_blank(tokenizer, token_id: int) -> bool:
    return not tokenizer.decode([token_id]).strip()


def assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s in an assistant-tokens mask (or of trained labels, given labels != -100)."""
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def turn_spans(ids: list[int], mask: list[int], tokenizer) -> list[tuple[int, int]]:
    """:func:`assistant_spans`, with spans separated only by blank tokens joined into one turn: a twin that marks a
    turn's end marker and the eos after the last turn in two blocks (trl's Phi-3 twin: ``<|end|>\n`` then
    ``</s>``) leaves the newline between them unmarked on a vocabulary that writes it as two tokens (Llama 2's
    ``▁`` + ``\n`` after a special token); that is still one assistant turn, ending on a stop token."""
    spans: list[tuple[int, int]] = []
    for a, b in assistant_spans(mask):
        if spans and all(_is_blank(tokenizer, t) for t in ids[spans[-1][1] : a]):
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def span_stop(ids: list[int], special: set[int], tokenizer) -> int | None:
    """The stop token a trained span ends on: its last special token, followed by whitespace at most; else None."""
    for token in reversed(ids):
        if token in special:
            return token
        if not _is_blank(tokenizer, token):
            return None
    return None


def check_turn_ends(tokenizer, assistant_only_loss: bool, last_turn: bool = False) -> list[int]:
    """Render :data:`PROBE_CHAT` with the tokenizer's chat template and check that each assistant turn ends on a
    token generation can stop on; return those stop-token ids.

    With ``assistant_only_loss`` the template must mark assistant turns (``{% generation %}``, any whitespace
    control) and each marked span must end on a special token: ``<|im_end|>`` left outside the block, or written
    as text pieces by a vocabulary without it, is never learned. Without it, the token after each reply must be a
    special token. Raises ConfigError with the fix otherwise. ``last_turn``: return only the stop token of the
    last assistant turn (the reply a generation prompt asks for; earlier turns are history)."""
    probe = accepted_probe(tokenizer)
    if assistant_only_loss:
        out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        spans = turn_spans(ids, list(out["assistant_masks"]), tokenizer)
        if len(spans) != 2:
            raise ConfigError(
                "assistant_only_loss: the chat template does not mark assistant turns with {% generation %} ... "
                "{% endgeneration %} (rendered, a conversation with 2 assistant turns has "
                f"{len(spans)} marked spans), and it is not a family template alignkit has a training twin for. Fix: set "
                "chat_template to the model family's template (a name from alignkit.data.chat_families.family_names(), "
                "e.g. gemma3, llama3_1, qwen2_5, qwen3; 'chatml' or 'chatml_eos' for a model without a family "
                "format), or give a template with generation blocks, or set assistant_only_loss: false."
            )
        stops = [span_stop(ids[a:b], special_ids(tokenizer), tokenizer) for a, b in spans]
        ends = [tokenizer.decode(ids[b - 3 : b]) for a, b in spans]
    else:
        marker = "ALIGNKIT-REPLY-END"
        probe = [dict(m, content=marker) if m["role"] == "assistant" else m for m in probe]
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        stops, ends = [], []
        for after in rendered.split(marker)[1:]:
            following = tokenizer(after, add_special_tokens=False)["input_ids"][:4]
            stops.append(_first_stop(following, special_ids(tokenizer), tokenizer))
            ends.append(marker[-3:] + tokenizer.decode(following[:3]))
    if any(stop is None for stop in stops):
        bad = ends[stops.index(None)]
        where = "trained part of an assistant turn" if assistant_only_loss else "text after an assistant reply"
        eos = tokenizer.eos_token
        raise ConfigError(
            f"chat_template: the {where} ends on {bad!r}, not on a token generation stops on (a special token such "
            f"as eos {eos!r}), so the model would not learn to stop. Fix: put the end-of-turn token inside "
            "{% generation %} ... {% endgeneration %}; for a vocabulary without that token (e.g. <|im_end|> is "
            f"not one token here) set chat_template: chatml_eos, which ends turns with {eos!r}."
        )
    return [stops[-1]] if last_turn else sorted(set(stops))


def accepted_probe(tokenizer, template: str | None = None) -> list[dict]:
    """:data:`PROBE_CHAT`, or without its system turn when the template refuses system turns (Gemma 2, the
    alternating-roles Mistral templates): probes use only the roles the template accepts. A template that refuses
    both is a ConfigError quoting its own message."""
    from alignkit.data.chat_probes import template_error

    tried = []
    for probe in (PROBE_CHAT, PROBE_CHAT[1:]):
        try:
            tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
            return probe
        except Exception as exc:  # noqa: BLE001 - its own raise_exception, quoted below
            message = template_error(exc)
            if message is None:
                raise
            tried.append(message)
    raise ConfigError(
        f"chat_template: the template refuses a plain user/assistant conversation: {tried[-1]!r}. Fix: use the "
        "model's own instruct template, or a family's (chat_template: gemma3, llama3, qwen3, chatml, ...)."
    )


def _first_stop(ids: list[int], special: set[int], tokenizer) -> int | None:
    for token in ids:
        if token in special:
            return token
        if not _is_blank(tokenizer, token):
            return None
    return None


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos, the special token the chat template closes the reply being
    generated with (``<|im_end|>`` in ChatML) when that differs from eos, and, for a family's template, every token
    it ends a reply with in any branch (:func:`family_stops`: a tool call's, a built-in tool call's). generate() must
    stop at each.

    Read from the conversation's LAST assistant turn, the one generation writes: a template may close earlier
    turns, which are history, with another token (gpt-oss rewrites a past final message to end on ``<|end|>``,
    the token that also closes its analysis channel; its reply ends on ``<|return|>``). A stop on such a history
    marker would cut every reasoning reply after its thinking."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        try:
            stops = check_turn_ends(tokenizer, assistant_only_loss=False, last_turn=True)
        except ConfigError:
            stops = []
        ids += [i for i in stops if i not in ids]
        ids += [i for i in family_stops(tokenizer) if i not in ids]
    return ids


def family_stops(tokenizer) -> list[int]:
    """The ids of :func:`alignkit.data.chat_families.stop_tokens` of the family whose template the tokenizer has
    (stock or twin; Llama 3.1: ``<|eot_id|>``, ``<|eom_id|>``; gpt-oss: ``<|return|>``, ``<|call|>``), each where
    it is one special token of the vocabulary; [] for a template of no family."""
    from alignkit.data.chat_families import identify, stop_tokens

    name = identify(tokenizer.chat_template)
    if name is None:
        return []
    return [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(name) if _single_special(tokenizer, t)]

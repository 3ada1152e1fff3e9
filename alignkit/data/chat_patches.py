"""alignkit's training twins: a family's stock template with ``{% generation %}`` marks inserted, nothing else.

Each patch is a list of (old, new, count): ``old`` must occur exactly ``count`` times in the stock text, and ``new``
differs from it only by generation tags (which render nothing), so the twin renders the stock text by construction;
:func:`alignkit.data.chat_families.prove_twin`-style rendering (``alignkit.data.chat_probes``) checks it per run.
A key ``<family>:no_reasoning`` is the twin that leaves the reasoning block outside the marks (thinking masked).
"""

from __future__ import annotations

GEN, END = "{%- generation %}", "{%- endgeneration %}"

_LLAMA3_TURN = "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"  # fmt: skip
_LLAMA3_CALL = "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
_LLAMA3_TOOL = '    {%- elif message.role == "tool" or message.role == "ipython" %}'


def _llama3_x(builtin: bool) -> list[tuple[str, str, int]]:
    edits = [
        (
            _LLAMA3_TURN,
            "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
            + GEN + "{{- message['content'] | trim + '<|eot_id|>' }}" + END + "{%- else %}" + _LLAMA3_TURN
            + "{%- endif %}",
            1,
        ),
        (_LLAMA3_CALL, _LLAMA3_CALL + GEN, 2 if builtin else 1),
        (_LLAMA3_TOOL, "        " + END + "\n" + _LLAMA3_TOOL, 1),
    ]  # fmt: skip
    if builtin:  # Llama 3.1: the call and its end token (<|eom_id|> or <|eot_id|>) sit in separate if-blocks
        edits += [
            ('{{- ")" }}\n        {%- else  %}', '{{- ")" }}' + END + "\n        {%- else  %}", 1),
            ('{{- "}" }}\n        {%- endif %}', '{{- "}" }}' + END + "\n        {%- endif %}", 1),
            ("        {%- if builtin_tools is defined %}\n            {#-", "        " + GEN + "{%- if builtin_tools is defined %}\n            {#-", 1),
        ]  # fmt: skip
    return edits


_QWEN3_THINK = "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"  # fmt: skip
_QWEN3_PLAIN = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
_QWEN3_END = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
_QWEN3_HEAD = "{{- '<|im_start|>' + message.role + '\\n' }}"


def _qwen3(reasoning_trained: bool) -> list[tuple[str, str, int]]:
    think = (
        _QWEN3_HEAD + GEN + "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
        if reasoning_trained
        else "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
        + GEN + "{{- content.lstrip('\\n') }}"
    )  # fmt: skip
    return [  # content and the calls + <|im_end|> are two adjacent marked blocks: one span
        (_QWEN3_THINK, think + END, 1),
        (_QWEN3_PLAIN, _QWEN3_HEAD + GEN + "{{- content }}" + END, 2),
        ("        {%- if message.tool_calls %}", "        " + GEN + "{%- if message.tool_calls %}", 1),
        (_QWEN3_END, "        {{- '<|im_end|>\\n' }}" + END + '\n    {%- elif message.role == "tool" %}', 1),
    ]


_SMOLLM2_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_MISTRAL_REPLY = "{{ message['content'] + eos_token}}"
_PHI4_REPLY = "{{message['content'] + '<|im_end|>'}}"

_GPTOSS_CALL, _GPTOSS_CALLED = '            {{- "<|start|>assistant to=" }}', '            {{- "<|call|>" }}'
_GPTOSS_FINAL = '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}'
_GPTOSS_EARLIER = '{{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}'

# gpt-oss with the analysis channel untrained: the calls and the final channel marked, analysis messages left out.
_GPTOSS_NO_REASONING = [
    (_GPTOSS_CALL, "            " + GEN + _GPTOSS_CALL.strip(), 1),
    (_GPTOSS_CALLED, _GPTOSS_CALLED + END, 1),
    (_GPTOSS_FINAL, GEN + _GPTOSS_FINAL + END, 1),
    (_GPTOSS_EARLIER, GEN + _GPTOSS_EARLIER + END, 1),
]

PATCHES: dict[str, list[tuple[str, str, int]]] = {
    "gptoss:no_reasoning": _GPTOSS_NO_REASONING,
    "llama3_1": _llama3_x(builtin=True),
    "llama3_2": _llama3_x(builtin=False),
    "qwen3": _qwen3(reasoning_trained=True),
    "qwen3:no_reasoning": _qwen3(reasoning_trained=False),
    "smollm2": [
        (
            _SMOLLM2_TURN,
            "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
            "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}" + _SMOLLM2_TURN + "{% endif %}",
            1,
        )
    ],
    "mistral": [(_MISTRAL_REPLY, "{% generation %}" + _MISTRAL_REPLY + "{% endgeneration %}", 1)],
    "phi4": [(_PHI4_REPLY, "{% generation %}" + _PHI4_REPLY + "{% endgeneration %}", 1)],
}


def patch(stock: str, edits: list[tuple[str, str, int]]) -> str:
    """``stock`` with each (old, new, count) edit applied; RuntimeError if ``old`` does not occur ``count`` times
    (the stored stock template changed: the twin must be redone, never guessed)."""
    text = stock
    for old, new, count in edits:
        found = text.count(old)
        if found != count:
            raise RuntimeError(f"chat template patch: expected {count} occurrence(s) of {old[:60]!r}, found {found}")
        text = text.replace(old, new)
    return text

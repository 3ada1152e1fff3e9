"""Tool-use rows for the demo task: the demo's two-digit sums answered through a ``calculator`` tool (issue 36).

Each training row is one OpenAI-format conversation: the demo's system prompt and question, an assistant turn whose
only output is a ``tool_calls`` entry (``calculator`` with ``{"expression": "23 + 45"}``, arguments as a JSON
string, as OpenAI clients send them), the ``tool`` message with the result, and the final reply in the demo's
checkable format (``ANSWER: 68``); the row's ``tools`` declares the calculator's JSON schema. The held-out questions
are the demo's own (:func:`alignkit.demo.data.make_rows` ``eval``), disjoint from the training pairs.

:func:`call_score` scores one generated reply after it is parsed by the family's response parser (trl's
``parse_response``): *well-formed* (exactly one call, naming a declared tool, arguments a JSON object holding the
required ``expression``) and *right* (the expression is the question's sum).
"""

from __future__ import annotations

import json
import re

from alignkit.demo.data import SYSTEM, _pairs, _question, _reply

TOOL = "calculator"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": TOOL,
            "description": "Evaluate an arithmetic expression such as '23 + 45' and return the number.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "The expression, e.g. '23 + 45'."}},
                "required": ["expression"],
            },
        },
    }
]
_SUM = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*$")


def prompt(a: int, b: int) -> list[dict]:
    """The conversation the model answers: the demo's system prompt and question (the tools go alongside)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _question(a, b)}]


def call(a: int, b: int, index: int = 0) -> dict:
    """The assistant message that calls the calculator on ``a + b`` (arguments as a JSON string, OpenAI style)."""
    arguments = json.dumps({"expression": f"{a} + {b}"})
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "id": f"call{index:05d}", "function": {"name": TOOL, "arguments": arguments}}],
    }  # fmt: skip


def conversation(a: int, b: int, index: int = 0) -> list[dict]:
    """A whole tool-use conversation: question, call, the tool's result, the final checkable reply."""
    return [
        *prompt(a, b),
        call(a, b, index),
        {"role": "tool", "name": TOOL, "tool_call_id": f"call{index:05d}", "content": str(a + b)},
        {"role": "assistant", "content": _reply(a, b)},
    ]


def tool_rows(n_train: int = 200, n_eval: int = 50, seed: int = 0) -> dict[str, list[dict]]:
    """``train``: SFT rows (``messages`` + ``tools``) on the demo's training pairs; ``eval``: the demo's held-out
    questions as ``{"a", "b"}``, none of them in ``train``."""
    eval_pairs = _pairs(seed + 1000, n_eval)  # the demo's held-out pairs (make_rows' eval split)
    train_pairs = _pairs(seed + 7, n_train, exclude=set(eval_pairs))
    train = [{"messages": conversation(a, b, i), "tools": TOOLS} for i, (a, b) in enumerate(train_pairs)]
    return {"train": train, "eval": [{"a": a, "b": b} for a, b in eval_pairs]}


def call_score(parsed: dict, a: int, b: int) -> dict[str, bool]:
    """Score one parsed reply (the dict trl's ``parse_response`` returns): ``well_formed``: exactly one tool call,
    to ``calculator``, with an arguments object holding a string ``expression``; ``right``: well formed and the
    expression is ``a + b``."""
    calls = parsed.get("tool_calls") or []
    function = calls[0].get("function", {}) if len(calls) == 1 and isinstance(calls[0], dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    well_formed = (
        function.get("name") == TOOL and isinstance(arguments, dict) and isinstance(arguments.get("expression"), str)
    )
    match = _SUM.match(arguments["expression"]) if well_formed else None
    right = match is not None and (int(match.group(1)), int(match.group(2))) == (a, b)
    return {"well_formed": well_formed, "right": right}

"""Tool-use rows for the demo task: the demo's two-digit sums answered through a ``calculator`` tool (issues 36, 42).

Each training row is one OpenAI-format conversation: the demo's system prompt and question, an assistant turn whose
only output is a ``tool_calls`` entry (``calculator`` with ``{"expression": "23 + 45"}``, arguments as a JSON
string, as OpenAI clients send them), the ``tool`` message with the result, and the final reply in the demo's
checkable format (``ANSWER: 68``); the row's ``tools`` declares the calculator's JSON schema. The held-out questions
are the demo's own (:func:`alignkit.demo.data.make_rows` ``eval``), disjoint from the training pairs.

:func:`call_score` scores one generated reply after it is parsed by the family's response parser (trl's
``parse_response``): *well-formed* (exactly one call, naming a declared tool, arguments a JSON object holding the
required ``expression``) and *right* (the expression is the question's sum).

:func:`calculator` is the tool itself, as tool-use GRPO runs it (``tools: [alignkit.demo.tool_data:calculator]``): a
safe arithmetic evaluator (Python's ``ast``, numbers and + - * / // % ** only, no names or calls, bounded powers);
its schema (transformers' ``get_json_schema``) is :data:`TOOLS`. :func:`tool_grpo_rows` are GRPO's prompts for it.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

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


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 200  # characters
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        out = _BINARY[type(node.op)](left, right)
        if abs(out) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return out
    raise ValueError(f"'{ast.unparse(node)}' is not arithmetic (numbers and + - * / // % ** only)")


def calculator(expression: str):
    """Evaluate an arithmetic expression such as '23 + 45' and return the number.

    Args:
        expression: The expression, e.g. '23 + 45'.
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression must be a string of at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def tool_grpo_rows(n_train: int = 400, seed: int = 0) -> list[dict]:
    """GRPO's rows for tool use: the demo's training questions (disjoint from its held-out ones) as ``prompt``
    (system + question), the calculator's schema as ``tools`` and the sum as ``answer`` (the exact reward's)."""
    from alignkit.demo.data import make_rows

    return [{**row, "tools": TOOLS} for row in make_rows(n_train=n_train, seed=seed)["grpo"]]


def write_tool_data(out_dir: str | Path, n_train: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write ``tool_sft.jsonl`` (tool-call conversations, :func:`tool_rows`) and ``tool_grpo.jsonl``
    (:func:`tool_grpo_rows`) under ``out_dir``; their paths by split name."""
    out = {"tool_sft": tool_rows(n_train=n_train // 2, seed=seed)["train"], "tool_grpo": tool_grpo_rows(n_train, seed)}
    paths = {}
    for name, rows in out.items():
        path = Path(out_dir) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = path
    return paths

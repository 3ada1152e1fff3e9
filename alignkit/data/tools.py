"""Tool-calling rows (OpenAI format), checked before step 1: DataError with file, row and fix.

A row may carry ``tools`` (a list of JSON function schemas, or that list as a JSON string); assistant messages may
carry ``tool_calls`` (``[{"type": "function", "function": {"name": ..., "arguments": {...} or "{...}"}}]``, content
then may be empty), and ``tool`` messages carry a call's result. Checked: every call names a declared tool, its
arguments parse to a JSON object, and every tool result follows a call (as many results as calls at most).
"""

from __future__ import annotations

import json

from alignkit.errors import DataError

TOOLS_FIX = 'give the row a "tools" list of {"type": "function", "function": {"name": ..., "parameters": {...}}}'


def tool_names(tools, source, row) -> set[str]:
    """The function names a row's ``tools`` declares; DataError if it is not a list of function schemas."""
    if tools is None:
        return set()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(source, row, f"'tools' is not valid JSON ({exc.msg})", TOOLS_FIX) from None
    if not isinstance(tools, list):
        raise DataError(source, row, f"'tools' is a {type(tools).__name__}, not a list of function schemas", TOOLS_FIX)
    names = set()
    for j, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(source, row, f"tools[{j}] has no function name", TOOLS_FIX)
        names.add(function["name"])
    return names


def uses_tools(messages) -> bool:
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages or [])


def check_tool_turns(messages, declared: set[str], source, row, column="messages") -> None:
    """Check the tool calls and tool results of one conversation against the declared tool names."""
    pending = 0
    for j, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls:
            if message.get("role") != "assistant":
                raise DataError(source, row, f"{column}[{j}] ({message.get('role')}) has tool_calls", "only assistant messages call tools")  # fmt: skip
            if not isinstance(calls, list):
                raise DataError(source, row, f"{column}[{j}].tool_calls is not a list", "write tool_calls as a list of calls")  # fmt: skip
            for k, call in enumerate(calls):
                _check_call(call, declared, source, row, f"{column}[{j}].tool_calls[{k}]")
            pending = len(calls)
        elif message.get("role") == "tool":
            if pending == 0:
                raise DataError(
                    source, row, f"{column}[{j}] is a tool result that follows no tool call",
                    "put each tool message right after the assistant message whose tool_calls it answers",
                )  # fmt: skip
            pending -= 1
        else:
            pending = 0


def _check_call(call, declared: set[str], source, row, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(source, row, f"{where} has no function.name", 'write {"type": "function", "function": {"name": ..., "arguments": {...}}}')  # fmt: skip
    name = function["name"]
    if name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        raise DataError(source, row, f"{where} calls '{name}', which the row's tools do not declare (declared: {known})", f"add '{name}' to the row's tools, or fix the call's name")  # fmt: skip
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise DataError(source, row, f"{where}.function.arguments is not valid JSON ({exc.msg})", "write the arguments as a JSON object (or a string holding one)") from None  # fmt: skip
    if not isinstance(arguments, dict):
        raise DataError(source, row, f"{where}.function.arguments is a {type(arguments).__name__}, not an object", "write the arguments as a JSON object")  # fmt: skip

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


def read_tools_file(path) -> list[dict]:
    """The function schemas of a JSON file holding an OpenAI ``tools`` list (``alignkit chat/generate --tools``);
    DataError naming the file and the fix for a missing file, bad JSON or an entry without a function name."""
    from pathlib import Path

    if not Path(path).is_file():
        raise DataError(str(path), None, "file not found", "give a JSON file holding the tools list")
    text = Path(path).read_text(encoding="utf-8-sig")
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), None, f"not valid JSON ({exc.msg})", TOOLS_FIX) from None
    tool_names(tools, str(path), None)
    return tools


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


def set_response_parser(tokenizer) -> bool:
    """Give ``tokenizer`` the response parser of its chat template's family unless it has one: trl's
    ``add_response_schema`` (what trl's GRPOTrainer uses to read rollouts), matched on the exact stock template text
    (Qwen2.5 and Qwen3: ``<tool_call>`` JSON blocks; Llama 3.1/3.2, gpt-oss, ...). ``tokenizer.parse_response`` and
    transformers' server (``transformers serve``, which reads ``tokenizer.response_template`` before its own
    per-``model_type`` table) then return tool calls as ``tool_calls``. Returns False when trl knows no parser for the
    template (replies are then plain text)."""
    if any(getattr(tokenizer, name, None) is not None for name in ("response_template", "response_schema")):
        return True
    from trl.chat_template_utils import add_response_schema

    try:
        add_response_schema(tokenizer)
    except ValueError:
        return False
    return True


_CHAT_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def _parsed(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # the row checks already refused invalid JSON; left as given
    return value


def with_object_arguments(messages: list) -> list:
    """A copy of ``messages`` with every ``tool_calls[].function.arguments`` JSON string parsed to its object: templates apply
    ``| tojson`` to the arguments (Qwen2.5, Llama 3.1), which would print a string form escaped a second time."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = dict(message)
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _parsed(call["function"].get("arguments", {}))}}
                if isinstance(call, dict) and isinstance(call.get("function"), dict)
                else call
                for call in calls
            ]
        out.append(message)
    return out


def normalize_tool_rows(dataset, tools=None):
    """Chat rows ready to render with tools: each row's ``tools`` (its own, else the source's ``tools``) stored as
    JSON text (trl's trainers parse it; one Arrow type whatever the schemas hold), and call arguments given as JSON
    strings parsed to objects, the chat columns typed ``datasets.Json`` so no object gains the keys of another row's
    (Arrow's struct union would add them as nulls). Rows without tools are returned unchanged; a streamed split too."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return dataset
    chat = [c for c in _CHAT_COLUMNS if c in dataset.column_names]
    has_tools = "tools" in dataset.column_names
    if (
        tools is None
        and not has_tools
        and not any(uses_tools(v) for c in chat for v in dataset[c] if isinstance(v, list))
    ):
        return dataset
    shared = json.dumps(_parsed(tools)) if tools is not None else None

    def convert(row):
        out = {c: with_object_arguments(row[c]) if isinstance(row[c], list) else row[c] for c in chat}
        own = _parsed(row.get("tools"))
        out["tools"] = json.dumps(own) if own else shared
        return out

    features = dataset.features.copy()
    for column in chat:
        if isinstance(features[column], (datasets.List, datasets.LargeList)):
            features[column] = datasets.List(datasets.Json())
    features["tools"] = datasets.Value("string")
    return dataset.map(convert, features=features, desc="tool rows")


def row_tools(row: dict):
    """A row's tools as objects for ``apply_chat_template`` (stored as JSON text by :func:`normalize_tool_rows`)."""
    return _parsed(row.get("tools")) or None


def render_tool_pairs(dataset, tokenizer):
    """Preference rows with tools rendered to text by the run's template, for trainers that apply the chat template
    without the row's ``tools`` (trl.experimental's ORPO and CPO/SimPO call ``maybe_apply_chat_template`` without
    them): trl's own ``apply_chat_template`` with the row's tools, so the prompt ends with the generation prompt and
    each reply is the rendered rest, exactly as trl renders rows without tools. Other data is returned unchanged."""
    from trl.data_utils import apply_chat_template

    if "tools" not in (dataset.column_names or []):
        return dataset
    columns = [c for c in ("prompt", "chosen", "rejected", "completion") if c in dataset.column_names]

    def render(row):
        example = {c: row[c] for c in columns}
        if not all(isinstance(v, list) for v in example.values()):
            return example
        return apply_chat_template(example, tokenizer, tools=row_tools(row))

    import datasets

    features = datasets.Features({c: f for c, f in dataset.features.items() if c not in (*columns, "tools")})
    features.update({c: datasets.Value("string") for c in columns})  # typed, or the Json type would be kept
    return dataset.map(render, remove_columns=[*columns, "tools"], features=features, desc="rendering tool rows")

"""The demo's held-out evaluation with the calculator tool (the tool-use rows of the methods table, docs/methods.md).

Each held-out question is asked greedily with the calculator's schema in the prompt (the saved chat template renders
it). A reply is parsed by trl's ``parse_response`` with the template's response parser (as trl's GRPOTrainer parses
rollouts); if it calls the calculator, the call runs as tool-use GRPO runs it (:func:`alignkit.train.tools.timed_tool`,
errors and timeouts as tool errors), the result is appended as a ``tool`` message and the model answers again. The
model's own text (every assistant turn, tool results excluded) is scored as the demo scores any reply: format (an
``ANSWER: n`` line) and exact (n is the sum); ``tool_use`` is the share of questions whose reply called the tool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignkit.demo.data import score

FIRST_TOKENS = 64  # a calculator call is ~30 SmolLM2 tokens
TOOL_TIMEOUT = 5.0


def generate(model, tokenizer, conversations: list[list[dict]], tools, max_new_tokens: int, batch_size: int = 16):
    """(prompt ids, reply ids up to and including the first end-of-turn) per conversation; greedy, tools rendered."""
    import torch

    from alignkit.data.templates import end_of_turn_ids

    stops = end_of_turn_ids(tokenizer)
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True, tokenize=False)
            for c in conversations[i : i + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        width = batch["input_ids"].shape[1]
        for text, row in zip(texts, ids.tolist()):
            reply = row[width:]
            cut = next((k + 1 for k, t in enumerate(reply) if t in stops), len(reply))
            out.append((tokenizer(text, add_special_tokens=False)["input_ids"], reply[:cut]))
    return out


def run_calls(message: dict, tools: dict) -> list[dict]:
    """The ``tool`` messages answering ``message``'s tool calls, each run by name from ``tools`` (name -> the timed
    tool); an unknown name, an exception or a timeout becomes ``{'error': ...}``, as trl shows it."""
    from alignkit.train.tools import ToolError

    out = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        name, arguments = function.get("name"), function.get("arguments") or {}
        try:
            if name not in tools:
                raise ToolError(f"Tool {name} not found.")
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            result = tools[name](**arguments)
        except (ToolError, TypeError, ValueError) as exc:
            result = {"error": str(exc)}
        out.append({"role": "tool", "name": str(name), "content": str(result)})
    return out


def evaluate_with_tools(path: Path, rows: list[dict], out_file: Path, max_new_tokens: int = 40) -> dict[str, float]:
    """Score the model at ``path`` on the held-out ``rows`` (``messages`` + ``answer``) with the calculator available
    (module docstring). Returns ``format``, ``exact``, ``tool_use`` (shares of the rows) and ``seconds``; every
    conversation with its score goes to ``out_file``."""
    from trl.chat_template_utils import parse_response

    from alignkit.demo.tool_data import TOOLS, calculator
    from alignkit.export.generate import load_for_generation
    from alignkit.train.rewards import completion_text
    from alignkit.train.tools import check_template, timed_tool

    started = time.time()
    model, tokenizer = load_for_generation(path, merge=True)
    check_template(tokenizer, ["calculator"])  # renders tools and calls; sets trl's response parser
    tools = {"calculator": timed_tool(calculator, TOOL_TIMEOUT)}
    conversations = [list(r["messages"]) for r in rows]
    firsts = generate(model, tokenizer, conversations, TOOLS, FIRST_TOKENS)
    replies = [[parse_response(tokenizer, ids, prefix=prefix, tools=TOOLS)] for prefix, ids in firsts]
    again = [i for i, reply in enumerate(replies) if reply[0].get("tool_calls")]
    for i in again:
        replies[i] += run_calls(replies[i][0], tools)
    seconds = generate(model, tokenizer, [conversations[i] + replies[i] for i in again], TOOLS, max_new_tokens)
    for i, (prefix, ids) in zip(again, seconds):
        replies[i].append(parse_response(tokenizer, ids, prefix=prefix, tools=TOOLS))
    scored = []
    for row, reply in zip(rows, replies):
        s = score(completion_text(reply), row["answer"])
        scored.append({"question": row["messages"][-1]["content"], "answer": row["answer"], "rollout": reply,
                       "tool_use": any(m.get("role") == "tool" for m in reply), **s})  # fmt: skip
    out_file.write_text("".join(json.dumps(s, default=str) + "\n" for s in scored))
    n = max(1, len(scored))
    return {
        "format": sum(s["format"] for s in scored) / n,
        "exact": sum(s["exact"] for s in scored) / n,
        "tool_use": sum(s["tool_use"] for s in scored) / n,
        "seconds": time.time() - started,
    }

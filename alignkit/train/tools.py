"""Tool-use GRPO: the Python functions a rollout may call, named in the recipe's ``tools``
(:class:`alignkit.config.ToolArguments`) and handed to trl 1.16's ``GRPOTrainer(tools=...)``.

trl renders each prompt with the functions' JSON schemas (transformers' ``get_json_schema``: the name, the type hints
and the Google-style docstring), parses every completion with the chat template's response parser, runs the calls it
finds, appends ``tool`` messages with the results and lets the model go on (up to ``max_tool_calling_iterations``
rounds, within ``max_completion_length`` tokens); the tool results are masked out of the loss. What alignkit adds:

- **checked before the model loads** (``ConfigError``/``DataError``, exit 2): each entry imports, names a callable,
  and has the docstring and type hints a schema is built from; names are distinct; every row's ``tools`` declares
  only these functions, with the parameters the function takes (the model is shown the function's schema, not the
  row's); the run's chat template renders a whole tool exchange and trl has a response parser for it.
- **a time limit** (``tool_timeout``): a call that runs longer is stopped (SIGALRM in the main thread; elsewhere the
  rollout stops waiting for it) and the model sees a tool error.
- **errors the model sees**: an exception (``SystemExit`` included) or a timeout becomes :class:`ToolError`, which trl
  turns into the tool message ``{'error': '<function> raised ValueError: ...'}`` and counts in
  ``tools/failure_frequency``; the run goes on.
- **the share of completions that used a tool** (a tool message in the rollout), logged per step as
  ``tools/used_ratio`` (``eval_tools/used_ratio`` on the test split) beside trl's ``tools/call_frequency`` (calls per
  completion); its mean over the run is ``train_tools/used_ratio`` in the final metrics (alignkit_run.json and the
  closing summary).
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import threading
from collections.abc import Callable

from transformers import TrainerCallback

from alignkit.errors import ConfigError, DataError

USED_RATIO = "tools/used_ratio"
TRAIN_USED_RATIO = "train_tools/used_ratio"  # its mean over the run, in the final metrics and the run's summary


class ToolError(Exception):
    """A tool call that failed or ran out of time; its message is what the model reads in the tool message."""


class _Timeout(BaseException):  # BaseException: a tool's own ``except Exception`` cannot swallow the time limit
    pass


def _import(spec: str, index: int) -> Callable:
    """``package.module:function`` -> the callable; ConfigError naming the entry and the fix."""
    from alignkit.train.rewards import import_user_module

    where = f"tools[{index}]"
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name or spec.startswith((".", "/")):
        raise ConfigError(
            f"{where}: '{spec}' is not an import path. Fix: name the function as 'package.module:function' (a "
            "module on PYTHONPATH), e.g. alignkit.demo.tool_data:calculator."
        )
    module = import_user_module(spec, where)
    if not hasattr(module, name):
        raise ConfigError(f"{where}: module '{module_name}' has no '{name}'. Fix: name a function it defines.")
    func = getattr(module, name)
    if not inspect.isfunction(func):
        kind = "a class" if inspect.isclass(func) else f"the {type(func).__name__} {func!r}"[:80]
        raise ConfigError(
            f"{where}: '{spec}' is not a function but {kind}. Fix: name a plain (or async) function whose keyword "
            "arguments are the tool's parameters."
        )
    return func


def tool_schema(func: Callable, spec: str, index: int = 0) -> dict:
    """The JSON schema the model is shown for ``func`` (transformers' ``get_json_schema``); ConfigError if its
    docstring or type hints cannot give one."""
    from transformers.utils.chat_template_utils import get_json_schema

    try:
        return get_json_schema(func)
    except Exception as exc:  # noqa: BLE001 - TypeHintParsingException, DocstringParsingException and their kin
        raise ConfigError(
            f"tools[{index}]: '{spec}' cannot be described to the model ({type(exc).__name__}: {exc}). Fix: give it "
            "a type hint on every parameter and a Google-style docstring: a summary line, then 'Args:' with one "
            "'name: description' line per parameter."
        ) from None


def timed_tool(func: Callable, timeout: float) -> Callable:
    """``func`` as trl calls a tool, ``tool(**arguments)``, under a time limit of ``timeout`` seconds; its
    exceptions (``SystemExit`` included) and timeouts raise :class:`ToolError` naming the function, which trl shows
    the model as the tool's error. The wrapper keeps the name, signature, type hints and docstring (its schema)."""
    name = func.__name__

    if inspect.iscoroutinefunction(func):  # trl runs async tools on its event loop: the limit is asyncio's

        @functools.wraps(func)
        async def async_tool(**arguments):
            import asyncio

            try:
                return await asyncio.wait_for(func(**arguments), timeout)
            except asyncio.TimeoutError:
                raise ToolError(_timeout_text(name, timeout)) from None
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the tool's failure is the model's to read
                raise ToolError(_error_text(name, exc)) from None

        return async_tool

    @functools.wraps(func)
    def tool(**arguments):
        try:
            return _call_with_limit(func, arguments, timeout)
        except _Timeout:
            raise ToolError(_timeout_text(name, timeout)) from None
        except ToolError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the tool's failure is the model's to read
            raise ToolError(_error_text(name, exc)) from None

    return tool


def _timeout_text(name: str, timeout: float) -> str:
    return f"{name} did not finish within {timeout:g} s and was stopped"


def _error_text(name: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{name} raised {type(exc).__name__}: {text}" if text else f"{name} raised {type(exc).__name__}"


def _call_with_limit(func: Callable, arguments: dict, timeout: float):
    """Call ``func(**arguments)``; raise _Timeout past ``timeout`` s. In the main thread an interval timer
    (SIGALRM) interrupts it (Python code, sleeps); elsewhere it runs in a daemon thread that is abandoned on timeout."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def on_alarm(signum, frame):
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return func(**arguments)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    result: dict = {}

    def target():
        try:
            result["value"] = func(**arguments)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True, name=f"alignkit-tool-{func.__name__}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _parameters(schema: dict) -> tuple[dict, list]:
    params = (schema.get("function", schema) or {}).get("parameters") or {}
    properties = {k: (v or {}).get("type") for k, v in (params.get("properties") or {}).items()}
    return properties, sorted(params.get("required") or [])


def check_row_tools(data, label: str, places, schemas: dict[str, dict], fix: str | None = None) -> None:
    """Each row's ``tools`` (a list of function schemas, or that list as JSON text) may declare only the recipe's
    functions (``schemas``: name -> the function's schema; none named: no row may declare tools, which trl would
    leave out of the prompt), with their parameters (names, types, required); DataError naming the file, row and
    ``fix`` (default: name the function in ``tools:``) (``places``: :func:`alignkit.data.places.place`)."""
    from alignkit.data.places import place

    if "tools" not in (getattr(data, "column_names", None) or []):
        return
    for i, declared in enumerate(data["tools"]):
        tools = json.loads(declared) if isinstance(declared, str) else declared
        for tool in tools or []:
            function = tool.get("function", tool)
            name = function.get("name")
            if name not in schemas:
                raise DataError(
                    *place(places, label, i),
                    f"'tools' declares '{name}', which the recipe's tools do not implement (they are: "
                    f"{sorted(schemas)}; trl renders the prompts with those only)",
                    fix or f"add its 'package.module:function' to tools:, or drop '{name}' from the row's tools",
                )  # fmt: skip
            have, want = _parameters(function), _parameters(schemas[name])
            if have != want:
                raise DataError(
                    *place(places, label, i),
                    f"'tools' declares {name} with parameters {have[0]} (required {have[1]}), but the function "
                    f"takes {want[0]} (required {want[1]}); the model is prompted with the function's schema",
                    "make the row's schema match the function's signature (or drop the row's tools)",
                )  # fmt: skip


def check_template(tokenizer, names: list[str]) -> None:
    """The run's chat template renders a whole tool exchange (the call and the result) and trl has a response
    parser for it; ConfigError naming the fix otherwise. Sets the tokenizer's response parser as trl would."""
    from trl.chat_template_utils import supports_tool_calling

    from alignkit.data.chat_families import family_names
    from alignkit.data.tools import set_response_parser

    family = getattr(getattr(tokenizer, "alignkit_template", None), "family", None)
    which = f"family {family}" if family else "the model's own, no known family"
    families = ", ".join(f for f in ("qwen2_5", "qwen3", "llama3_1") if f in family_names())
    if not supports_tool_calling(tokenizer):
        raise ConfigError(
            f"tools {names}: the run's chat template ({which}) cannot express tool calls: rendering a conversation "
            "with an assistant tool call and its result loses the call or the result. Fix: set chat_template: to a "
            f"family whose template renders tools ({families}; qwen2_5 uses ChatML's tokens, as SmolLM2 does), "
            "after an SFT in that format so that the model knows it."
        )
    if not set_response_parser(tokenizer):
        raise ConfigError(
            f"tools {names}: trl has no response parser for the run's chat template ({which}), so the tool calls "
            f"in a completion could not be read. Fix: use a family whose parser trl ships ({families}), or set "
            "the tokenizer's response_template in its folder."
        )


def load_tools(args) -> dict[str, tuple[Callable, dict]]:
    """The recipe's tools (``args``: :class:`alignkit.config.ToolArguments`), imported and described: name ->
    (function, its JSON schema); ``{}`` when none are named. ConfigError naming the entry and the fix."""
    if not args.tools:
        return {}
    tools: dict[str, tuple[Callable, dict]] = {}
    for i, spec in enumerate(args.tools):
        if not isinstance(spec, str):
            raise ConfigError(
                f"tools[{i}]: {spec!r} is not an import path. Fix: name a function as 'package.module:function' "
                "(the rows' tools column holds the JSON schemas)."
            )
        func = _import(spec, i)
        schema = tool_schema(func, spec, i)
        name = schema["function"]["name"]
        if name in tools:
            raise ConfigError(f"tools[{i}]: a second tool named '{name}'. Fix: give each tool a distinct name.")
        tools[name] = (func, schema)
    return tools


def used_tool(completion) -> bool:
    """Whether a rollout (trl's list of messages) holds a tool result, i.e. a tool call was run."""
    return isinstance(completion, list) and any(isinstance(m, dict) and m.get("role") == "tool" for m in completion)


def log_tool_use(completions, log_metric=None, **_) -> None:
    """Log the share of ``completions`` that used a tool as ``tools/used_ratio`` through trl's ``log_metric`` (the
    reward functions' hook; averaged per logging step, ``eval_`` in evaluation)."""
    if log_metric is not None and completions:
        log_metric(USED_RATIO, sum(used_tool(c) for c in completions) / len(completions))


class ToolUseMean(TrainerCallback):
    """Adds ``train_tools/used_ratio``, the mean of the logged ``tools/used_ratio`` over the run, to the trainer's
    final metrics (the end-of-training log, which is the dict ``train()`` returns)."""

    def __init__(self):
        self.values: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if isinstance(logs.get(USED_RATIO), (int, float)):
            self.values.append(float(logs[USED_RATIO]))
        if "train_runtime" in logs and self.values:
            logs[TRAIN_USED_RATIO] = sum(self.values) / len(self.values)

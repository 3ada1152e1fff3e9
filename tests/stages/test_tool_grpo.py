"""Tool-use GRPO (trl 1.16 GRPOTrainer ``tools=``, alignkit.train.tools) on the tiny Llama in Qwen2.5's chat format:
the recipe runs with the tools rendered into the prompts and logs the share of rollouts that used one; on the trained
trainer, trl's own tool loop runs a fixed completion's calls through alignkit's timed wrapper: the calculator's
result, an exception and a timeout all come back as tool messages in the rollout; bad tool entries exit 2 before the
model loads, from the recipe script and from ``alignkit grpo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, log_history, run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError

FAST = ["--disable_tqdm", "true", "--save_strategy", "no", "--gradient_checkpointing", "false"]
TOOL_GRPO = ["--config", "recipes/tiny/grpo_tools.yaml", *FAST]
TOOLS = ["alignkit.demo.tool_data:calculator", "alignkit.testing.tools:boom", "alignkit.testing.tools:stall"]


# ---------------------------------------------------------------- the calculator and the wrapper (no model)
@pytest.mark.parametrize(
    ("expression", "result"),
    [("23 + 45", "68"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("8 / 2", "4"), ("-3 ** 2", "-9"), ("17 % 5", "2")],
)
def test_calculator_evaluates_arithmetic(expression, result):
    from alignkit.demo.tool_data import calculator

    assert calculator(expression) == result


@pytest.mark.parametrize(
    ("expression", "words"),
    [("__import__('os').system('true')", "not arithmetic"), ("open('x')", "not arithmetic"), ("a + 1", "not arithmetic"),
     ("9 ** 99999", "exponent"), ("10 ** 40", "too large"), ("1 +", "cannot parse"), ("1" * 300, "at most")],
)  # fmt: skip
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, words):
    from alignkit.demo.tool_data import calculator

    with pytest.raises(ValueError, match=words):
        calculator(expression)


def test_the_calculators_schema_is_the_one_the_demo_rows_declare():
    """The model is prompted with the function's schema (its docstring and type hints); the demo's tool-call SFT rows
    declare the same one, so SFT and GRPO show the model the same tools block."""
    from transformers.utils.chat_template_utils import get_json_schema

    from alignkit.demo.tool_data import TOOLS, calculator
    from alignkit.train.tools import timed_tool

    assert get_json_schema(calculator) == TOOLS[0] == get_json_schema(timed_tool(calculator, 1.0))


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_the_wrapper_turns_exceptions_exits_and_timeouts_into_tool_errors(thread):
    """In the main thread the limit interrupts the call (SIGALRM), elsewhere the rollout stops waiting for it; a tool
    that swallows every Exception is stopped all the same. Each failure names the function."""
    from alignkit.demo.tool_data import calculator
    from alignkit.testing.tools import boom, leave, stall
    from alignkit.train.tools import ToolError, timed_tool

    outcomes = {}

    def calls():
        outcomes["ok"] = timed_tool(calculator, 1.0)(expression="2 + 3")
        for func in (boom, leave, stall):
            started = time.time()
            try:
                timed_tool(func, 0.3)(expression="x")
            except ToolError as exc:
                outcomes[func.__name__] = (str(exc), time.time() - started)

    if thread == "main":
        calls()
    else:
        worker = threading.Thread(target=calls)
        worker.start()
        worker.join(10)
    assert outcomes["ok"] == "5"
    assert outcomes["boom"][0] == "boom raised ZeroDivisionError: division by zero"
    assert outcomes["leave"][0] == "leave raised SystemExit: 3"
    assert outcomes["stall"][0] == "stall did not finish within 0.3 s and was stopped"
    assert 0.25 < outcomes["stall"][1] < 2.0


# ---------------------------------------------------------------- the recipe, and trl's tool loop on its trainer
@pytest.fixture(scope="module")
def tool_grpo_run(tmp_path_factory):
    """Two steps of ``recipes/tiny/grpo_tools.yaml`` with three tools (the calculator, one that raises, one that never
    returns), and the real GRPOTrainer the recipe trained."""
    from alignkit.train import runner

    seen, real_train = [], runner.Run.train

    def train(self, trainer, **kwargs):
        seen.append(trainer)
        return real_train(self, trainer, **kwargs)

    runner.Run.train = train
    out = tmp_path_factory.mktemp("tool_grpo") / "run"
    try:
        run_recipe(  # positions for three tools in the prompt (~1000 tiny-BPE tokens) and a rollout calling them
            "grpo", [*TOOL_GRPO, "--tools", json.dumps(TOOLS), "--tool_timeout", "0.5", "--config_overrides",
                     '{"max_position_embeddings": 2048}', "--output_dir", str(out)],
        )  # fmt: skip
    finally:
        runner.Run.train = real_train
    return out, seen[0]


def test_tool_use_grpo_trains_with_the_tools_in_every_prompt_and_logs_their_use(tool_grpo_run):
    out, trainer = tool_grpo_run
    history = [e for e in log_history(out) if "reward" in e]
    assert len(history) == 2
    for entry in history:  # trl's call counts and alignkit's share of rollouts that ran a tool, every step
        assert {"tools/call_frequency", "tools/failure_frequency", "tools/used_ratio"} <= set(entry), entry
        assert 0.0 <= entry["tools/used_ratio"] <= 1.0
    from alignkit.runs import RunRecord

    metrics = RunRecord.read(out).metrics  # the run's mean share, in its record and closing summary
    assert metrics["train_tools/used_ratio"] == pytest.approx(sum(e["tools/used_ratio"] for e in history) / 2)
    assert [t.__name__ for t in trainer.tools] == ["calculator", "boom", "stall"]
    prompt = trainer.processing_class.decode(trainer._tokenize_prompts([trainer.train_dataset[0]["prompt"]])[0][0])
    assert "<tools>" in prompt and '"name": "calculator"' in prompt and '"name": "stall"' in prompt


def test_trls_tool_loop_runs_the_calls_and_the_results_and_errors_reach_the_rollout(tool_grpo_run):
    """A fixed completion with three calls, rendered by the run's own template and parsed by trl's parser, goes
    through trl's tool loop on the trained trainer: the calculator's result, the exception and the timeout each come
    back as a tool message, their tokens are in the rollout (masked out of the loss) and the model goes on after."""
    from trl.chat_template_utils import parse_response

    _, trainer = tool_grpo_run
    tokenizer = trainer.processing_class
    prompt = list(trainer.train_dataset[0]["prompt"])
    prompt_ids = trainer._tokenize_prompts([prompt])[0]
    calls = [{"type": "function", "function": {"name": n, "arguments": {"expression": "2 + 3"}}}
             for n in ("calculator", "boom", "stall")]  # fmt: skip
    text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "", "tool_calls": calls}], tools=trainer.tools, tokenize=False
    )
    rendered_prompt = tokenizer.decode(prompt_ids[0])
    assert text.startswith(rendered_prompt)
    completion_ids = tokenizer(text[len(rendered_prompt) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
    parsed = parse_response(tokenizer, completion_ids, prefix=prompt_ids[0], tools=trainer.tools)
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["calculator", "boom", "stall"]

    trainer.max_completion_length = 512  # the rollout's budget: trl rolls back tool results that would not fit
    started = time.time()
    mask, completions, ids, _, calls_run, failures, _ = trainer._tool_call_loop(
        [prompt], prompt_ids, [list(completion_ids)], [[parsed]], None, None, {}
    )
    assert time.time() - started < 10
    assert (calls_run, failures) == (3, 2)
    results = [m for m in completions[0] if m["role"] == "tool"]
    assert [m["name"] for m in results] == ["calculator", "boom", "stall"]
    assert results[0]["content"] == "5"
    assert results[1]["content"] == "{'error': 'boom raised ZeroDivisionError: division by zero'}"
    assert results[2]["content"] == "{'error': 'stall did not finish within 0.5 s and was stopped'}"
    rollout = tokenizer.decode(ids[0])
    assert "<tool_response>\n5\n</tool_response>" in rollout and "stall did not finish" in rollout
    assert len(mask[0]) == len(ids[0]) and 0 in mask[0] and mask[0][: len(completion_ids)] == [1] * len(completion_ids)
    from alignkit.train.tools import used_tool

    assert used_tool(completions[0])


# ---------------------------------------------------------------- bad tools: exit 2 before the model loads
@pytest.mark.parametrize(
    ("tools", "words"),
    [(["no_such_module:calculator"], ["tools[0]", "could not be imported"]),
     (["alignkit.demo.tool_data:no_such_function"], ["tools[0]", "has no 'no_such_function'"]),
     (["alignkit.testing.tools:NOT_A_FUNCTION"], ["tools[0]", "is not a function but the int 42"]),
     (["alignkit.demo.tool_data"], ["tools[0]", "not an import path"]),
     (["alignkit.testing.tools:undocumented"], ["tools[0]", "cannot be described", "docstring"]),
     (["alignkit.demo.tool_data:calculator", "alignkit.demo.tool_data:calculator"], ["tools[1]", "second tool"])],
    ids=["not-importable", "missing-function", "not-callable", "no-function-named", "no-docstring", "twice"],
)  # fmt: skip
def test_bad_tools_fail_before_the_model_loads(tools, words, tmp_path):
    from alignkit.train import runner

    loads, real_load = [], runner.Run.load_model

    def load_model(self, *args, **kwargs):
        loads.append(1)
        return real_load(self, *args, **kwargs)

    runner.Run.load_model = load_model
    out = tmp_path / "out"
    try:
        with pytest.raises(ConfigError) as caught:
            run_recipe("grpo", [*TOOL_GRPO, "--tools", json.dumps(tools), "--output_dir", str(out)])
    finally:
        runner.Run.load_model = real_load
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert "Fix:" in str(caught.value) and not loads and not out.exists()


def test_a_row_declaring_a_tool_the_recipe_lacks_names_its_file_and_line(tmp_path):
    from alignkit.demo.tool_data import TOOLS, tool_grpo_rows

    rows = tool_grpo_rows(4)
    other = {"type": "function", "function": {**TOOLS[0]["function"], "name": "search"}}
    rows[2] = {**rows[2], "tools": [*TOOLS, other]}
    changed = json.loads(json.dumps(TOOLS))
    changed[0]["function"]["parameters"]["properties"]["expression"]["type"] = "integer"
    rows[3] = {**rows[3], "tools": changed}
    data = write_jsonl(tmp_path / "tool_rows.jsonl", rows)
    argv = [*TOOL_GRPO, "--datasets", str(data), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(DataError, match=r"tool_rows.jsonl, row 3: 'tools' declares 'search'"):
        run_recipe("grpo", argv)
    rows[2] = rows[1]
    write_jsonl(data, rows)
    with pytest.raises(DataError, match=r"row 4: 'tools' declares calculator with parameters \{'expression': 'integ"):
        run_recipe("grpo", argv)


def test_rows_declaring_tools_without_tools_in_the_recipe_are_refused(tmp_path):
    """trl renders GRPO prompts with the trainer's tools only: a row's tools with none named would vanish."""
    from alignkit.demo.tool_data import tool_grpo_rows

    data = write_jsonl(tmp_path / "rows.jsonl", tool_grpo_rows(2))
    argv = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--chat_template", "qwen2_5",
            "--datasets", str(data), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(DataError, match=r"rows.jsonl, row 1: 'tools' declares 'calculator'.*they are: \[\]"):
        run_recipe("grpo", argv)


def test_a_template_that_cannot_express_tools_is_refused(tmp_path):
    """ChatML (alignkit's chatml family) prints no tools and no calls: refused before the model loads, naming a
    family that renders them."""
    with pytest.raises(ConfigError, match=r"cannot express tool calls.*qwen2_5"):
        run_recipe("grpo", [*TOOL_GRPO, "--chat_template", "chatml", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["recipe", "cli"])
def test_a_bad_tool_exits_2_from_the_recipe_script_and_alignkit_grpo(entry, tmp_path):
    """``python recipes/grpo.py`` (what ``accelerate launch`` runs) and ``alignkit grpo``: one line naming the entry and
    the fix, exit 2, no traceback, nothing written."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    command = ["recipes/grpo.py"] if entry == "recipe" else ["-m", "alignkit.cli", "grpo"]
    done = subprocess.run(
        [sys.executable, *command, *TOOL_GRPO, "--tools", '["alignkit.demo.tool_data:nope"]',
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "tools[0]: module 'alignkit.demo.tool_data' has no 'nope'" in done.stderr and "Fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_demos_tool_evaluation_runs_on_the_trained_output(tool_grpo_run, tmp_path):
    """Wiring of the methods table's tool-use evaluation (alignkit.demo.tool_eval) on the tiny run's output: the
    saved template renders the calculator, replies are parsed, every question is scored and written out."""
    from alignkit.demo.data import make_rows
    from alignkit.demo.tool_eval import evaluate_with_tools

    out, _ = tool_grpo_run
    rows = make_rows(n_train=4, n_eval=2, n_dpo_test=2)["eval"]
    result = evaluate_with_tools(out, rows, tmp_path / "eval.jsonl", max_new_tokens=4)
    assert set(result) == {"format", "exact", "tool_use", "seconds"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("format", "exact", "tool_use"))
    scored = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in scored] == [r["answer"] for r in rows]
    assert all(s["rollout"][0]["role"] == "assistant" for s in scored)

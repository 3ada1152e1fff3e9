"""`alignkit serve` (issue 40): an OpenAI-compatible server on loopback, driven by the official `openai` client. On
the tiny Llama (ChatML, stops on <|im_end|>): a chat completion and a streamed one whose text equals
`alignkit chat`'s greedy reply for the same prompt (the same template, the same stop ids), /v1/models, and the
refusals (a port in use, a folder without a model). On a tool-use model (a tiny Llama trained by alignkit's SFT in
Qwen2.5's format on the demo's tool-call row): the call comes back as `tool_calls` with
`finish_reason="tool_calls"`, in one piece and streamed, equal to the call the model was trained to make and to
`alignkit chat --tools`'s greedy reply read with the same parser."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import REPO, run_recipe, write_jsonl

from alignkit.demo import tool_data

pytestmark = pytest.mark.filterwarnings("ignore")
openai = pytest.importorskip("openai")  # alignkit[serve]; a missing server dependency is tested below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(target):
    """(server handle, client, /v1/models, port) of ``alignkit serve target`` on a free loopback port, once it
    answers."""
    from alignkit.export.serve import serve

    port = _free_port()
    handle = serve(target, port=port, blocking=False)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            return handle, client, client.models.list(), port
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def served(tiny_llama):
    handle, client, models, port = _start(tiny_llama)
    yield client, models, port
    handle.kill_server()


def test_replies_equal_alignkit_chats_and_streaming_gives_the_same_text(served, tiny_llama):
    from alignkit.export.generate import generate_replies, load_for_generation

    client, models, _ = served
    assert any(str(tiny_llama) in m.id for m in models.data), [m.id for m in models.data]
    messages = [{"role": "user", "content": "What is 23 + 19?"}]
    model, tokenizer = load_for_generation(tiny_llama)
    want = generate_replies(model, tokenizer, [messages], max_new_tokens=24)[0]
    reply = client.chat.completions.create(
        model=str(tiny_llama), messages=messages, temperature=0, max_tokens=24, seed=0
    )  # fmt: skip
    assert reply.choices[0].message.content == want and want
    stream = client.chat.completions.create(
        model=str(tiny_llama), messages=messages, temperature=0, max_tokens=24, seed=0, stream=True
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_a_port_in_use_and_a_folder_without_a_model_are_one_line_exit_2(served, tmp_path):
    import subprocess
    import sys

    _, _, port = served
    for argv, says in (
        ([str(tmp_path), "--port", str(_free_port())], "has no model"),
        ([str(tmp_path), "--port", str(port)], "cannot listen on 127.0.0.1"),
    ):
        done = subprocess.run([sys.executable, "-m", "alignkit.cli", "serve", *argv], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit:")]
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- tool calls (a tool-use model in Qwen2.5's format)
TOOLS = tool_data.TOOLS  # the demo's calculator schema, as its tool-use SFT rows declare it
QUESTION = tool_data.prompt(23, 19)  # the demo's system prompt and question
CALL = {"name": "calculator", "arguments": {"expression": "23 + 19"}}


@pytest.fixture(scope="module")
def tool_served(tmp_path_factory):
    """(client, model id) of ``alignkit serve`` on a tool-use model: a tiny random Llama body with SmolLM2's
    tokenizer (compact JSON tokens; the tiny tokenizers spell ``<tool_call>`` in 9 pieces), trained by alignkit's SFT
    in Qwen2.5's stock format (trl's template, the tool-call tests' family) on the demo's tool-call row for 23 + 19
    (``alignkit.demo.tool_data.call``, arguments as OpenAI's JSON string) until it makes that call: full fine-tuning
    (LoRA on a random tiny body barely moves the loss in seconds), 60 steps. Its greedy call's smallest top-2 logit
    margin is 5.0 (4.7 trained and run with AVX2 only), far above rounding: the same call on every CPU."""
    from alignkit.testing.tiny import tiny_llama_with_smollm2_tokenizer

    root = tmp_path_factory.mktemp("tool_use")
    tiny_llama_with_smollm2_tokenizer(root / "base", max_position_embeddings=1024)
    row = {"messages": [*QUESTION, tool_data.call(23, 19)], "tools": TOOLS}
    data = write_jsonl(root / "tool_sft.jsonl", [row] * 4)
    argv = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(root / "base"), "--chat_template",
            "qwen2_5", "--use_peft", "false", "--load_in_4bit", "false", "--datasets", str(data), "--test_size", "0",
            "--max_length", "512", "--per_device_train_batch_size", "1", "--max_steps", "60", "--learning_rate",
            "1e-2", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(root / "sft")]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        run_recipe("sft", argv)
    handle, client, models, _ = _start(root / "sft")
    (model,) = models.data
    yield client, model.id
    handle.kill_server()


def test_a_tool_call_comes_back_as_tool_calls_equal_to_alignkit_chats(tool_served, tmp_path, monkeypatch, capsys):
    """`alignkit chat --tools` (greedy, piped: one line per reply) makes the trained call; read with the family's
    parser it equals the server's `tool_calls`, in one piece and streamed."""
    import io

    from transformers import AutoTokenizer

    from alignkit.cli import main
    from alignkit.data.tools import set_response_parser

    client, model_id = tool_served
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION[1]["content"] + "\n"))  # piped: one reply line
    capsys.readouterr()
    system = ["--system", QUESTION[0]["content"]]
    assert main(["chat", model_id, *system, "--tools", str(tools), "--max_new_tokens", "80"]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    assert set_response_parser(tokenizer)  # the family's parser, the one the server reads replies with
    prompt = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    want = tokenizer.parse_response(said, prefix=prompt)  # the prompt, as the server passes it
    assert want["tool_calls"] == [{"type": "function", "function": CALL}], said  # the call it was trained to make

    reply = client.chat.completions.create(
        model=model_id, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80, seed=0
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]
    assert (choice.message.content or "") == (want.get("content") or "")

    stream = client.chat.completions.create(
        model=model_id, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80, seed=0, stream=True
    )  # fmt: skip
    names, arguments, content, finish = {}, {}, "", []
    for chunk in stream:
        for streamed in chunk.choices:
            content += streamed.delta.content or ""
            finish += [streamed.finish_reason] if streamed.finish_reason else []
            for delta in streamed.delta.tool_calls or []:
                names[delta.index] = names.get(delta.index, "") + (delta.function.name or "")
                arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
    assert finish == ["tool_calls"] and names == {0: CALL["name"]}
    assert json.loads(arguments[0]) == CALL["arguments"] and content == (want.get("content") or "")


@pytest.mark.parametrize(
    ("text", "says"),
    [(None, "file not found"), ("[{", "not valid JSON"), ('{"name": "add"}', "not a list of function schemas"),
     ('[{"type": "function", "function": {}}]', "tools[0] has no function name")],
)  # fmt: skip
def test_a_bad_tools_file_is_one_line_exit_2_before_the_model_loads(text, says, tmp_path, capsys):
    """`alignkit chat --tools`: the file is read before the model (here: none) would load."""
    from alignkit.cli import main

    tools = tmp_path / "tools.json"
    if text is not None:
        tools.write_text(text)
    assert main(["chat", str(tmp_path / "no-model"), "--tools", str(tools)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit:")]
    assert len(lines) == 1 and str(tools) in lines[0] and says in lines[0], lines


@pytest.mark.llamacpp  # needs `alignkit fetch llama-cpp` (not in install.sh)
def test_a_gguf_served_by_llama_cpp_returns_the_tool_call_as_text(tool_served, tmp_path):
    """llama-cpp-python 0.3.36's server renders the tools with the template embedded in the GGUF, but does not parse
    the model's own tool-call text (docs/serving.md): the call comes back as `message.content` with
    finish_reason "stop"; read with the family's parser, it is the call the model was trained to make."""
    from transformers import AutoTokenizer

    from alignkit.data.tools import set_response_parser
    from alignkit.export.gguf import export_gguf

    _, folder = tool_served
    path, _ = export_gguf(folder, "f32", out=tmp_path / "tool-f32.gguf", gate=False)
    handle, client, models, _ = _start(path)
    try:
        reply = client.chat.completions.create(
            model=path.name, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80, seed=0
        )  # fmt: skip
    finally:
        handle.kill_server()
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert set_response_parser(tokenizer)
    prompt = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    parsed = tokenizer.parse_response(choice.message.content, prefix=prompt)
    assert parsed["tool_calls"] == [{"type": "function", "function": CALL}], choice.message.content

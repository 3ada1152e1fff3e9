"""`alignkit serve` (issue 40): an OpenAI-compatible server on loopback, driven by the official `openai` client. On
the tiny Llama (ChatML, stops on <|im_end|>): a chat completion and a streamed one whose text equals
`alignkit chat`'s greedy reply for the same prompt (the same template, the same stop ids), /v1/models, and the
refusals (a port in use, a folder without a model)."""

from __future__ import annotations

import socket
import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
openai = pytest.importorskip("openai")  # alignkit[serve]; a missing server dependency is tested below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_llama):
    from alignkit.export.serve import serve

    port = _free_port()
    handle = serve(tiny_llama, port=port, blocking=False)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            models = client.models.list()
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
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

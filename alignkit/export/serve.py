"""``alignkit serve RUN_OR_MODEL``: an OpenAI-compatible HTTP server (``/v1/chat/completions`` with streaming and
tools, ``/v1/models``) for what a run produced, built on existing servers rather than a hand-written HTTP stack:

- a merged or full model folder (an adapter run is merged first into ``<run>-merged``, as ``alignkit export``
  does): transformers' own server (``transformers serve``, FastAPI + uvicorn) with that folder forced as its one
  model. It renders with the folder's chat template (the family's stock text the run saved) and stops on the
  folder's ``generation_config.eos_token_id``, which alignkit's merge writes from
  :func:`alignkit.data.templates.end_of_turn_ids`; a folder whose generation config does not stop on every
  end-of-turn id is refused with the fix, so a served reply never runs past the turn;
- a ``.gguf``: llama-cpp-python's server (llama.cpp itself), which renders with the template embedded in the file
  and stops on llama.cpp's end-of-generation tokens.

For GPUs, ``vllm serve <merged folder>`` reads the same files (docs/serving.md).
"""

from __future__ import annotations

import socket
from pathlib import Path

from alignkit.errors import ConfigError, PreflightError


def check_port(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}). Fix: choose another --port, or stop "
                "what is listening there."
            ) from None


def servable_folder(target: str | Path) -> Path:
    """The model folder to serve for ``target``: a merged/full model folder as it is, an adapter run's merge
    (made once). ConfigError for a folder without a model, or whose generation config would not stop at the end of
    a turn."""
    import json

    from alignkit.data.templates import end_of_turn_ids
    from alignkit.export.gguf import merged_folder

    folder = Path(target)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder or .gguf file. Fix: give a run folder, a merged model or a .gguf.")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ConfigError(
            f"{folder}: has no model (neither config.json nor adapter_config.json). Fix: give the run's output_dir "
            "after training finished, its merged folder, or a .gguf file."
        )
    from alignkit.export.generate import check_generates

    check_generates(folder, "serve")  # a reward model or task head: before it is merged for nothing
    folder = merged_folder(folder)
    from transformers import AutoTokenizer

    stops = end_of_turn_ids(AutoTokenizer.from_pretrained(folder))
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    eos = set(eos if isinstance(eos, list) else [eos])
    if not set(stops) <= eos:
        raise ConfigError(
            f"{gen}: eos_token_id {sorted(i for i in eos if i is not None)} does not hold every end-of-turn id "
            f"{stops}, so served replies would run past the turn. Fix: serve the run (alignkit merges it and writes "
            "them), or merge it again with alignkit merge."
        )
    return folder


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8000, seed: int | None = None,
          blocking: bool = True):  # fmt: skip
    """Serve ``target`` (see the module docstring) on ``host:port``. ``blocking=False`` starts the server in a
    thread and returns an object whose ``kill_server()`` stops it (tests). Raises ConfigError (port in use, no
    model), PreflightError (a missing server dependency or llama.cpp build)."""
    check_port(host, port)
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{path}: no such file. Fix: give the path alignkit export gguf printed.")
        return _serve_gguf(path, host, port, blocking)
    folder = servable_folder(path)
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise PreflightError(
            "transformers' server needs fastapi, uvicorn, pydantic and openai. Fix: pip install 'alignkit[serve]' "
            "(scripts/install.sh installs them)."
        )
    if seed is not None:
        from transformers.cli.serving.utils import set_torch_seed

        set_torch_seed(seed)
    app, tools = _transformers_app(folder)
    print(f"alignkit serve: {folder} on http://{host}:{port}/v1 (model id: {folder}; {tools})", flush=True)
    return _run(app, host, port, blocking)


def _transformers_app(folder: Path):
    """(app, what it does with tool calls): transformers' server app (``transformers serve``'s handlers, put together
    as its ``Serve`` does) with ``folder`` as its one, preloaded model on the CPU in float32, and ``/v1/models``
    listing that model (transformers lists the Hub cache there instead).

    Tool calls: transformers' server parses a reply with the tokenizer's ``response_template``, else with a parser
    it keys on ``config.model_type`` (Qwen models only). A model trained in a family's format whose architecture is
    another (SmolLM2, a Llama, in Qwen2.5's format) would stream its ``<tool_call>`` block as plain text, so the
    loaded tokenizer is given its template's parser (:func:`alignkit.data.tools.set_response_parser`, trl's, the one
    tool-use GRPO reads rollouts with): a reply that calls a tool comes back as ``message.tool_calls`` with
    ``finish_reason="tool_calls"``, in one piece or streamed."""
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    from alignkit.data.chat_families import identify
    from alignkit.data.tools import set_response_parser

    manager = ModelManager(device="cpu", dtype="float32", force_model=str(folder))
    (loaded,) = manager.loaded_models.values()
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    family = identify(tokenizer.chat_template)
    template = f"the {family} template" if family else "this chat template"
    if set_response_parser(tokenizer):
        tools = f"tool calls read with {template}'s response parser"
    else:
        tools = f"no response parser for {template}: tool calls stay in the reply text"
    state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    app = build_server(
        manager, ChatCompletionHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state, chat_template_kwargs={},
                                           decision_config=None),
        generation_state=state,
    )  # fmt: skip
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/models"]

    def list_models():
        return JSONResponse({"object": "list", "data": [{"id": str(folder), "object": "model", "owned_by": "alignkit",
                                                          "created": int(folder.stat().st_mtime)}]})  # fmt: skip

    app.add_api_route("/v1/models", list_models, methods=["GET"])
    return app, tools


def _run(app, host: str, port: int, blocking: bool):
    """Run the ASGI ``app`` with uvicorn; ``blocking=False``: in a thread, returning a handle whose
    ``kill_server()`` stops it."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if blocking:
        server.run()
        return server
    thread = threading.Thread(target=server.run, name="alignkit-serve", daemon=True)
    thread.start()

    class Handle:
        def kill_server(self):
            server.should_exit = True
            thread.join(timeout=10)

    return Handle()


def _serve_gguf(path: Path, host: str, port: int, blocking: bool):
    """llama-cpp-python's OpenAI-compatible server on one GGUF: the chat template embedded in it (forced: not a
    format llama-cpp-python guesses from it), llama.cpp's end-of-generation tokens, which must hold the trained stop
    tokens (:func:`alignkit.export.llamacpp.trained_stop_ids`), and no repeat penalty unless a request asks for one
    (:class:`_NoRepeatPenaltyByDefault`), so ``temperature=0`` gives llama.cpp's greedy reply."""
    import os

    from alignkit.export.llamacpp import require, trained_stop_ids

    require()
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise PreflightError(
            f"llama-cpp-python's server cannot be imported ({exc}). Fix: pip install 'alignkit[serve]'."
        ) from None
    stops = trained_stop_ids(path)  # ConfigError when llama.cpp would not stop on one of them
    settings = ModelSettings(
        model=str(path), model_alias=path.name, chat_format="chat_template.default", n_ctx=4096, verbose=False,
        n_threads=os.cpu_count() or 1,
    )  # fmt: skip
    app = create_app(server_settings=ServerSettings(host=host, port=port), model_settings=[settings])
    print(f"alignkit serve: {path} on http://{host}:{port}/v1 (model id: {path.name}; llama.cpp, the embedded chat "
          f"template, stop ids {stops})", flush=True)  # fmt: skip
    return _run(_NoRepeatPenaltyByDefault(app), host, port, blocking)


class _NoRepeatPenaltyByDefault:
    """ASGI wrapper around llama-cpp-python's server: a completion request that does not set llama.cpp's
    ``repeat_penalty`` gets 1.0 (none). llama-cpp-python defaults it to 1.1, which OpenAI clients cannot see or
    send (it is not an OpenAI parameter) and which makes a ``temperature=0`` reply differ from the greedy reply that
    ``alignkit chat``, transformers' server and the export gate give. A request may still set it (``extra_body``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        import json

        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # the server answers a malformed body itself
        if isinstance(request, dict) and "repeat_penalty" not in request:
            body = json.dumps({**request, "repeat_penalty": 1.0}).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

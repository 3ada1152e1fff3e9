"""Without the offline switches (HF_HUB_OFFLINE etc.), a run still sends nothing to the Hub by default: no trl /
huggingface_hub telemetry, no sentence-transformers base-model lookup for its card. The Hub is a local server that
records every request."""

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recording_hub():
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self):
            requests.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD = do_POST = _record

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


@pytest.mark.parametrize("recipe", ["sft", "embed"])
def test_a_run_sends_nothing_to_the_hub_by_default(recipe, recording_hub, tmp_path):
    endpoint, requests = recording_hub
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}  # fmt: skip
    env["HF_ENDPOINT"] = endpoint
    done = subprocess.run(
        [sys.executable, f"recipes/{recipe}.py", "--config", f"recipes/tiny/{recipe}.yaml", "--max_steps", "1",
         "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert requests == []

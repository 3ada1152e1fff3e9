"""A Hub that does not answer turns the process offline (alignkit.hub): a Hub id in the local cache loads from it at
once, with no retry warnings from huggingface_hub, and a Hub dataset id is refused naming why. The Hub here is a
closed port on 127.0.0.1; the cache is a temporary HF_HOME laid out as huggingface_hub lays out a download."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config.args import DataArguments
from alignkit.data.sources import load_datasets
from alignkit.errors import DataError
from alignkit.testing.tiny import tiny_model_path

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _cache_tiny_llama(hf_home: Path, repo: str = "acme/tiny-llama") -> None:
    """The tiny Llama as if ``hf download`` had fetched ``repo``: blobs named by snapshot, refs/main -> the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tiny_model_path("llama"), folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_a_cached_hub_model_trains_at_once_when_the_hub_does_not_answer(tmp_path):
    _cache_tiny_llama(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    done = subprocess.run(
        [sys.executable, "recipes/sft.py", "--config", "recipes/tiny/sft.yaml", "--model_name_or_path",
         "acme/tiny-llama", "--tokenizer_name_or_path", "acme/tiny-llama", "--max_steps", "1", "--save_steps", "50",
         "--output_dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Retrying" not in output and "Connection refused' thrown while requesting" not in output, output[-3000:]
    assert output.count("The Hugging Face Hub cannot be reached (127.0.0.1:") == 1, output[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """This process, online as far as the Hugging Face libraries know, with a Hub that does not answer; every flag
    alignkit.hub may set is restored afterwards."""
    import datasets.config
    from huggingface_hub import constants

    from alignkit import hub

    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_offline_because", None)
    return datasets.config


def test_a_hub_dataset_id_with_the_hub_unreachable_is_refused_naming_why(unreachable_hub):
    with pytest.raises(DataError, match=r"the Hub cannot be reached: 127\.0\.0\.1:\d+ does not answer"):
        load_datasets(DataArguments(datasets=["someone/some-dataset"]))
    assert unreachable_hub.HF_HUB_OFFLINE is True  # datasets, imported before, was switched offline too
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and so are child processes


def test_a_push_with_the_hub_unreachable_is_refused_at_once_naming_why(unreachable_hub):
    from alignkit.errors import PreflightError
    from alignkit.export.hub import preflight_push

    with pytest.raises(PreflightError, match=r"could not be reached \(offline: 127\.0\.0\.1:\d+ does not answer"):
        preflight_push("org/tiny", token="hf_aTokenThatIsNeverSent")

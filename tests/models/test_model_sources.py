"""A model name that is evidently a local path is never sent to the Hub, and a Hub id the Hub cannot serve (offline,
not cached) fails at once: huggingface_hub would otherwise retry it 5 times with backoff (~25-50 s of warnings) before
the error. Every entry point that takes a model name resolves it here (alignkit.models.sources): training, eval,
generate, chat, the teacher and the tokenizer keys."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import huggingface_hub.constants
import pytest
from conftest import REPO

from alignkit.config.args import ModelArguments
from alignkit.errors import ConfigError
from alignkit.models.sources import check_hub_name, resolve_source
from alignkit.models.tokenizer import load_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: these names must be judged without one."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    "name, why",
    [
        ("outputs/nonexist", "because 'outputs' is a folder here"),
        ("./outputs/nonexist", "does not exist"),
        ("../no-such-alignkit-model", "does not exist"),
        ("~/no-such-alignkit-model", "does not exist"),
        ("a/b/c", "does not exist"),
    ],
)
def test_an_evidently_local_name_that_does_not_exist_is_refused_at_once(name, why, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match=rf"model_name_or_path: '{name}' does not exist\. Fix: check the path") as e:
        resolve_source(ModelArguments(model_name_or_path=name))
    assert why in str(e.value)


def test_a_hub_id_offline_and_not_cached_is_refused_at_once(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)  # no folder 'foo' here: 'foo/nonexist' is a Hub id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(ConfigError, match=r"'foo/nonexist' is not a folder here.*HF_HUB_OFFLINE is set.*Fix"):
        resolve_source(ModelArguments(model_name_or_path="foo/nonexist"))
    with pytest.raises(ConfigError, match=r"^tokenizer_name_or_path: 'foo/nonexist'"):
        load_tokenizer(ModelArguments(model_name_or_path="tiny:llama", tokenizer_name_or_path="foo/nonexist"))
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match=r"^tokenizer_name_or_path: 'outputs/x' does not exist"):
        check_hub_name("outputs/x", "tokenizer_name_or_path")


def test_eval_of_a_mistyped_output_path_names_it_without_hub_retries(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    argv = [sys.executable, "-m", "alignkit.cli", "eval", "outputs/nonexist", "--data", "d.jsonl"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "'outputs/nonexist' does not exist" in done.stderr and "Traceback" not in done.stderr
    assert "Retry" not in done.stderr and "huggingface.co" not in done.stderr


@pytest.mark.parametrize("name", ["outputs/nonexist", "foo/nonexist"])
def test_merge_and_export_name_a_missing_folder(name, tmp_path, monkeypatch, no_network):
    """merge and export read local folders only: a missing one is named as missing, not as 'not an adapter output'."""
    from alignkit.export.gguf import merged_folder
    from alignkit.export.merge import merge_adapter

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ConfigError, match=rf"^{name}: does not exist\. Fix: .*merge reads no Hub id"):
        merge_adapter(name)
    with pytest.raises(ConfigError, match=rf"^{name}: does not exist\. Fix: .*export reads no Hub id"):
        merged_folder(name)


def test_a_cached_hub_id_offline_is_left_to_transformers(tmp_path, monkeypatch, no_network):
    """The refusal is only for a Hub id that cannot load: one in the Hugging Face cache loads offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    snapshot = cache / "models--foo--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--foo--cached" / "refs").mkdir()
    (cache / "models--foo--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_source(ModelArguments(model_name_or_path="foo/cached")).base == "foo/cached"
    with pytest.raises(ConfigError, match="the Hub cannot be reached"):
        resolve_source(ModelArguments(model_name_or_path="foo/uncached"))

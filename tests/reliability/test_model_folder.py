"""The two crashes of issue 37, through the command line: exit 2 and one line naming the cause, no traceback.

- An empty or incomplete model folder (an interrupted download): the folder and the files it lacks, through every
  entry point that loads a model (a training stage, merge, chat, generate, export).
- DPO rows whose prompt is text and whose replies are chat messages (trl raised ``TypeError: can only concatenate``
  after the model loaded): the file, the row and the fix, before the model loads. (A message prompt with text
  replies is converted instead: tests/stages/test_trainer_assumptions.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_DATA, write_jsonl

from alignkit.models.sources import missing_model_files
from alignkit.testing.tiny import tiny_model_path


def _alignkit(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "alignkit.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _one_line(done: subprocess.CompletedProcess) -> str:
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit:")]
    assert len(lines) == 1, said[-3000:]
    return lines[0]


def _alignkit_in_process(capfd, *argv: str) -> subprocess.CompletedProcess:
    """``alignkit <argv>`` through the same ``alignkit.cli.main`` in this process (the console script's entry; each
    command also runs as a subprocess in tests/reliability/test_reliability_table.py, and ``alignkit dpo`` below)."""
    from alignkit.cli import main

    capfd.readouterr()
    code = main(list(argv))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["alignkit", *argv], code, out, err)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    (root / "empty").mkdir()
    partial = root / "partial"  # the download stopped before the weights
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path("llama") / name, partial / name)
    sharded = root / "sharded"  # an index whose second shard never arrived
    shutil.copytree(tiny_model_path("llama"), sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    pickled = root / "pickled"  # a folder saved with safe_serialization=False: pytorch_model.bin only
    shutil.copytree(tiny_model_path("llama"), pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # never loaded: the name is what counts
    return root


def test_missing_model_files_names_what_a_folder_lacks(folders):
    assert missing_model_files(folders / "empty") == [
        "config.json",
        "model.safetensors (the weights)",
        "a tokenizer (tokenizer.json or tokenizer.model)",
    ]
    assert missing_model_files(folders / "partial") == ["model.safetensors (the weights)"]
    assert missing_model_files(folders / "sharded") == ["model-00002-of-00002.safetensors"]
    assert missing_model_files(tiny_model_path("llama")) == []


@pytest.mark.parametrize(
    "argv, folder, words",
    [
        (["sft", "--datasets", str(TINY_DATA / "sft.jsonl"), "--model_name_or_path"], "empty", ["is empty", "config.json"]),
        (["dpo", "--datasets", str(TINY_DATA / "dpo.jsonl"), "--model_name_or_path"], "partial", ["incomplete", "model.safetensors"]),
        (["grpo", "--datasets", str(TINY_DATA / "grpo.jsonl"), "--reward_funcs", "[format]", "--model_name_or_path"], "sharded",
         ["incomplete", "model-00002-of-00002.safetensors"]),
        (["chat"], "partial", ["incomplete", "model.safetensors"]),
        (["generate", "--prompts", str(TINY_DATA / "sft.jsonl"), "--out", "/dev/null"], "empty", ["config.json"]),
        (["eval", "--data", str(TINY_DATA / "sft.jsonl")], "sharded", ["model-00002-of-00002.safetensors"]),
        (["export", "gguf"], "empty", ["is empty", "config.json"]),
        (["merge"], "empty", ["adapter_config.json", "empty"]),
    ],
)  # fmt: skip
def test_an_empty_or_incomplete_model_folder_exits_2_with_one_line(argv, folder, words, folders, tmp_path, capfd):
    path = str(folders / folder)
    if argv[0] == "eval":
        argv = ["eval", path, *argv[1:], "--out", str(tmp_path / "eval")]
    elif argv[0] in ("sft", "dpo", "grpo"):
        argv = [*argv, path, "--output_dir", str(tmp_path / "out")]
    elif argv[0] == "generate":  # prompts are read first: give it good ones
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?"}])
        argv = ["generate", path, "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl")]
    else:
        argv = [*argv, path]
    line = _one_line(_alignkit_in_process(capfd, *argv))
    assert path in line and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [["sft", "--datasets", str(TINY_DATA / "sft.jsonl"), "--model_name_or_path"], ["chat"], ["export", "gguf"]],
)
def test_a_pickle_only_model_folder_is_named_as_such_by_every_command(argv, folders, tmp_path, capfd):
    """Training refused a .bin-only folder as pickle weights; chat, eval, generate and export called it "missing (a
    half-written model folder)" and said to write it again. Both now say what it is and to convert it."""
    path = str(folders / "pickled")
    argv = [*argv, path, "--output_dir", str(tmp_path / "out")] if argv[0] == "sft" else [*argv, path]
    line = _one_line(_alignkit_in_process(capfd, *argv))
    assert path in line and "only pickle weights" in line and "half-written" not in line, line


def test_a_text_prompt_with_message_replies_exits_2_naming_the_row(tmp_path):
    rows = [{"prompt": f"Say {w}.", "chosen": [{"role": "assistant", "content": w}],
             "rejected": [{"role": "assistant", "content": "no"}]} for w in ("yes", "hi")]  # fmt: skip
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    line = _one_line(_alignkit("dpo", "--model_name_or_path", "tiny:llama", "--datasets", str(path),
                               "--output_dir", str(tmp_path / "out")))  # fmt: skip
    assert f"{path}, row 1" in line and "chosen/rejected are chat messages but prompt is text" in line, line
    assert not (tmp_path / "out").exists()

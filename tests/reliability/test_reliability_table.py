"""Issue 43's table: damaged or surprising folders, output paths and data through every entry point that reads or
writes them (`alignkit merge | export | chat | generate | eval | report | <stage>`). Each case asserts exit 2, one
`alignkit:` line naming the file (or key) with a fix, no traceback, and every input folder byte-identical afterwards.

Only the command line's entry points are used, so the same table runs against any checkout
(``PYTHONPATH=<checkout>``): that is how the before/after counts in the issue's closing note were taken. The first case
of each entry point runs as a subprocess (``python -m alignkit.cli``, ``python recipes/embed.py``); the others call
the same entry (``alignkit.cli.main``, the recipe's main under ``run_cli``) in this process, output captured at the
file descriptors (a subprocess costs ~6 s of imports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SFT_3_STEPS

REPO = Path(__file__).resolve().parents[2]
TRAIN = SFT_3_STEPS  # the session's shared run (conftest.sft_3_steps): checkpoint-1..3 and the adapter


def cli(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    """``alignkit <argv>``, or ``python recipes/<stage>.py`` when argv starts with that script (the recipe entry)."""
    head = [sys.executable] if str(argv[0]).startswith("recipes/") else [sys.executable, "-m", "alignkit.cli"]
    return subprocess.run([*head, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=600)


def cli_in_process(capfd, *argv) -> subprocess.CompletedProcess:
    """What :func:`cli` runs, through the same entry point in this process."""
    argv = [str(a) for a in argv]
    capfd.readouterr()
    if argv[0].startswith("recipes/"):
        import runpy

        from alignkit.errors import run_cli

        main = runpy.run_path(str(REPO / argv[0]), run_name="alignkit_recipe")["main"]
        try:
            code = run_cli(main, argv[1:])
        except SystemExit as exited:
            code = exited.code
    else:
        from alignkit.cli import main

        code = main(argv)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, sft_3_steps, sft_3_steps_merged) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("table")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    (root / "held_out.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 2?"},
                                                                  {"role": "assistant", "content": "4"}]}) + "\n")  # fmt: skip
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"anchor": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(8))
    )
    (root / "kto.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a", "label": True}) + "\n"
                                            for i in range(8)))  # fmt: skip
    return {"run": sft_3_steps, "merged": sft_3_steps_merged, "root": root}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def flip(path: Path) -> None:  # one bit mid-file: size and header intact; only the manifest's sha256 tells
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@dataclass
class Case:
    name: str
    entry: str  # the entry point (the CLI command)
    folders: tuple[str, ...]  # copied from the built ones, damaged, and checked byte-identical afterwards
    damage: Callable[[dict[str, Path]], None]
    argv: Callable[[dict[str, Path]], list]
    words: tuple[str, ...]  # what the one alignkit: line must say


def nothing(f):
    pass


CASES = [
    Case("merge-truncated-adapter", "merge", ("run",), lambda f: truncate(f["run"] / "adapter_model.safetensors"),
         lambda f: ["merge", f["run"], "--output", f["tmp"] / "m"], ("adapter_model.safetensors", "Fix:")),
    Case("merge-garbled-run-record", "merge", ("run",), lambda f: garble(f["run"] / "alignkit_run.json"),
         lambda f: ["merge", f["run"], "--output", f["tmp"] / "m"], ("alignkit_run.json", "Fix:")),
    Case("merge-output-is-a-file", "merge", ("run",), lambda f: (f["tmp"] / "x").write_text("mine"),
         lambda f: ["merge", f["run"], "--output", f["tmp"] / "x"], ("is an existing file", "Fix:")),
    Case("merge-output-is-the-input", "merge", ("run",), nothing,
         lambda f: ["merge", f["run"], "--output", f["run"]], ("input folder", "Fix:")),
    Case("export-half-written-merge", "export", ("merged",), lambda f: (f["merged"] / "model.safetensors").unlink(),
         lambda f: ["export", "gguf", f["merged"]], ("model.safetensors", "Fix:")),
    Case("export-out-overwrites-the-weights", "export", ("merged",), nothing,
         lambda f: ["export", "gguf", f["merged"], "--out", f["merged"] / "model.safetensors"],
         ("model.safetensors", "input folder", "Fix:")),
    Case("chat-not-a-model-folder", "chat", (), lambda f: (f["tmp"] / "notes").mkdir() or (f["tmp"] / "notes" / "a.txt").write_text("x"),
         lambda f: ["chat", f["tmp"] / "notes"], ("config.json", "Fix:")),
    Case("chat-truncated-merged-weights", "chat", ("merged",), lambda f: truncate(f["merged"] / "model.safetensors"),
         lambda f: ["chat", f["merged"]], ("model.safetensors", "Fix:")),
    Case("generate-garbled-adapter", "generate", ("run",), lambda f: garble(f["run"] / "adapter_model.safetensors"),
         lambda f: ["generate", f["run"], "--prompts", f["root"] / "prompts.jsonl", "--out", f["tmp"] / "o.jsonl"],
         ("adapter_model.safetensors", "Fix:")),
    Case("eval-out-is-a-file", "eval", ("run",), lambda f: (f["tmp"] / "x").write_text("mine"),
         lambda f: ["eval", f["run"], "--data", f["root"] / "held_out.jsonl", "--out", f["tmp"] / "x"],
         ("--out", "is an existing file", "Fix:")),
    Case("eval-truncated-tokenizer", "eval", ("run",), lambda f: truncate(f["run"] / "tokenizer.json"),
         lambda f: ["eval", f["run"], "--data", f["root"] / "held_out.jsonl", "--out", f["tmp"] / "e"],
         ("tokenizer.json", "Fix:")),
    Case("report-garbled-trainer-state", "report", ("run",), lambda f: garble(f["run"] / "trainer_state.json"),
         lambda f: ["report", f["run"], "--out", f["tmp"] / "r"], ("trainer_state.json", "Fix:")),
    Case("report-out-is-a-file", "report", ("run",), lambda f: (f["tmp"] / "x").write_text("mine"),
         lambda f: ["report", f["run"], "--out", f["tmp"] / "x"], ("is an existing file", "Fix:")),
    Case("resume-garbled-optimizer", "sft", ("run",), lambda f: garble(f["run"] / "checkpoint-3" / "optimizer.pt"),
         lambda f: ["sft", *TRAIN, "--output_dir", f["run"], "--resume_from_checkpoint", "true"],
         ("checkpoint-3/optimizer.pt", "checkpoint-2", "Fix:")),
    Case("resume-truncated-trainer-state", "sft", ("run",),
         lambda f: truncate(f["run"] / "checkpoint-3" / "trainer_state.json"),
         lambda f: ["sft", *TRAIN, "--output_dir", f["run"], "--resume_from_checkpoint", "true"],
         ("checkpoint-3/trainer_state.json", "Fix:")),
    Case("resume-bit-flipped-adapter", "sft", ("run",), lambda f: flip(f["run"] / "checkpoint-3" / "adapter_model.safetensors"),
         lambda f: ["sft", *TRAIN, "--output_dir", f["run"], "--resume_from_checkpoint", "true"],
         ("checkpoint-3/adapter_model.safetensors", "sha256", "checkpoint-2", "Fix:")),
    Case("merge-checkpoint-bit-flipped-adapter", "merge", ("run",),
         lambda f: flip(f["run"] / "checkpoint-2" / "adapter_model.safetensors"),
         lambda f: ["merge", f["run"] / "checkpoint-2", "--output", f["tmp"] / "m"],
         ("checkpoint-2/adapter_model.safetensors", "sha256", "Fix:")),
    Case("kto-only-desirable-rows", "kto", (), nothing,
         lambda f: ["kto", "--config", "recipes/tiny/kto.yaml", "--model_name_or_path", "tiny:llama", "--datasets",
                    f["root"] / "kto.jsonl", "--test_size", "0", "--output_dir", f["tmp"] / "k"],
         ("no undesirable (label: false)", "Fix:")),
    Case("embed-mnrl-batch-of-one", "recipes/embed.py", (), nothing,
         lambda f: ["recipes/embed.py", "--config", "recipes/tiny/embed.yaml", "--datasets", f["root"] / "pairs.jsonl",
                    "--test_size", "0", "--loss", "mnrl", "--per_device_train_batch_size", "1", "--output_dir",
                    f["tmp"] / "e"], ("per_device_train_batch_size", "in-batch negatives", "Fix:")),
    Case("yaml-merge-key-with-a-typo", "sft", (), lambda f: (f["tmp"] / "r.yaml").write_text(
         "x-base: &base\n  learning_rat: 1.0e-4\n<<: *base\nmodel_name_or_path: tiny:llama\n"),
         lambda f: ["sft", "--config", f["tmp"] / "r.yaml"], ("learning_rat", "learning_rate", "Fix:")),
]  # fmt: skip


SUBPROCESS = {next(c.name for c in CASES if c.entry == entry) for entry in dict.fromkeys(c.entry for c in CASES)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_is_one_line_exit_2_and_changes_nothing(case, built, tmp_path, capfd):
    folders = {"root": built["root"], "tmp": tmp_path}
    for name in case.folders:
        folders[name] = tmp_path / name
        shutil.copytree(built[name], folders[name])
    case.damage(folders)
    before = {name: snapshot(folders[name]) for name in case.folders}
    around = sorted(os.listdir(tmp_path))
    done = cli(*case.argv(folders)) if case.name in SUBPROCESS else cli_in_process(capfd, *case.argv(folders))
    lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in case.words:
        assert word in lines[0], lines[0]
    assert {name: snapshot(folders[name]) for name in case.folders} == before
    assert sorted(os.listdir(tmp_path)) == around  # no output, scratch or lock left behind

"""Outputs are never destroyed (issue 43, cases 2 and 7): merge's scratch folder has a name alignkit owns, an output
path holding a file or someone else's folder is refused, an output is swapped in whole (a SIGKILL at any moment
leaves the old complete output or the new one: merge, and eval / generate / report killed mid-write), and two merges
into one folder: the second is refused naming the first.

The adapter run and its merge are the session's shared ``sft_3_steps`` and ``sft_3_steps_merged`` (conftest)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.errors import ConfigError, PreflightError
from alignkit.export.outputs import OutputLock, check_output, staged_output

REPO = Path(__file__).resolve().parents[2]


def cli(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, **kw)  # fmt: skip


def spawn(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignkit.cli", *map(str, argv)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(done: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one 'alignkit:' line containing ``words``, no traceback; returns that line."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def refused_here(capsys, *argv, words: tuple[str, ...] = ()) -> str:
    """``alignkit <argv>`` in this process (the console script's own main): exit 2, one 'alignkit:' line containing
    ``words``, no traceback (an unexpected exception would fail the test); returns that line."""
    from alignkit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alignkit:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def adapter(sft_3_steps) -> Path:
    return sft_3_steps


# --- the module itself: no model needed -------------------------------------------------------------------------


def test_check_output_refuses_what_it_would_destroy(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("x")
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "model.safetensors").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file, not a folder"):
        check_output(tmp_path / "file", "folder")
    with pytest.raises(ConfigError, match="not empty and is not an earlier output"):
        check_output(tmp_path / "theirs", "folder")
    with pytest.raises(ConfigError, match="is a file of the input folder"):
        check_output(tmp_path / "input" / "model.safetensors", "file", inputs=[tmp_path / "input"])
    with pytest.raises(ConfigError, match="is the input folder"):
        check_output(tmp_path / "input", "folder", inputs=[tmp_path / "input"])
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(tmp_path / "theirs", "file")
    assert check_output(tmp_path / "theirs", "folder", ours=lambda p: True) == tmp_path / "theirs"
    check_output(tmp_path / "input" / "new.gguf", "file", inputs=[tmp_path / "input"])  # a new file beside: fine


def test_a_failed_build_leaves_the_old_output_and_no_scratch(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out) as scratch:
        (scratch / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert snapshot(out) == {"old.txt": b"old"} and sorted(os.listdir(tmp_path)) == ["out"]
    with staged_output(out) as scratch:
        (scratch / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"} and sorted(os.listdir(tmp_path)) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's private 0o700


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_the_lock_names_its_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignkit.export.outputs import "
                               f"OutputLock; OutputLock({str(out)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PreflightError, match=rf"being written by another alignkit command.*pid {holder.pid}"):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(out):  # the kernel dropped the dead holder's lock: never stale
        pass
    assert not list(tmp_path.iterdir())


# --- through `alignkit merge` -----------------------------------------------------------------------------------


def test_merge_keeps_the_users_x_tmp_and_refuses_destroying_outputs(adapter, tmp_path, capsys):
    """Through `alignkit merge`'s main in this process (the refusals come before any model loads; a separate
    interpreter would add only its start-up)."""
    from alignkit.cli import main

    out = tmp_path / "X"
    (tmp_path / "X.tmp").mkdir()
    (tmp_path / "X.tmp" / "notes.txt").write_text("my notes")
    assert main(["merge", str(adapter), "--output", str(out)]) == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "X.tmp" / "notes.txt").read_text() == "my notes"  # issue 43 case 2: it was deleted
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert sorted(os.listdir(tmp_path)) == ["X", "X.tmp"]  # no scratch or lock left behind

    before = snapshot(adapter)
    (tmp_path / "file").write_text("mine")
    refused_here(capsys, "merge", adapter, "--output", tmp_path / "file", words=("is an existing file", "Fix:"))
    refused_here(capsys, "merge", adapter, "--output", tmp_path / "X.tmp", words=("not an earlier merge", "Fix:"))
    refused_here(capsys, "merge", adapter, "--output", adapter / "adapter_model.safetensors",
                 words=("file of the input folder",))  # fmt: skip
    refused_here(capsys, "merge", adapter, "--output", adapter, words=("is the input folder",))
    assert snapshot(adapter) == before and (tmp_path / "file").read_text() == "mine"
    assert (tmp_path / "X.tmp" / "notes.txt").read_text() == "my notes"


def test_sigkill_during_a_re_merge_leaves_the_old_merge_whole(adapter, sft_3_steps_merged, tmp_path):
    """The old code rmtree'd the old merge and then renamed the new one in: a kill between left a config-only
    folder. Now the new merge is built under a scratch name and exchanged in one rename."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    shutil.copytree(sft_3_steps_merged, out)  # an earlier merge of this adapter
    old = snapshot(out)

    proc = spawn("merge", adapter, "--output", out)
    wait_for(lambda: [p for p in tmp_path.glob(".merged.alignkit-*") if (p / "model.safetensors").is_file()], proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == old  # the old merge, every byte
    AutoModelForCausalLM.from_pretrained(out)  # and loadable

    done = cli("merge", adapter, "--output", out)  # the next merge clears the killed one's scratch
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    AutoModelForCausalLM.from_pretrained(out)


def test_a_second_merge_into_the_same_folder_is_refused_naming_the_first(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    first = spawn("merge", adapter, "--output", out)
    try:
        wait_for(lambda: (tmp_path / ".merged.alignkit-lock").exists(), first)
        first.send_signal(signal.SIGSTOP)  # held mid-merge (a slow merge of a big model), its lock still taken
        # the second through alignkit's main in this process (the first, a subprocess, holds the lock)
        words = ("being written by another alignkit command", f"pid {first.pid}", "Fix:")
        refused_here(capsys, "merge", adapter, "--output", out, words=words)
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]  # the first one was not disturbed
    assert (out / "model.safetensors").is_file()


def test_eval_generate_and_report_refuse_an_existing_file_at_out(adapter, tmp_path, capsys):
    data = REPO / "recipes" / "tiny" / "data"
    held_out = next(p for p in sorted(data.glob("*.jsonl")) if "messages" in p.read_text().splitlines()[0])
    (tmp_path / "f").write_text("mine")
    before = snapshot(adapter)
    refused_here(
        capsys, "eval", adapter, "--data", held_out, "--out", tmp_path / "f", words=("is an existing file", "--out")
    )
    refused_here(capsys, "report", adapter, "--out", tmp_path / "f", words=("is an existing file", "--out"))
    refused_here(
        capsys, "generate", adapter, "--prompts", held_out, "--out", held_out, words=("is the --prompts file",)
    )
    refused_here(capsys, "generate", adapter, "--prompts", held_out, "--out", tmp_path, words=("is a folder",))
    assert (tmp_path / "f").read_text() == "mine" and snapshot(adapter) == before


# --- eval / generate / report killed mid-write -------------------------------------------------------------------

# The child runs the real command; the only thing added is the moment of the kill: the first write into a scratch
# output (a name with ".alignkit-") writes half its text, says where, and waits to be killed.
KILLED_MID_WRITE = """
import pathlib, sys, time
real = pathlib.Path.write_text
def half_then_wait(self, data, *args, **kwargs):
    if ".alignkit-" in str(self):
        real(self, data[: len(data) // 2], *args, **kwargs)
        print("HALF " + str(self), flush=True)
        time.sleep(600)
    return real(self, data, *args, **kwargs)
pathlib.Path.write_text = half_then_wait
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _commands(adapter: Path, tmp_path: Path) -> dict[str, tuple[list, Path]]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} + 1?"},
                                                        {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                               for i in range(3)))  # fmt: skip
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": f"{i} + 1?"}) + "\n" for i in range(3)))
    gen = ["--max_new_tokens", "4"]
    return {
        "eval": (["eval", adapter, "--data", prompts, "--out", tmp_path / "eval", *gen], tmp_path / "eval"),
        "generate": (["generate", adapter, "--prompts", questions, "--out", tmp_path / "replies.jsonl", *gen],
                     tmp_path / "replies.jsonl"),
        "report": (["report", adapter, "--out", tmp_path / "report"], tmp_path / "report"),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["eval", "generate", "report"])
def test_sigkill_mid_write_leaves_the_old_complete_output(command, adapter, tmp_path, capsys):
    """The old output is written first (in this process), then the same command is killed halfway through writing
    its new output: the old one is there, every byte; the next run replaces it whole and clears the killed one's
    scratch."""
    from alignkit.cli import main

    argv, out = _commands(adapter, tmp_path)[command]
    assert main([str(a) for a in argv]) == 0
    old = snapshot(out) if out.is_dir() else {"": out.read_bytes()}
    assert old

    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, *map(str, argv)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = child.stdout.readline()
        assert line.startswith("HALF "), child.communicate()[1][-3000:]
        half = Path(line[5:].strip())
        scratch = half if half.parent == out.parent else half.parent  # the scratch file, or the file in it
        assert scratch.parent == out.parent and scratch.name.startswith(f".{out.name}.alignkit-"), half
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (snapshot(out) if out.is_dir() else {"": out.read_bytes()}) == old  # the old output, whole

    assert main([str(a) for a in argv]) == 0  # the next run: a whole new output, the killed one's scratch gone
    assert not [p.name for p in tmp_path.iterdir() if ".alignkit-" in p.name]
    if command == "eval":
        assert json.loads((out / "eval_summary.json").read_text())["rows"] == 3
    elif command == "generate":
        assert [json.loads(line)["reply"] is not None for line in out.read_text().splitlines()] == [True] * 3
    else:
        assert (out / "report.html").is_file()
    capsys.readouterr()

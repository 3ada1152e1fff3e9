"""Outputs are never destroyed (issue 43, cases 2 and 7): merge's scratch folder has a name alignkit owns, an output
path holding a file or someone else's folder is refused, an output is swapped in whole (a SIGKILL at any moment
leaves the old complete output or the new one), and two merges into one folder: the second is refused naming the
first."""

from __future__ import annotations

import os
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


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "sft"
    done = cli("sft", "--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--max_steps", "2",
               "--save_steps", "100", "--disable_tqdm", "true", "--output_dir", out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


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


def test_merge_keeps_the_users_x_tmp_and_refuses_destroying_outputs(adapter, tmp_path):
    out = tmp_path / "X"
    (tmp_path / "X.tmp").mkdir()
    (tmp_path / "X.tmp" / "notes.txt").write_text("my notes")
    done = cli("merge", adapter, "--output", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "X.tmp" / "notes.txt").read_text() == "my notes"  # issue 43 case 2: it was deleted
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert sorted(os.listdir(tmp_path)) == ["X", "X.tmp"]  # no scratch or lock left behind

    before = snapshot(adapter)
    (tmp_path / "file").write_text("mine")
    refused(cli("merge", adapter, "--output", tmp_path / "file"), "is an existing file", "Fix:")
    refused(cli("merge", adapter, "--output", tmp_path / "X.tmp"), "not an earlier merge", "Fix:")
    refused(cli("merge", adapter, "--output", adapter / "adapter_model.safetensors"), "file of the input folder")
    refused(cli("merge", adapter, "--output", adapter), "is the input folder")
    assert snapshot(adapter) == before and (tmp_path / "file").read_text() == "mine"
    assert (tmp_path / "X.tmp" / "notes.txt").read_text() == "my notes"


def test_sigkill_during_a_re_merge_leaves_the_old_merge_whole(adapter, tmp_path):
    """The old code rmtree'd the old merge and then renamed the new one in: a kill between left a config-only
    folder. Now the new merge is built under a scratch name and exchanged in one rename."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli("merge", adapter, "--output", out).returncode == 0
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


def test_a_second_merge_into_the_same_folder_is_refused_naming_the_first(adapter, tmp_path):
    out = tmp_path / "merged"
    first = spawn("merge", adapter, "--output", out)
    try:
        wait_for(lambda: (tmp_path / ".merged.alignkit-lock").exists(), first)
        first.send_signal(signal.SIGSTOP)  # held mid-merge (a slow merge of a big model), its lock still taken
        second = cli("merge", adapter, "--output", out)
        refused(second, "being written by another alignkit command", f"pid {first.pid}", "Fix:")
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]  # the first one was not disturbed
    assert (out / "model.safetensors").is_file()


def test_eval_generate_and_report_refuse_an_existing_file_at_out(adapter, tmp_path):
    data = REPO / "recipes" / "tiny" / "data"
    held_out = next(p for p in sorted(data.glob("*.jsonl")) if "messages" in p.read_text().splitlines()[0])
    (tmp_path / "f").write_text("mine")
    before = snapshot(adapter)
    refused(cli("eval", adapter, "--data", held_out, "--out", tmp_path / "f"), "is an existing file", "--out")
    refused(cli("report", adapter, "--out", tmp_path / "f"), "is an existing file", "--out")
    refused(cli("generate", adapter, "--prompts", held_out, "--out", held_out), "is the --prompts file")
    refused(cli("generate", adapter, "--prompts", held_out, "--out", tmp_path), "is a folder")
    assert (tmp_path / "f").read_text() == "mine" and snapshot(adapter) == before

"""Signals (issue 43, case 8): SIGTERM to `accelerate launch`'s pid used to kill only the launcher, leaving the
training child running as an orphan, and a run that got SIGTERM wrote no checkpoint and stayed `running`. Now the
launcher forwards it, the run saves a checkpoint at the end of its step, marks itself interrupted and exits 143;
resuming from that checkpoint is exact. With two CPU ranks (DDP, marked ``distributed``) both children stop, rank 0
saves, and the resumed 2-rank run ends on the uninterrupted 2-rank run's adapter."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_recipe
from safetensors.torch import load_file

from alignkit.train.callbacks import checkpoints, last_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
TRAIN = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--test_size", "0", "--max_steps",
         str(STEPS), "--save_steps", "1000", "--per_device_train_batch_size", "2", "--max_length", "128",
         "--lr_scheduler_type", "linear", "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip


def test_sigterm_to_accelerate_launch_checkpoints_marks_interrupted_and_resumes_exactly(tmp_path):
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/sft.py", *TRAIN, "--output_dir", str(out)]  # fmt: skip
    with open(log, "w") as sink:
        launcher = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        text, lines = _sigterm_once_training(launcher, log)
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "resume_from_checkpoint: true" in lines[0], text[-3000:]
    assert "Traceback" not in text
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "interrupted"
    saved = last_complete_checkpoint(out)
    assert saved is not None and checkpoints(out) == [saved]
    step = int(saved.name.split("-")[1])
    assert 0 < step < STEPS
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs(pid, out)]  # no orphan left

    run_recipe("sft", [*TRAIN, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    run_recipe("sft", [*TRAIN, "--output_dir", str(reference)])
    want, got = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert max((want[k] - got[k]).abs().max().item() for k in want) == 0.0
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "finished"


def _sigterm_once_training(launcher: subprocess.Popen, log: Path) -> tuple[str, list[str]]:
    """SIGTERM the launcher once training steps are under way; assert it exits 128 + SIGTERM. Returns the log
    and its ``alignkit:`` lines."""
    deadline = time.monotonic() + 600
    while "'loss'" not in log.read_text():  # training steps are under way
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(timeout=300)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    return text, [line for line in text.splitlines() if line.startswith("alignkit:")]


def _runs(pid: str, out: Path) -> bool:
    try:
        return str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _launch_two_ranks(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" /
           "ddp.yaml"), "--num_processes", "2", "--main_process_port", str(port), "recipes/sft.py", *TRAIN,
           "--output_dir", str(out), *extra]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


@pytest.mark.distributed
def test_sigterm_to_a_two_rank_launch_stops_both_ranks_and_resumes_exactly(tmp_path):
    out, reference, log = tmp_path / "run", tmp_path / "uninterrupted", tmp_path / "log.txt"
    launcher = _launch_two_ranks(out, log)
    text, lines = _sigterm_once_training(launcher, log)
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in text, text[-3000:]  # said once, by rank 0
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "interrupted"
    saved = last_complete_checkpoint(out)
    assert saved is not None and checkpoints(out) == [saved] and 0 < int(saved.name.split("-")[1]) < STEPS
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs(pid, out)]  # neither rank left running

    for folder, extra in ((out, ("--resume_from_checkpoint", "true")), (reference, ())):
        proc = _launch_two_ranks(folder, tmp_path / f"{folder.name}.log", *extra)
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{folder.name}.log").read_text()[-3000:]
    want, got = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert max((want[k] - got[k]).abs().max().item() for k in want) == 0.0
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "finished"

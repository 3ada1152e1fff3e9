"""The launcher hook (alignkit-launch.pth -> alignkit.launch_guard.install) acts in launcher processes only, and
in the environment this checkout is installed into it is in place (pip install, editable or not, puts it there)."""

from __future__ import annotations

import signal
import site
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.launch_guard import child_exit_code, is_launcher


@pytest.mark.parametrize(
    "argv, launcher",
    [
        (["python", "/venv/bin/accelerate", "launch", "recipes/sft.py"], True),
        (["python", "/venv/bin/accelerate", "config"], False),
        (["python", "/venv/bin/accelerate-launch", "recipes/sft.py"], True),
        (["python", "/venv/bin/torchrun", "--nproc_per_node", "2", "recipes/sft.py"], True),
        (["python", "-m", "accelerate.commands.launch", "recipes/sft.py"], True),
        (["python", "-X", "dev", "-m", "torch.distributed.run", "recipes/sft.py"], True),
        (["python", "-m", "pytest", "-q"], False),
        (["python", "-c", "import accelerate"], False),
        (["python", "recipes/sft.py", "launch"], False),
        (["python"], False),
    ],
)
def test_only_launchers_get_the_hook(argv, launcher):
    assert is_launcher(argv) is launcher


def test_exit_code_of_the_failed_child():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    assert child_exit_code(subprocess.CalledProcessError(2, ["python", "x.py", "--hub_token", "hf_x"])) == 2
    failures = {
        1: ProcessFailure(local_rank=1, pid=11, exitcode=-15, error_file="none"),
        0: ProcessFailure(local_rank=0, pid=10, exitcode=2, error_file="none"),
    }
    failures[1].timestamp, failures[0].timestamp = 20, 10  # rank 0 failed first: the root cause
    assert child_exit_code(ChildFailedError("recipes/sft.py", failures)) == 2
    assert child_exit_code(ValueError("not a launcher's")) is None
    from torch.distributed.elastic.multiprocessing.api import SignalException

    # torch elastic's agent got SIGTERM (it signalled the ranks, which saved and exited 143): exit as they did
    assert child_exit_code(SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)) == 143
    assert child_exit_code(SignalException("Process 1 got signal: 1", sigval=signal.SIGHUP)) is None


def test_the_hook_is_installed_here():
    pth = [Path(d) / "alignkit-launch.pth" for d in site.getsitepackages()]
    assert any(p.is_file() for p in pth), f"reinstall alignkit (pip install -e .): no alignkit-launch.pth in {pth}"
    line = next(p for p in pth if p.is_file()).read_text()
    assert line.startswith("import sys;") and "alignkit.launch_guard" in line
    # and it does nothing in a plain interpreter
    plain = subprocess.run([sys.executable, "-c", "import sys; print(sys.excepthook is sys.__excepthook__)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert plain.stdout.strip() == "True"

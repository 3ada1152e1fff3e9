"""Quiet by default (alignkit/quiet.py): a stage prints no third-party warning line; the known lines are dropped by
logger and text only, and -v / ALIGNKIT_VERBOSE=1 shows them."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a third-party warning line looks like: warnings.warn's "file:line: SomethingWarning: ...", a logging record at
# WARNING (DeepSpeed's "[WARNING]", the default handler's plain text is caught by the words), or a deprecation notice.
WARNING_LINE = re.compile(r"Warning: |\[WARNING\]|WARNING (?!alignkit)|is deprecated|Failed to load|warnings\.warn")

PLANTED = """
import logging, warnings
import alignkit  # installs the filters
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure ...")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes line")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were ...")
warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory ...")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("another warning")
"""


def _planted(**env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PLANTED], capture_output=True, text=True, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )  # fmt: skip
    return done.stderr


def test_known_lines_are_dropped_and_nothing_else():
    quiet = _planted()
    assert "another bitsandbytes line" in quiet and "another warning" in quiet
    assert not re.search(r"kernels-community|Setting accelerator|pin_memory|is_gradient_checkpointing", quiet), quiet
    loud = _planted(ALIGNKIT_VERBOSE="1")
    for text in ("kernels-community", "Setting accelerator to CPU", "pin_memory", "is_gradient_checkpointing"):
        assert text in loud, text


def test_tiny_sft_prints_no_third_party_warning(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "sft", "--config", "recipes/tiny/sft.yaml", "--max_steps", "2",
         "--output_dir", str(tmp_path / "sft")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
    noise = [line for line in lines if WARNING_LINE.search(line)]
    assert not noise, "third-party warning lines:\n" + "\n".join(noise)
    assert WARNING_LINE.search("x.py:3: FutureWarning: `gradient_checkpointing` is deprecated")  # the check can see

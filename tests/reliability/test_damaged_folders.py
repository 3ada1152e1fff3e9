"""Damaged run and checkpoint folders (issue 43, case 1): each file of a checkpoint truncated, garbled (its header)
and bit-flipped (one byte in its middle: sizes and headers still hold, only the manifest's sha256 tells) in turn is a
one-line refusal naming the file, the previous checkpoint is named as the fix, and resuming from it is exact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SFT_3_STEPS, run_recipe
from safetensors.torch import load_file

from alignkit.errors import PreflightError

REPO = Path(__file__).resolve().parents[2]
TRAIN = SFT_3_STEPS
CHECKPOINT_FILES = ["trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "alignkit_checkpoint.json"]  # fmt: skip


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:  # the same size, its first bytes overwritten (the manifest's sizes still match)
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def flip(path: Path) -> None:  # one bit in the middle: the same size, headers intact (a tensor's data changed)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def run(sft_3_steps) -> Path:
    return sft_3_steps


@pytest.mark.parametrize("damage", [truncate, garble, flip])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_is_named_with_the_previous_checkpoint(run, tmp_path, name, damage):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    damage(out / "checkpoint-3" / name)
    with pytest.raises(PreflightError) as caught:
        run_recipe("sft", [*TRAIN, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{out / 'checkpoint-3' / name}: ")
    assert f"--resume_from_checkpoint {out / 'checkpoint-2'}" in message


def test_resuming_from_the_previous_checkpoint_after_damage_is_exact(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    garble(out / "checkpoint-3" / "optimizer.pt")
    argv = [sys.executable, "-m", "alignkit.cli", "sft", *TRAIN, "--output_dir", str(out)]
    done = subprocess.run([*argv, "--resume_from_checkpoint", "true"], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stderr.splitlines() if line.startswith("alignkit:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "optimizer.pt" in lines[0] and "checkpoint-2" in lines[0]

    run_recipe("sft", [*TRAIN, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2")])
    want = load_file(run / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) == 0.0  # the uninterrupted run's adapter

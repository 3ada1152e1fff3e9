"""A full disk (issue 43, case 8): a save that runs out of space is one `alignkit:` line naming the folder and the
bytes needed, exit 2, no traceback; the state stays safe (the last complete checkpoint, or the old output, whole) and
a resume after freeing space is exact.

The disk is real: a small tmpfs mounted for the command alone, in a new user + mount namespace (``unshare -rm``:
no root needed where user namespaces are allowed; the test skips, saying why, where they are not)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SFT_3_STEPS

REPO = Path(__file__).resolve().parents[2]


def in_small_disk(tmp_path: Path, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run the shell ``script`` with a tmpfs of ``size_kb`` KiB mounted on ``$DISK`` (``tmp_path/disk``); whatever
    the script copies to ``$KEEP`` (``tmp_path/keep``) outlives the mount. Skips where no namespace can be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    disk, keep = tmp_path / "disk", tmp_path / "keep"
    disk.mkdir()
    keep.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}")
    head = f"set -u; DISK={shlex.quote(str(disk))}; KEEP={shlex.quote(str(keep))}; PY={shlex.quote(sys.executable)}\n"
    mount = f"mount -t tmpfs -o size={size_kb}k tmpfs $DISK || exit 99\n"
    return subprocess.run(["unshare", "-rm", "sh", "-c", head + mount + script], capture_output=True, text=True,
                          cwd=REPO, timeout=600)  # fmt: skip


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("alignkit:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_state_is_safe(sft_3_steps, tmp_path):
    """400 KiB holds checkpoint-1 (~280 KB) but not checkpoint-2 beside it (save_total_limit 1 rotates only after the
    new one is complete). The preflight's estimate passes (min_free_disk_gb 0): the disk fills during the run. What
    is left is checkpoint-1, whole and byte-identical to the uninterrupted run's, so a resume from it is exact (as
    test_damaged_folders proves for a resume from an identical checkpoint)."""
    from alignkit.train.checkpoint_files import check_checkpoint

    train = " ".join(shlex.quote(a) for a in [*SFT_3_STEPS, "--save_total_limit", "1", "--min_free_disk_gb", "0"])
    done = in_small_disk(
        tmp_path,
        400,
        f"""
$PY -m alignkit.cli sft {train} --output_dir $DISK/run; echo "rc=$?" >&2
cp -a $DISK/run $KEEP/full
""",
    )
    assert "rc=2" in done.stderr, done.stderr[-3000:]
    line = one_line(done.stderr)
    assert f"{tmp_path / 'disk' / 'run'}: the disk is full" in line and "checkpoint-2" in line, line
    assert "needs about" in line and "bytes" in line and "resume_from_checkpoint: true" in line, line
    assert "checkpoint-1, is intact" in line and "partial checkpoint-2 was removed" in line, line
    full = tmp_path / "keep" / "full"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((full / "alignkit_run.json").read_text())["status"] == "stopped: disk full"
    check_checkpoint(full / "checkpoint-1")  # every file whole: sizes and sha256 as saved
    manifest = json.loads((full / "checkpoint-1" / "alignkit_checkpoint.json").read_text())["sha256"]
    reference = json.loads((sft_3_steps / "checkpoint-1" / "alignkit_checkpoint.json").read_text())["sha256"]
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert manifest[name] == reference[name], name  # the uninterrupted run's state at step 1, byte for byte


def test_a_full_disk_during_a_re_merge_keeps_the_old_merge(sft_3_steps, sft_3_steps_merged, tmp_path):
    """The disk holds the old merge (~600 KB) and not a second copy beside it: the re-merge fails in its scratch."""
    done = in_small_disk(
        tmp_path,
        900,
        f"""
cp -a {shlex.quote(str(sft_3_steps_merged))} $DISK/merged || exit 97
$PY -m alignkit.cli merge {shlex.quote(str(sft_3_steps))} --output $DISK/merged; echo "rc=$?" >&2
cp -a $DISK/merged $KEEP/after
ls -A $DISK > $KEEP/listing
""",
    )
    assert "rc=2" in done.stderr, done.stderr[-3000:]
    line = one_line(done.stderr)
    assert f"{tmp_path / 'disk' / 'merged'}: the disk is full" in line and "needs more than" in line, line
    assert "is as it was before" in line and "Fix:" in line, line
    keep = tmp_path / "keep"
    before = {p.name: p.read_bytes() for p in sft_3_steps_merged.iterdir()}
    assert {p.name: p.read_bytes() for p in (keep / "after").iterdir()} == before  # the old merge, every byte
    assert (keep / "listing").read_text().split() == ["merged"]  # no scratch or lock left behind

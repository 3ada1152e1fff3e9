"""What ``overwrite_output_dir: true`` does to the run it replaces, and output folders that are a run's own input.

An overwriting run moves the replaced run's checkpoints whole into ``superseded-checkpoints/<time>/`` when it starts
(never rewrites them in place, never lets a resume take them), and deletes them once it has finished: the finished
folder holds only its own checkpoints. A run stopped before then leaves them there intact, and resume names them for
what they are. An output_dir that is, holds or lies inside the model, adapter or data a run reads is refused before
any model loads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SFT_3_STEPS, run_recipe
from test_resume import KillAtStepStart, SimulatedKill, callbacks  # noqa: F401

from alignkit.errors import PreflightError
from alignkit.train.callbacks import SUPERSEDED_DIR, checkpoint_is_complete, checkpoints, superseded
from alignkit.train.resume import resolve_resume

NEW_RUN = [*SFT_3_STEPS, "--max_steps", "1", "--learning_rate", "1e-3", "--overwrite_output_dir", "true"]


def _lr_logged(checkpoint: Path) -> float:
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"][0]["learning_rate"]


def test_a_finished_overwriting_run_holds_only_its_own_checkpoints(sft_3_steps, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(sft_3_steps, out)
    old_lr = _lr_logged(out / "checkpoint-1")
    run_recipe("sft", [*NEW_RUN, "--output_dir", str(out)])
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"]  # not the replaced run's checkpoint-2 and -3
    assert not (out / SUPERSEDED_DIR).exists()  # overwrite asked for them to go, once the new run finished
    assert _lr_logged(out / "checkpoint-1") != old_lr  # written fresh by the new run (lr 1e-3, linear decay)
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "finished"
    caplog.clear()
    assert resolve_resume(out, "true") == str(out / "checkpoint-1")
    assert "skipping" not in caplog.text  # nothing of another run is left to skip, or to call "cut short"


def test_an_overwriting_run_stopped_early_keeps_the_old_checkpoints_aside(sft_3_steps, callbacks, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(sft_3_steps, out)
    callbacks.append(KillAtStepStart(0))
    with pytest.raises(SimulatedKill):
        run_recipe("sft", [*NEW_RUN, "--output_dir", str(out)])
    assert checkpoints(out) == []  # none of the old run's checkpoints look like the new run's
    aside = superseded(out)
    assert [p.name for p in aside] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(checkpoint_is_complete(p) for p in aside)  # moved whole: nothing was lost
    with pytest.raises(PreflightError) as refused:
        resolve_resume(out, "true")
    assert SUPERSEDED_DIR in str(refused.value) and "an earlier run" in str(refused.value)
    assert "cut short" not in str(refused.value)


def test_a_resumed_overwriting_run_drops_the_replaced_checkpoints_when_it_finishes(sft_3_steps, callbacks, tmp_path):  # noqa: F811
    out, argv = tmp_path / "run", [*NEW_RUN, "--max_steps", "2"]
    shutil.copytree(sft_3_steps, out)
    callbacks.append(KillAtStepStart(1))  # after the new run's checkpoint-1
    with pytest.raises(SimulatedKill):
        run_recipe("sft", [*argv, "--output_dir", str(out)])
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1"] and len(superseded(out)) == 3
    assert resolve_resume(out, "true") == str(out / "checkpoint-1")  # the new run's, not the replaced run's -3
    callbacks.clear()
    run_recipe("sft", [*argv, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / SUPERSEDED_DIR).exists()


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(sft_3_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sft_3_steps, out)
    argv = [*SFT_3_STEPS, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-1")]
    run_recipe("sft", argv)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [p.name for p in superseded(out)] == ["checkpoint-2", "checkpoint-3"]  # kept: no overwrite was asked
    assert all(checkpoint_is_complete(p) for p in [*checkpoints(out), *superseded(out)])


def _dpo_from(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(adapter), "--load_in_4bit", "false",
            "--max_steps", "1", "--output_dir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "where, how, key",
    [
        (lambda sft, tmp: sft, "is", "model_name_or_path"),
        (lambda sft, tmp: sft / "dpo", "lies inside", "model_name_or_path"),
        (lambda sft, tmp: sft.parent, "holds", "model_name_or_path"),
    ],
)
def test_an_output_dir_over_the_model_it_starts_from_is_refused(sft_3_steps, tmp_path, where, how, key):
    sft = tmp_path / "runs" / "sft"
    shutil.copytree(sft_3_steps, sft)
    before = {p: p.stat().st_mtime_ns for p in sft.rglob("*")}
    out = where(sft, tmp_path)
    with pytest.raises(PreflightError, match=rf"output_dir {out}: {how} {key} \({sft}\).*Fix: choose an output_dir"):
        run_recipe("dpo", _dpo_from(sft, out, "--overwrite_output_dir", "true"))
    assert {p: p.stat().st_mtime_ns for p in sft.rglob("*")} == before  # the adapter is untouched


@pytest.mark.parametrize(
    "stage, key",
    [("distill", "teacher_model_name_or_path"), ("grpo", "reward_funcs"), ("sft", "tokenizer_name_or_path")],
)
def test_an_output_dir_over_a_teacher_reward_model_or_tokenizer_is_refused(stage, key, sft_3_steps, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sft_3_steps, other)
    value = json.dumps([str(other)]) if key == "reward_funcs" else str(other)
    argv = ["--config", f"recipes/tiny/{stage}.yaml", f"--{key}", value, "--model_name_or_path", "tiny:llama",
            "--load_in_4bit", "false", "--max_steps", "1", "--output_dir", str(other), "--overwrite_output_dir", "true"]  # fmt: skip
    with pytest.raises(PreflightError, match=rf"output_dir {other}: is {re.escape(key)}"):
        run_recipe(stage, argv)
    assert (other / "adapter_model.safetensors").is_file() and (other / "checkpoint-3").is_dir()


def test_an_output_dir_holding_the_data_is_refused(tmp_path):
    data = tmp_path / "run" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(REPO / "recipes/tiny/data/sft.jsonl", data)
    with pytest.raises(PreflightError, match=r"holds datasets\[0\]\.path"):
        run_recipe("sft", [*SFT_3_STEPS, "--datasets", str(data), "--output_dir", str(tmp_path / "run")])


def test_the_cli_refuses_it_with_exit_2_and_no_traceback(sft_3_steps, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(sft_3_steps, sft)
    argv = [sys.executable, "-m", "alignkit.cli", "dpo", *_dpo_from(sft, sft, "--overwrite_output_dir", "true")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"output_dir {sft}: is model_name_or_path" in done.stderr
    assert (sft / "adapter_model.safetensors").is_file() and not (sft / "checkpoint-4").exists()

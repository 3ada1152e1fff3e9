"""What protects a run's output dir: checkpoint rotation that never leaves nothing to resume, a resume that refuses
changed hyperparameters, a hand-off that refuses adapter settings it cannot apply, and one run per output dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_recipe
from test_resume import SFT_LORA, KillAtStepStart, SimulatedKill, WhereItStarts, assert_same_trajectory, callbacks  # noqa: F401

from alignkit.errors import PreflightError
from alignkit.train.callbacks import AtomicCheckpoints, checkpoint_is_complete, checkpoints

REPO = Path(__file__).resolve().parents[2]
ROTATE = ["--save_total_limit", "1"]


def test_kill_inside_the_rotation_window_leaves_a_checkpoint_to_resume(callbacks, tmp_path, monkeypatch):  # noqa: F811
    """transformers deletes the checkpoints beyond save_total_limit right after writing the new one, before alignkit
    marks it complete: a kill then (simulated here, right after checkpoint-2 is written) left no complete checkpoint
    (6 steps lost in the report). alignkit rotates only after marking, so checkpoint-1 is still there and whole."""
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    run_recipe("sft", [*SFT_LORA, *ROTATE, "--output_dir", str(reference)])
    assert [p.name for p in checkpoints(reference)] == ["checkpoint-3"]  # rotation still rotates

    real_on_save = AtomicCheckpoints.on_save

    def killed_before_marking(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise SimulatedKill("killed after checkpoint-2 was written, before it was marked complete")
        return real_on_save(self, args, state, control, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(AtomicCheckpoints, "on_save", killed_before_marking)
        with pytest.raises(SimulatedKill):
            run_recipe("sft", [*SFT_LORA, *ROTATE, "--output_dir", str(out)])
    assert checkpoint_is_complete(out / "checkpoint-1") and not checkpoint_is_complete(out / "checkpoint-2")

    callbacks.append(probe := WhereItStarts())
    run_recipe("sft", [*SFT_LORA, *ROTATE, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert probe.start == 1
    assert_same_trajectory(out, reference)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]


def test_resume_with_a_changed_learning_rate_is_refused(callbacks, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    callbacks.append(KillAtStepStart(1))
    with pytest.raises(SimulatedKill):
        run_recipe("sft", [*SFT_LORA, "--output_dir", str(out)])
    callbacks.clear()
    resume = [*SFT_LORA, "--output_dir", str(out), "--resume_from_checkpoint", "true"]
    with pytest.raises(PreflightError, match=r"learning_rate: 0\.005 -> 0\.001.*Fix: resume with the run's own values"):
        run_recipe("sft", [*resume, "--learning_rate", "1e-3"])
    with pytest.raises(PreflightError, match=r"save_steps: 1(\.0)? -> 2"):  # restored from the checkpoint: refused too
        run_recipe("sft", [*resume, "--save_steps", "2"])
    run_recipe("sft", [*resume, "--max_steps", "4"])  # how long to go on may change
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "finished"
    with pytest.raises(PreflightError, match=r"checkpoint-4 is at step 4, and max_steps is 4: nothing is left"):
        run_recipe("sft", [*resume, "--max_steps", "4"])  # transformers would take a 5th step


def test_continue_handoff_refuses_adapter_settings_it_cannot_apply(tmp_path):
    sft = tmp_path / "sft"
    run_recipe("sft", [*SFT_LORA, "--output_dir", str(sft)])  # lora_r 8 (recipes/tiny/sft.yaml)
    dpo = ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(sft), "--max_steps", "1",
           "--output_dir", str(tmp_path / "dpo"), "--disable_tqdm", "true"]  # fmt: skip
    with pytest.raises(PreflightError, match=r"lora_r 4 in the recipe, r 8 in .*sft/adapter_config\.json.*merge"):
        run_recipe("dpo", [*dpo, "--lora_r", "4"])
    assert not (tmp_path / "dpo").exists(), "a run refused before writing anything leaves no folder behind"
    run_recipe("dpo", [*dpo, "--lora_r", "4", "--adapter_handoff", "merge"])  # the fix the message gives works
    # dropout holds no weights: the continued adapter takes the recipe's (the shipped SmolLM2 DPO sets 0.0 after SFT's
    # 0.05), and its saved config says so
    assert json.loads((sft / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    run_recipe("dpo", [*dpo, "--lora_dropout", "0.0", "--output_dir", str(tmp_path / "dpo0")])
    assert json.loads((tmp_path / "dpo0" / "adapter_config.json").read_text())["lora_dropout"] == 0.0


def test_two_runs_into_one_output_dir_at_once(tmp_path):
    """Both start at the same moment: exactly one trains, the other exits 2 naming the live run, and the first's
    outputs are whole."""
    out = tmp_path / "shared"
    argv = [sys.executable, "recipes/sft.py", "--config", "recipes/tiny/sft.yaml", "--max_steps", "150",
            "--save_steps", "1000", "--test_size", "0", "--output_dir", str(out), "--disable_tqdm", "true"]  # fmt: skip
    procs = [
        subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert "in use by another alignkit run that is still going" in refused and "pid" in refused
    assert "Traceback" not in refused and "overwrite_output_dir: true" not in refused
    record = json.loads((out / "alignkit_run.json").read_text())
    assert record["status"] == "finished"
    steps = [e["step"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert steps == list(range(1, 151)) and (out / "adapter_model.safetensors").is_file()

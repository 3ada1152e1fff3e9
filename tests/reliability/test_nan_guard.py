"""NaN guard: a NaN injected at step 3, after the checkpoint at step 2, stops the run with NonFiniteLossError before the
optimizer applies it. The message names the step, the parameter and the last good checkpoint; that checkpoint is
complete, loads, and computes finite outputs; nothing is saved after the NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import log_history, run_recipe
from transformers import TrainerCallback

from alignkit.config import ModelArguments
from alignkit.errors import NonFiniteLossError
from alignkit.models.loader import load_model
from alignkit.runs import RunRecord
from alignkit.train import runner
from alignkit.train.callbacks import checkpoint_is_complete, checkpoints

SFT = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "4",
       "--save_steps", "2", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]  # fmt: skip


class PoisonAt(TrainerCallback):
    """At the start of a step, overwrite one trainable weight with NaN (as a diverging update would)."""

    def __init__(self, completed_steps: int):
        self.completed_steps, self.poisoned = completed_steps, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.completed_steps:
            self.poisoned, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
            with torch.no_grad():
                param.fill_(float("nan"))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out, poison, real_train = tmp_path / "run", PoisonAt(2), runner.Run.train

    def train(self, trainer, *args, **kwargs):
        trainer.add_callback(poison)
        return real_train(self, trainer, *args, **kwargs)

    monkeypatch.setattr(runner.Run, "train", train)
    with pytest.raises(NonFiniteLossError) as raised:
        run_recipe("sft", [*SFT, "--output_dir", str(out)])

    message, good = str(raised.value), out / "checkpoint-2"
    assert "step 3" in message and poison.poisoned in message and str(good) in message and "Fix" in message
    assert checkpoints(out) == [good] and checkpoint_is_complete(good)  # nothing saved after the NaN
    assert RunRecord.read(out).status == "stopped: non-finite loss"
    assert not (out / "adapter_model.safetensors").exists()  # no final save of poisoned weights

    model = load_model(ModelArguments(model_name_or_path=str(good)))  # the loader takes it as an adapter dir
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapter and all(torch.isfinite(p).all() for p in adapter.values())
    assert any(p.abs().sum() > 0 for n, p in adapter.items() if "lora_B" in n)  # trained weights, not a fresh init
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 42, 9, 3]])).logits
    assert torch.isfinite(logits).all()

    # the advice works: the command it names trains on from the good weights (without the poison)
    monkeypatch.setattr(runner.Run, "train", real_train)
    assert f"--model_name_or_path {good} --learning_rate 0.0002" in message
    after = tmp_path / "after"
    run_recipe(
        "sft", [*SFT, "--model_name_or_path", str(good), "--learning_rate", "0.0002", "--output_dir", str(after)]
    )
    assert RunRecord.read(after).finished and RunRecord.read(after).lineage[-1].from_adapter == str(good)


def test_a_diverged_run_without_nan_stops_and_the_advice_works(tmp_path):
    """learning_rate 1e6 saturates the tiny model after one step: loss flat, grad norm 0, no NaN ever. The guard stops
    it on the third zero-gradient step. Step 1's update already broke the weights, so no checkpoint is good (the
    one at step 1 holds them): the fix is to start over with a sane rate, and following it trains."""
    out = tmp_path / "run"
    argv = [*SFT, "--learning_rate", "1e6", "--max_steps", "8", "--save_steps", "1"]
    with pytest.raises(NonFiniteLossError) as raised:
        run_recipe("sft", [*argv, "--output_dir", str(out)])
    message = str(raised.value)
    assert "steps 2-4: gradient norm 0" in message and "stopped learning" in message
    assert "no checkpoint in" in message and "--learning_rate 0.0002 --overwrite_output_dir true" in message
    run_recipe("sft", [*argv, "--output_dir", str(out), "--learning_rate", "0.0002", "--overwrite_output_dir", "true"])
    losses = [e for e in log_history(out) if "loss" in e]
    assert len(losses) == 8 and all(e["grad_norm"] > 0 for e in losses)


def test_a_fitted_runs_loss_noise_is_not_divergence(tmp_path):
    """A loss that has fitted (~1e-4) moving to ~1e-3 is 4x its median but not divergence: below LOSS_FLOOR the
    guard lets it pass (tool-call SFT on SmolLM2 was stopped at step 24 for 0.0013 vs 0.00028); a real jump stops."""
    from types import SimpleNamespace

    from alignkit.errors import DivergenceError
    from alignkit.train.callbacks import NonFiniteGuard

    guard = NonFiniteGuard()
    args = SimpleNamespace(output_dir=str(tmp_path), deepspeed=None, learning_rate=1e-3)
    for step, loss in enumerate([3e-4, 2.8e-4, 2.7e-4, 2.6e-4, 2.8e-4, 1.3e-3], start=1):
        guard.on_log(args, SimpleNamespace(global_step=step), None, logs={"loss": loss, "learning_rate": 1e-3})
    with pytest.raises(DivergenceError, match="jumped"):
        guard.on_log(args, SimpleNamespace(global_step=7), None, logs={"loss": 2.5, "learning_rate": 1e-3})


def test_a_converged_runs_bump_is_not_divergence_a_climb_back_is(tmp_path):
    """Issue 39: a MiniLM QA run converged from ~6 to ~0.06 was stopped at step 189 for a loss of 0.29 (4.8x its
    median, above LOSS_FLOOR): a bump that undoes 4% of what the run learned. The guard now also asks a jump to climb
    LOSS_UNDONE of the way back to the run's early loss; the same run climbing back to 3.0 still stops, and a run
    whose loss never fell is judged by the ratio alone (a jump from ~2 to 9 stops)."""
    from types import SimpleNamespace

    from alignkit.errors import DivergenceError
    from alignkit.train.callbacks import NonFiniteGuard

    args = SimpleNamespace(output_dir=str(tmp_path), deepspeed=None, learning_rate=3e-5)

    def feed(guard, losses, start=1):
        for step, loss in enumerate(losses, start=start):
            guard.on_log(args, SimpleNamespace(global_step=step), None, logs={"loss": loss, "learning_rate": 3e-5})

    falling = [6.0, 5.2, 4.1, 3.0, 2.2, 1.5, 0.9, 0.5, 0.3, 0.2, 0.12, 0.08, 0.07, 0.06, 0.05, 0.06, 0.07, 0.06]
    guard = NonFiniteGuard()
    feed(guard, [*falling, 0.29, 0.08, 0.06])  # the bump of the QA run: trains on
    with pytest.raises(DivergenceError, match=r"loss 3 jumped from ~0.07 \(early in the run ~4.1\)"):
        feed(guard, [3.0], start=len(falling) + 4)
    flat = NonFiniteGuard()
    feed(flat, [2.1, 2.0, 1.9, 2.0, 2.1, 2.0])
    with pytest.raises(DivergenceError, match="jumped"):
        feed(flat, [9.0], start=7)


def test_online_dpo_steps_whose_sampled_pairs_tie_are_not_divergence(tmp_path, caplog):
    """SmolLM2's demo online DPO was stopped at step 13 as diverged: 6 of its 13 steps had gradient norm exactly 0,
    each one where both sampled completions scored the same (``objective/scores_margin`` 0, most often the same
    text, whose DPO loss is log 2 with gradient 0). Such a step has nothing to learn from: it neither counts toward
    nor breaks a run of zero-gradient steps, and three in a row are warned about (as GRPO's tied groups); zero
    gradients on steps with a margin still stop the run."""
    from types import SimpleNamespace

    from alignkit.errors import DivergenceError
    from alignkit.train.callbacks import NonFiniteGuard

    args = SimpleNamespace(output_dir=str(tmp_path), deepspeed=None, learning_rate=5e-5)

    def log(guard, step, grad_norm, margin):
        logs = {"loss": 0.6931, "grad_norm": grad_norm, "learning_rate": 5e-5, "objective/scores_margin": margin}
        guard.on_log(args, SimpleNamespace(global_step=step), None, logs=logs)

    guard = NonFiniteGuard()
    # the demo run's steps 1-13 (grad_norm, objective/scores_margin) as logged
    demo = [(0.26, 0.25), (0.54, 0.25), (0, 0), (0.70, 0.25), (0.71, 0.25), (0, 0), (0, 0), (0.54, 0.25), (0, 0),
            (0.32, 0.25), (0, 0), (0, 0), (0, 0)]  # fmt: skip
    with caplog.at_level("WARNING", logger="alignkit.train.callbacks"):
        for step, (grad_norm, margin) in enumerate(demo, start=1):
            log(guard, step, grad_norm, margin)
    assert "same reward" in caplog.text  # steps 11-13 tied
    stuck = NonFiniteGuard()
    log(stuck, 1, 0.3, 0.25)
    log(stuck, 2, 0.0, 0.25)
    log(stuck, 3, 0.0, 0)  # a tie between them does not reset the count
    log(stuck, 4, 0.0, 0.5)
    with pytest.raises(DivergenceError, match="steps 2-5: gradient norm 0 .* on 3 steps that had something to learn"):
        log(stuck, 5, 0.0, 0.25)


def test_the_gradient_check_is_one_fused_norm_and_still_names_the_tensor(tmp_path):
    """The pre-update check reads one fused norm over all gradients: finite gradients pass (huge ones too, whose norm
    overflows fp32: the per-tensor check then finds nothing to name), a NaN or inf anywhere stops the run naming the
    first tensor that holds it."""
    from types import SimpleNamespace

    from alignkit.train.callbacks import NonFiniteGuard

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    guard, state = NonFiniteGuard(), SimpleNamespace(global_step=6)
    args = SimpleNamespace(deepspeed=None, output_dir=str(tmp_path), learning_rate=2e-4)
    guard.on_train_begin(args, state, None, model=model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)  # finite; the norm of all of them is inf in fp32
    guard.on_pre_optimizer_step(args, state, None)
    model[1].bias.grad[0] = float("inf")
    model[1].weight.grad[1, 2] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 7: non-finite gradient in 1\.weight"):
        guard.on_pre_optimizer_step(args, state, None)

"""Exact resume. A run killed mid-epoch and resumed with ``resume_from_checkpoint: true`` logs the same per-step
losses and learning rates as the same run uninterrupted (within 1e-5 on CPU). For that the checkpoint must restore
the adapter weights, the optimizer moments, the scheduler (a linear decay: a fresh one would restart at the peak
rate), the RNG (LoRA dropout) and the dataloader position (every kill here is mid-epoch). Checked for SFT (4-bit),
DPO, KTO, GRPO, RLOO, online DPO and distillation (4-bit; sampled completions, so the RNG too), CPT (packed blocks) and
a task head (NER, 4-bit): one run loop serves them all.
The first step after the resume checks weights, data position and RNG; the second also the optimizer and scheduler.

The kill is an exception nothing in the stack handles (SimulatedKill is a BaseException), raised either at the start
of the step after a checkpoint, or inside transformers' checkpoint save, after optimizer.pt and before rng_state.pth
and trainer_state.json: that leaves a half-written checkpoint-N, which transformers' own get_last_checkpoint would
resume from and alignkit's resume must skip.
"""

from __future__ import annotations

import pytest
from conftest import SFT_3_STEPS, log_history, run_recipe
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from alignkit.train import runner
from alignkit.train.callbacks import checkpoint_is_complete, last_complete_checkpoint

STEPS = 3
SCHEDULE = ["--test_size", "0", "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--lr_scheduler_type", "linear", "--disable_tqdm", "true"]  # fmt: skip
COMMON = [*SCHEDULE, "--max_length", "128"]
SFT_LORA = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", *COMMON]
# the same run as the session's sft_3_steps, the reference of the kill-during-a-save test
assert dict(zip(SFT_LORA[::2], SFT_LORA[1::2])) == dict(zip(SFT_3_STEPS[::2], SFT_3_STEPS[1::2]))
SFT_QLORA = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "true", *COMMON]
DPO_LORA = [
    "--config",
    "recipes/tiny/dpo.yaml",
    "--model_name_or_path",
    "tiny:llama",
    "--load_in_4bit",
    "false",
    *COMMON,
]

# KTO (its reference adapter is rebuilt from the checkpoint's) and GRPO (sampled completions: the RNG must be restored
# for the resumed run to sample what the uninterrupted one did; its trajectory includes the reward)
KTO_LORA = [
    "--config",
    "recipes/tiny/kto.yaml",
    "--model_name_or_path",
    "tiny:llama",
    "--load_in_4bit",
    "false",
    *COMMON,
]
GRPO_QLORA = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--lora_modules_to_save", "[lm_head]",
              "--reward_funcs", "alignkit.testing.rewards:plain_letters", "--num_generations", "2",
              "--max_completion_length", "8", *SCHEDULE]  # fmt: skip
RLOO_QLORA = ["--config", "recipes/tiny/rloo.yaml", *GRPO_QLORA[2:]]  # GRPO's run, RLOO's leave-one-out advantages
# online DPO: two sampled completions per prompt, ranked by the reward (its mean, objective/scores, is compared too);
# distillation: the student's sampled completions scored by a frozen teacher (the tiny model's fp32 self)
ONLINE_DPO_QLORA = ["--config", "recipes/tiny/online_dpo.yaml", "--model_name_or_path", "tiny:llama",
                    "--lora_modules_to_save", "[lm_head]", "--reward_funcs", "alignkit.testing.rewards:plain_letters",
                    "--max_new_tokens", "8", *SCHEDULE]  # fmt: skip
DISTILL_QLORA = ["--config", "recipes/tiny/distill.yaml", "--teacher_model_name_or_path", "tiny:llama",
                 "--lora_modules_to_save", "[lm_head]", "--max_completion_length", "8", *SCHEDULE]  # fmt: skip

# The same run loop serves CPT (packed blocks) and the task heads: resume is checked there too, on full precision.
CPT_LORA = ["--config", "recipes/tiny/cpt.yaml", "--load_in_4bit", "false", *SCHEDULE]
NER_QLORA = ["--config", "recipes/tiny/task_ner.yaml", "--load_in_4bit", "true", *COMMON]


class SimulatedKill(BaseException):
    pass


class KillAtStepStart(TrainerCallback):
    def __init__(self, completed_steps: int):
        self.completed_steps = completed_steps

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.completed_steps:
            raise SimulatedKill(f"killed at the start of step {state.global_step + 1}")


class WhereItStarts(TrainerCallback):
    start, steps = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.fixture
def callbacks(monkeypatch):
    """Callbacks added to the (real) trainer each recipe builds, before the run loop trains it."""
    added, real_train = [], runner.Run.train

    def train(self, trainer, *args, **kwargs):
        for callback in added:
            trainer.add_callback(callback)
        return real_train(self, trainer, *args, **kwargs)

    monkeypatch.setattr(runner.Run, "train", train)
    return added


def trajectory(output_dir) -> list[tuple[int, float, float, float, float | None]]:
    return [(e["step"], e["epoch"], e["loss"], e["learning_rate"], e.get("reward", e.get("objective/scores")))
            for e in log_history(output_dir) if "loss" in e]  # fmt: skip


def assert_same_trajectory(resumed, reference) -> None:
    got, want = trajectory(resumed), trajectory(reference)
    assert [g[0] for g in got] == [w[0] for w in want] == list(range(1, STEPS + 1))
    for (step, _, loss, lr, reward), (_, _, want_loss, want_lr, want_reward) in zip(got, want):
        assert abs(loss - want_loss) <= 1e-5, f"step {step}: loss {loss} after resume, {want_loss} uninterrupted"
        if want_reward is not None:  # GRPO: the same completions were sampled and scored
            assert reward == pytest.approx(want_reward, abs=1e-6), (
                f"step {step}: reward {reward}, uninterrupted {want_reward}"
            )
        assert lr == pytest.approx(want_lr, rel=1e-9), f"step {step}: learning rate {lr}, uninterrupted {want_lr}"
    assert len({w[3] for w in want}) == STEPS  # the schedule really changes every step
    assert want[-1][1] < 1  # all within the first epoch: the kills below are mid-epoch


@pytest.mark.parametrize(
    "stage, argv",
    [
        ("sft", SFT_QLORA),
        ("dpo", DPO_LORA),
        ("cpt", CPT_LORA),
        ("task", NER_QLORA),
        ("kto", KTO_LORA),
        ("grpo", GRPO_QLORA),
        ("rloo", RLOO_QLORA),
        ("online_dpo", ONLINE_DPO_QLORA),
        ("distill", DISTILL_QLORA),
    ],
    ids=[
        "sft-qlora-4bit",
        "dpo-lora",
        "cpt-lora",
        "ner-qlora-4bit",
        "kto-lora",
        "grpo-qlora-4bit",
        "rloo-qlora-4bit",
        "online-dpo-qlora-4bit",
        "distill-qlora-4bit",
    ],
)
def test_killed_after_a_checkpoint_resumes_exactly(stage, argv, callbacks, tmp_path):
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    run_recipe(stage, [*argv, "--output_dir", str(reference)])

    callbacks.append(KillAtStepStart(1))
    with pytest.raises(SimulatedKill):
        run_recipe(stage, [*argv, "--output_dir", str(out)])
    assert last_complete_checkpoint(out).name == "checkpoint-1"

    callbacks[:] = [probe := WhereItStarts()]
    run_recipe(stage, [*argv, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert (probe.start, probe.steps) == (1, STEPS - 1)  # resumed from checkpoint-1, not retrained from scratch
    assert_same_trajectory(out, reference)


def test_kill_during_a_save_never_leaves_a_resumable_broken_checkpoint(callbacks, sft_3_steps, tmp_path):
    reference, out = sft_3_steps, tmp_path / "run"  # the session's uninterrupted run of SFT_LORA (conftest)

    real_save_rng = Trainer._save_rng_state

    def dies_mid_save(trainer, output_dir):
        if trainer.state.global_step == 2:
            raise SimulatedKill("killed while saving checkpoint-2: after optimizer.pt, before rng_state.pth")
        return real_save_rng(trainer, output_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_save_rng_state", dies_mid_save)
        with pytest.raises(SimulatedKill):
            run_recipe("sft", [*SFT_LORA, "--output_dir", str(out)])
    broken = out / "checkpoint-2"
    assert (broken / "optimizer.pt").is_file() and not (broken / "rng_state.pth").exists()
    assert get_last_checkpoint(str(out)) == str(broken)  # what transformers alone would resume from
    assert not checkpoint_is_complete(broken) and last_complete_checkpoint(out) == out / "checkpoint-1"

    callbacks.append(probe := WhereItStarts())
    run_recipe("sft", [*SFT_LORA, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert probe.start == 1
    assert_same_trajectory(out, reference)
    assert checkpoint_is_complete(broken)  # saved again, whole, by the resumed run
    assert not list(out.rglob("training_args.bin"))  # no pickled arguments in any save

"""NaN guard: a NaN injected at step 3, after the checkpoint at step 2, stops the run with NonFiniteLossError before the
optimizer applies it. The message names the step, the parameter and the last good checkpoint; that checkpoint is
complete, loads, and computes finite outputs; nothing is saved after the NaN."""

from __future__ import annotations

import pytest
import torch
from conftest import run_recipe
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

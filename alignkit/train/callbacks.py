"""Trainer callbacks the run loop adds to every stage."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from alignkit.errors import NonFiniteLossError


class NonFiniteGuard(TrainerCallback):
    """Stop on a NaN/Inf loss or gradient *before* the optimizer step writes it into the weights.

    Raising here leaves the output dir as it was after the last save, so the last good checkpoint is intact.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.enabled or self.model is None or args.deepspeed:
            return
        for name, param in self.model.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                raise NonFiniteLossError(
                    f"step {state.global_step + 1}: non-finite gradient in {name}; training stopped before the update. "
                    f"The last good checkpoint in {args.output_dir} is intact. Fix: lower learning_rate, check the data "
                    "for extreme values, or resume from that checkpoint."
                )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"step {state.global_step}: {key} is {value}; training stopped. The last good checkpoint in "
                    f"{args.output_dir} is intact. Fix: lower learning_rate or check the data, then resume."
                )


class ResolvedConfigToWandb(TrainerCallback):
    """Log alignkit's whole resolved config (model, quantization, adapter, data groups) to the W&B run."""

    def __init__(self, resolved: dict):
        self.resolved = resolved

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"alignkit": self.resolved}, allow_val_change=True)
        except ImportError:
            pass

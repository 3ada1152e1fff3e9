"""GRPO's loss variants (trl 1.16 ``loss_type``, ``importance_sampling_level``) on the tiny Llama: each variant,
set by its recipe key, reaches trl's GRPOTrainer built by the grpo recipe, and that trainer's own loss
(``GRPOTrainer._compute_loss``) on one fixed batch of completions of different lengths is what the variant promises:
grpo's per-sequence mean, Dr. GRPO's constant (batch x max_completion_length), DAPO's token count of the whole
generation batch, BNPO's token count of the micro-batch, LUSPO's length-scaled sequence loss, SAPO's soft gate, CISPO's
and VESPO's REINFORCE-style weights, and GSPO's one ratio per sequence. Invalid combinations are ConfigErrors before
the model loads (exit 2 through the recipe)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_recipe

from alignkit.errors import ConfigError
from alignkit.train import runner

BASE = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "false",
        "--lora_dropout", "0", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
        "--max_completion_length", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--reward_funcs", "[alignkit.testing.rewards:plain_letters]"]  # fmt: skip
LENGTHS = [2, 4, 6, 8]  # completion tokens of the 4 rows; max_completion_length 8
ADV = [1.0, -0.5, 0.9, -1.2]  # advantages (not zero-sum, so that every weighting shows)
OTHER_TOKENS = 11  # completion tokens of the generation batch's other micro-batch (gradient_accumulation_steps 2)


def build_trainer(tmp_path, monkeypatch, *keys: str):
    """The GRPOTrainer the grpo recipe builds with ``keys`` (model loaded, fp32, adapter on; not trained)."""
    seen = []
    monkeypatch.setattr(runner.Run, "train", lambda self, trainer: seen.append(trainer))
    run_recipe("grpo", [*BASE, *keys, "--output_dir", str(tmp_path / "run")])
    (trainer,) = seen
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # as the training loop sets it for this micro-batch
    return trainer


def fixed_batch(trainer, old_log_ratio: float | None = None) -> dict:
    """4 completions of LENGTHS tokens after one 3-token prompt, with the advantages ADV. ``old_log_ratio``: the
    sampling policy's log-probabilities are the current ones minus this at each row's first completion token
    (off-policy by that much there, on-policy elsewhere); None: on-policy (trl then uses the current ones)."""
    g = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in LENGTHS])
    batch = {
        "prompt_ids": torch.randint(5, vocab, (4, 3), generator=g),
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": torch.randint(5, vocab, (4, 8), generator=g) * mask,
        "completion_mask": mask,
        "advantages": torch.tensor(ADV),
        "num_items_in_batch": torch.tensor(float(sum(LENGTHS) + OTHER_TOKENS)),
    }
    if old_log_ratio is not None:
        logps = token_logps(trainer, batch)
        shift = torch.zeros_like(logps)
        shift[:, 0] = old_log_ratio
        batch["old_per_token_logps"] = logps - shift
    return batch


def token_logps(trainer, batch) -> torch.Tensor:
    """Per-token log-probabilities of the completions under the trainer's model, by trl's own function."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, 8)
    return logps


def loss_of(trainer, batch) -> float:
    return float(trainer._compute_loss(trainer.model, batch).detach())


S = sum(a * n for a, n in zip(ADV, LENGTHS))  # sum over tokens of the advantages
N, B, GAS = sum(LENGTHS), len(LENGTHS), 2

# On-policy every clipped ratio is 1, so each variant's loss is -(its weighting of the advantages): the weighting is
# what the variant changes. (Each micro-batch loss is divided by the accumulation steps, except DAPO/CISPO/VESPO
# whose normaliser already spans the generation batch.)
ON_POLICY = {
    "grpo": -sum(ADV) / B / GAS,  # per-sequence mean, then mean over sequences: length-blind
    "bnpo": -S / N / GAS,  # tokens of this micro-batch
    "dr_grpo": -S / (B * 8) / GAS,  # constant: rows x max_completion_length
    "dapo": -S / (N + OTHER_TOKENS),  # tokens of the whole generation batch (num_items_in_batch)
    "luspo": -S / B / GAS,  # (sequence level) each sequence's loss scaled by its length
}


@pytest.mark.parametrize("loss_type", list(ON_POLICY))
def test_loss_type_normalises_as_documented(loss_type, tmp_path, monkeypatch):
    extra = ["--importance_sampling_level", "sequence"] if loss_type == "luspo" else []
    trainer = build_trainer(tmp_path, monkeypatch, "--loss_type", loss_type, *extra)
    assert trainer.loss_type == loss_type
    assert loss_of(trainer, fixed_batch(trainer)) == pytest.approx(ON_POLICY[loss_type], rel=1e-5)


def test_dr_grpo_weights_tokens_alike_where_grpo_favours_short_rows(tmp_path, monkeypatch):
    """Length bias, the point of Dr. GRPO: moving advantage from the short row to the long one changes the Dr. GRPO
    loss (each token counts alike) but not grpo's (each row counts alike whatever its length)."""
    losses = {}
    for loss_type in ("grpo", "dr_grpo"):
        trainer = build_trainer(tmp_path / loss_type, monkeypatch, "--loss_type", loss_type)
        batch = fixed_batch(trainer)
        moved = dict(batch, advantages=torch.tensor([ADV[0] - 0.5, ADV[1], ADV[2], ADV[3] + 0.5]))
        losses[loss_type] = (loss_of(trainer, batch), loss_of(trainer, moved))
    assert losses["grpo"][0] == pytest.approx(losses["grpo"][1], abs=1e-7)
    assert losses["dr_grpo"][1] - losses["dr_grpo"][0] == pytest.approx(-0.5 * (8 - 2) / (B * 8) / GAS, rel=1e-5)


def test_sapo_soft_gate(tmp_path, monkeypatch):
    """SAPO on-policy: the gate sigmoid(tau (r - 1)) 4 / tau is 2 / tau, tau by the advantage's sign."""
    trainer = build_trainer(tmp_path, monkeypatch, "--loss_type", "sapo", "--sapo_temperature_neg", "2.0")
    want = -sum(a * 2 / (1.0 if a > 0 else 2.0) for a in ADV) / B / GAS
    assert loss_of(trainer, fixed_batch(trainer)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["cispo", "vespo"])
def test_cispo_and_vespo_weight_the_log_probabilities(loss_type, tmp_path, monkeypatch):
    """CISPO (ratio capped at epsilon_high, detached) and VESPO (Gamma weight, 1 at ratio 1) are REINFORCE-style:
    on-policy the loss is -sum(A log p) over the generation batch's tokens."""
    cap = ["--epsilon_high", "5.0"] if loss_type == "cispo" else []
    trainer = build_trainer(tmp_path, monkeypatch, "--loss_type", loss_type, *cap)
    batch = fixed_batch(trainer)
    logps = token_logps(trainer, batch) * batch["completion_mask"]
    want = -float((torch.tensor(ADV)[:, None] * logps).sum()) / (N + OTHER_TOKENS)
    assert loss_of(trainer, batch) == pytest.approx(want, rel=1e-4)


def test_gspo_one_ratio_per_sequence(tmp_path, monkeypatch):
    """GSPO (importance_sampling_level: sequence, loss_type grpo): the ratio is exp(mean token log-ratio) per
    sequence and is clipped as one; token level clips each token's ratio. Off-policy by log-ratio 1 at each row's
    first token: token level clips that token (to 1.2 where the advantage is positive, e where it is negative);
    sequence level spreads it, exp(1/L), and clips only the short rows."""
    eps = 0.2
    want = {}
    for level in ("token", "sequence"):
        terms = []
        for a, n in zip(ADV, LENGTHS):
            if level == "token":
                r = math.e
                first = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
                terms.append(-(first + (n - 1) * a) / n)
            else:
                r = math.exp(1 / n)
                terms.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
        want[level] = sum(terms) / B / GAS
    for level in ("token", "sequence"):
        trainer = build_trainer(tmp_path / level, monkeypatch, "--loss_type", "grpo",
                                "--importance_sampling_level", level)  # fmt: skip
        assert trainer.importance_sampling_level == level
        assert loss_of(trainer, fixed_batch(trainer, old_log_ratio=1.0)) == pytest.approx(want[level], rel=1e-5)
    assert abs(want["token"] - want["sequence"]) > 0.05


@pytest.mark.parametrize(
    "keys, names",
    [
        (["--loss_type", "dr_grp"], ["loss_type", "'dr_grpo'"]),
        (["--importance_sampling_level", "sequence"], ["importance_sampling_level", "loss_type: grpo"]),
        (["--importance_sampling_level", "sequence", "--loss_type", "vespo"], ["vespo", "importance_sampling_level"]),
        (["--loss_type", "luspo"], ["luspo", "importance_sampling_level: sequence"]),
        (["--loss_type", "sapo", "--delta", "1.5"], ["delta", "sapo"]),
        (["--sapo_temperature_pos", "2.0"], ["sapo_temperature_pos", "loss_type"]),
        (["--vespo_k_pos", "3.0", "--loss_type", "grpo"], ["vespo_k_pos", "vespo"]),
        (["--loss_type", "cispo", "--epsilon", "0.3"], ["epsilon", "cispo"]),
        (["--loss_type", "cispo"], ["epsilon_high", "5.0"]),
        (["--loss_type", "dr_grpo", "--max_completion_length", "null"], ["max_completion_length"]),
    ],
    ids=[
        "unknown-loss",
        "gspo-token-summing",
        "gspo-vespo",
        "luspo-token",
        "delta-not-read",
        "sapo-key-not-read",
        "vespo-key-not-read",
        "cispo-epsilon",
        "cispo-cap-below-1",
        "dr_grpo-no-constant",
    ],  # fmt: skip
)
def test_invalid_variant_is_a_config_error_before_the_model_loads(keys, names, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model loaded before the config was checked")

    monkeypatch.setattr(runner, "load_model", no_load)
    with pytest.raises(ConfigError) as err:
        run_recipe("grpo", [*BASE, *keys, "--output_dir", str(tmp_path / "run")])
    for name in names:
        assert name in str(err.value)
    assert "Fix:" in str(err.value)
    assert not (tmp_path / "run").exists()

"""alignkit.speedups.shared_prompt: DPO pairs through one prompt forward give trl's two-row log-probs and gradients."""

import inspect

import pytest
import torch
from conftest import REPO, log_history, run_recipe, write_jsonl
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from alignkit.speedups import shared_prompt
from alignkit.speedups.attention import use_fast_attention
from alignkit.speedups.lm_head import use_cpu_lm_head
from alignkit.testing import tiny_model_path

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _pairs():
    """Prompts of 1..6 tokens, chosen/rejected of 1..5 (so rows pad differently), pad id 0."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"prompt_ids": rand(p), "chosen_ids": rand(c), "rejected_ids": rand(r)}
        for p, c, r in [(6, 2, 5), (1, 1, 1), (4, 5, 2), (3, 3, 3)]
    ]


def _model(task_type=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    add_fused_lm_head(model, outputs=OUTPUTS)
    model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type=task_type),
    )
    for name, p in model.named_parameters():  # a non-zero adapter, so its gradients flow everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    assert use_fast_attention(model) == "sdpa_per_document"
    return model


def _score(model, inputs, shared: bool):
    base = model.get_base_model()
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    model.zero_grad()
    if shared:
        settings = shared_prompt._fused_settings(base.forward)
        batch = shared_prompt.pair_batch(inputs["input_ids"], inputs["attention_mask"], labels)
        assert settings is not None and batch is not None
        out = shared_prompt._shared_forward(base, batch, settings)
    else:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)  # fmt: skip
    (out.log_probs.sum(1) * torch.tensor([1.0, -0.5, 2.0, 0.3] * 2)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _cpu_lm_head(monkeypatch, compact: bool = True):
    """use_cpu_lm_head for this test only (it patches trl's module); ``compact=False``: trl scores every position."""
    from trl.trainer import utils as trl_utils

    for name in ("_ChunkedLogProbFunction", "_use_triton"):
        monkeypatch.setattr(trl_utils, name, getattr(trl_utils, name))
    use_cpu_lm_head()
    if not compact:
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)


@pytest.mark.parametrize("compact,batched", [(True, True), (False, True), (True, False)])
def test_shared_prompt_forward_equals_two_rows(compact, batched, monkeypatch):
    """Log-probs (and the other outputs) and LoRA gradients of the shared-prompt forward equal the two-row forward's;
    ``batched``: the pairs' attention as one padded batch (the default), else one pair at a time (what pairs whose
    mask would pass BATCHED_PAIRS_MAX_MASK take)."""
    from alignkit.speedups import attention

    _cpu_lm_head(monkeypatch, compact)  # compact=False stayed compact once compact=True had patched trl
    monkeypatch.setattr(attention, "_PLAN", [None])
    if not batched:
        monkeypatch.setattr(attention, "BATCHED_PAIRS_MAX_MASK", 0)
    calls = []
    for name in ("_shared_prompt_per_pair", "_pair_plan"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    model = _model()
    inputs = DataCollatorForPreference(pad_token_id=0)(_pairs())
    plain, plain_grads = _score(model, inputs, shared=False)
    shared, shared_grads = _score(model, inputs, shared=True)
    for name in OUTPUTS:
        a, b = getattr(plain, name), getattr(shared, name)
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(plain.label_mask, shared.label_mask)
    assert plain.log_probs.abs().sum() > 0
    assert ("_shared_prompt_per_pair" in calls) != batched and "_pair_plan" in calls
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name, g in plain_grads.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(shared_grads[name], g, atol=1e-5, rtol=1e-4), name


def _fake_dpo_trainer(model):
    """A DPOTrainer shell with what share_prompts touches: its model and the two methods it wraps."""
    import types

    import trl

    trainer = object.__new__(trl.DPOTrainer)
    trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    trainer.model = model
    trainer._compute_loss = lambda model, inputs, return_outputs=False: model(**inputs, fused_lm_head=True)
    trainer.compute_ref_log_probs = lambda model, inputs: None
    return trainer


def test_a_peft_model_takes_the_shared_forward(monkeypatch):
    """PeftModelForCausalLM.forward passes inputs_embeds, output_attentions, output_hidden_states and return_dict (as
    None) down to the base model's forward: those must not send every batch back to trl's two-row forward."""
    _cpu_lm_head(monkeypatch)
    model = _model("CAUSAL_LM")  # PeftModelForCausalLM, as alignkit's loader builds it
    trainer = _fake_dpo_trainer(model)
    signature = inspect.signature(model.get_base_model().forward)
    assert shared_prompt.share_prompts(trainer)
    assert inspect.signature(model.get_base_model().forward) == signature  # input_ids first, as generate() reads it
    calls, real = [], shared_prompt._shared_forward
    monkeypatch.setattr(shared_prompt, "_shared_forward", lambda *a: calls.append(1) or real(*a))
    inputs = DataCollatorForPreference(pad_token_id=0)(_pairs())
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels,
              "use_cache": False}  # fmt: skip
    plain = model(**kwargs, fused_lm_head=True)  # outside _compute_loss: trl's forward
    assert not calls
    shared = trainer._compute_loss(model, kwargs)
    assert calls == [1]
    assert torch.allclose(shared.log_probs, plain.log_probs, atol=1e-5)


def test_batches_of_another_shape_are_left_to_trl():
    inputs = DataCollatorForPreference(pad_token_id=0)(_pairs())
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
    assert shared_prompt.pair_batch(ids, mask, labels) is not None
    other = ids.clone()
    other[5, 0] += 1  # the second pair's rejected row has another prompt
    assert shared_prompt.pair_batch(other, mask, labels.where(labels == -100, other)) is None
    assert shared_prompt.pair_batch(ids[:3], mask[:3], labels[:3]) is None  # odd number of rows
    gap = labels.clone()
    gap[0, 7] = -100  # a hole in a completion
    assert shared_prompt.pair_batch(ids, mask, gap) is None
    left = mask.flip(1)  # left padding
    assert shared_prompt.pair_batch(ids, left, labels) is None


def test_dpo_recipe_trains_the_same_with_shared_prompts(tmp_path, monkeypatch, recipe_trainers):
    """The whole DPO stage, default (shared prompts) vs transformers' sdpa (trl's two-row forward): the same losses,
    rewards and evaluation, step by step (LoRA dropout 0: no random masks)."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from stages.test_dpo import _preference_rows

    seen = recipe_trainers
    shared_calls, real_shared = [], shared_prompt._shared_forward
    monkeypatch.setattr(shared_prompt, "_shared_forward", lambda *a: shared_calls.append(1) or real_shared(*a))
    data = write_jsonl(tmp_path / "pref.jsonl", _preference_rows(24, seed=3))
    logs = {}
    for attn in ("auto", "sdpa"):
        out = tmp_path / attn
        argv = ["--model_name_or_path", "tiny:llama", "--load_in_4bit", "false", "--datasets", str(data),
                "--test_size", "8", "--max_length", "64", "--max_steps", "4", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-2", "--eval_strategy", "steps", "--eval_steps", "4", "--seed", "0",
                "--output_dir", str(out), "--disable_tqdm", "true", "--save_steps", "1000",
                "--gradient_checkpointing", "false", "--lora_dropout", "0"]  # fmt: skip
        run_recipe("dpo", argv + ([] if attn == "auto" else ["--attn_implementation", attn]))
        base = seen[-1].accelerator.unwrap_model(seen[-1].model).get_base_model()
        assert getattr(base, "_alignkit_shared", False) == (attn == "auto")
        logs[attn] = log_history(out)
        if attn == "auto":  # at least the policy and the reference forward of each of the 4 steps
            assert len(shared_calls) >= 8, len(shared_calls)
            taken = len(shared_calls)
    assert len(shared_calls) == taken  # sdpa: trl's own forward
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "eval_loss"]
    compared = 0
    for a, b in zip(logs["auto"], logs["sdpa"], strict=True):
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
                compared += 1
    losses = [e["loss"] for e in logs["auto"] if "loss" in e]
    assert compared >= 20 and losses[-1] < losses[0]

"""alignkit.speedups.reference: trl's 'ref' copy of a fresh LoRA adapter is deleted (the reference pass then runs the
base model, as trl does without one) and the DPO run is the same bit for bit; any other 'ref' adapter is kept."""

import sys

import pytest
import torch
from conftest import REPO, log_history, run_recipe, write_jsonl
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alignkit import speedups
from alignkit.speedups import reference
from alignkit.speedups.reference import REF, zero_ref_adapter
from alignkit.testing import tiny_model_path


def _with_ref(config: LoraConfig, trained_b: bool = False, embeddings: bool = False):
    """A PeftModel on the tiny Llama with trl 1.16's 'ref' copy of its adapter, made as DPOTrainer makes it
    (``add_adapter`` then ``copy_`` of every ``.default.`` parameter)."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")), config)
    if trained_b:
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                torch.nn.init.normal_(p, std=0.01)
    model.add_adapter(REF, config)
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    return model


def _lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


@pytest.mark.parametrize(
    "config,trained,expected",
    [
        (_lora(), False, True),  # a fresh adapter: lora_B zero
        (LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), False, True),  # embeddings: lora_embedding_A zero
        (_lora(), True, False),  # a continued (trained) adapter
        (LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), True, False),
    ],
)
def test_only_an_adapter_that_adds_nothing_counts_as_zero(config, trained, expected):
    """Zero exactly when the reference pass with the copy gives the base model's logits bit for bit."""
    model = _with_ref(config, trained_b=trained)
    assert zero_ref_adapter(model) is expected
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        model.set_adapter(REF)
        with_ref = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(with_ref, base) is expected


@pytest.mark.parametrize("config", [_lora(use_dora=True), _lora(modules_to_save=["lm_head"])])
def test_other_adapter_kinds_are_kept(config):
    """DoRA (a magnitude vector, not a product with a zero factor) and ``modules_to_save`` (a copy of a whole
    module, trained with the adapter) are not judged: the copy stays, as trl made it."""
    assert not zero_ref_adapter(_with_ref(config))


def test_a_poisoned_factor_is_not_zero():
    """lora_B zero but lora_A with a NaN: peft's output is NaN there, the base model's is not."""
    model = _with_ref(_lora())
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A.ref" in n)[0, 0] = float("nan")
    assert not zero_ref_adapter(model)


def test_dpo_on_a_new_adapter_drops_the_copy_and_trains_the_same(tmp_path, recipe_trainers):
    """The DPO recipe on a new adapter, with and without the row: the row ran (trl's 'ref' adapter is gone, the
    trained one stays active) and every logged loss, reward, log-prob and evaluation figure is the same, bit for bit
    (the reference log-probs are the base model's either way; LoRA dropout 0)."""
    sys.path.insert(0, str(REPO / "tests"))
    from stages.test_dpo import _preference_rows

    seen = recipe_trainers
    data = write_jsonl(tmp_path / "pref.jsonl", _preference_rows(16, seed=5))
    others = "[" + ",".join(n for n in speedups.NAMES if n != "zero_ref_adapter") + "]"
    logs, kept = {}, {}
    for name, choice in (("row", "auto"), ("without", others)):
        out = tmp_path / name
        run_recipe("dpo", ["--model_name_or_path", "tiny:llama", "--load_in_4bit", "false", "--datasets", str(data),
                           "--test_size", "4", "--max_length", "64", "--max_steps", "3",
                           "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--eval_strategy", "steps",
                           "--eval_steps", "3", "--seed", "0", "--output_dir", str(out), "--disable_tqdm", "true",
                           "--save_steps", "1000", "--lora_dropout", "0", "--speedups", choice])  # fmt: skip
        model = seen[-1].accelerator.unwrap_model(seen[-1].model)
        fast = getattr(model.disable_adapter, "func", None) is reference.disable_lora_adapter
        kept[name] = (REF in model.peft_config, model.active_adapter, fast)
        logs[name] = log_history(out)
    assert kept == {"row": (False, "default", True), "without": (True, "default", False)}, kept
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "eval_loss"]
    compared = 0
    for a, b in zip(logs["row"], logs["without"], strict=True):
        for key in keys:
            if key in a:
                assert a[key] == b[key], (key, a, b)
                compared += 1
    assert compared >= 14
    losses = [e["loss"] for e in logs["row"] if "loss" in e]
    assert losses[-1] < losses[0] and any(e.get("rewards/margins", 0) != 0 for e in logs["row"])


def test_a_copy_whose_dropout_draws_random_numbers_is_kept():
    """lora_dropout > 0 where trl keeps dropout (GRPO/RLOO: disable_dropout false): the copy's dropout draws from
    torch's generator in every training-mode reference pass, so deleting it shifts every later draw (the sampling, the
    policy's dropout masks; found in review: an RLOO run's step-2 reward 0.7968 with the row, 0.7238 without). With
    trl's disable_dropout (p = 0, DPO's and KTO's default) the copy is dropped."""
    from trl.trainer.utils import disable_dropout_in_model

    model = _with_ref(_lora(lora_dropout=0.05))
    model.train()
    ids = torch.randint(3, 200, (2, 12))
    draws = {}
    for mode in ("ref", "disabled"):
        torch.manual_seed(0)
        with torch.no_grad():
            if mode == "ref":
                model.set_adapter(REF)
                model(input_ids=ids)
                model.set_adapter("default")
            else:
                with model.disable_adapter():
                    model(input_ids=ids)
        draws[mode] = torch.rand(4)
    assert not torch.equal(draws["ref"], draws["disabled"])
    assert not zero_ref_adapter(model)
    disable_dropout_in_model(model)
    assert zero_ref_adapter(model)


@pytest.mark.parametrize("state", ["enabled", "disabled", "irregular"])
def test_disable_adapter_without_the_status_report_does_what_peft_does(state):
    """disable_lora_adapter vs peft's own ``disable_adapter`` on the same model, from each starting state: inside,
    every layer disabled and the base model's logits; after, the same layer flags, ``_adapters_disabled`` and
    warning as peft's."""
    import warnings

    from peft.tuners.tuners_utils import BaseTunerLayer

    from alignkit.speedups.reference import disable_lora_adapter

    model = _with_ref(_lora(), trained_b=True)
    model.delete_adapter(REF)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ids = torch.randint(3, 200, (2, 12))
    outcomes = []
    for context in (model.disable_adapter, lambda: disable_lora_adapter(model)):
        for i, layer in enumerate(layers):
            layer.enable_adapters(state == "enabled" or (state == "irregular" and i % 2 == 0))
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            with context():
                inside = (
                    all(layer.disable_adapters for layer in layers),
                    model._adapters_disabled,
                    model(input_ids=ids).logits,
                    {n: p.requires_grad for n, p in model.named_parameters()},
                )
        after = (
            [layer.disable_adapters for layer in layers],
            model._adapters_disabled,
            {n: p.requires_grad for n, p in model.named_parameters()},
        )
        outcomes.append((inside, after, [str(w.message) for w in caught if "adapter layers" in str(w.message)]))
    (peft_inside, peft_after, peft_warned), (mine_inside, mine_after, mine_warned) = outcomes
    assert peft_inside[:2] == mine_inside[:2] == (True, True) and torch.equal(peft_inside[2], mine_inside[2])
    assert peft_inside[3] == mine_inside[3]  # every parameter's requires_grad, inside and (in after) after
    assert peft_after == mine_after and peft_warned == mine_warned
    assert bool(peft_warned) == (state == "irregular")


def test_one_walk_finds_the_modules_in_modules_order():
    """modules_in_order is ``list(root.modules())``: the same modules once each, in the same order, with a module
    shared between two parents and a child registered as None."""
    from alignkit.speedups.reference import modules_in_order

    model = _with_ref(_lora(), trained_b=True)
    shared = torch.nn.Linear(2, 2)
    model.base_model.model.model.layers[0].extra = shared
    model.base_model.model.model.layers[1].extra = shared
    model.base_model.model.model.layers[1].register_module("nothing", None)
    assert [id(m) for m in modules_in_order(model)] == [id(m) for m in model.modules()]


def test_a_lora_bias_warns_inside_disable_adapter_as_peft_does():
    """peft's ``disable_adapter_layers`` warns when the active adapter trains biases (LoraConfig ``bias``); the one
    walk keeps that warning, word for word, and the same parameters trainable after."""
    import warnings

    from alignkit.speedups.reference import disable_lora_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path("llama")), _lora(bias="lora_only"))
    messages, grads = [], []
    for context in (model.disable_adapter, lambda: disable_lora_adapter(model)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with context():
                pass
        messages.append([str(w.message) for w in caught if "bias configured" in str(w.message)])
        grads.append({n: p.requires_grad for n, p in model.named_parameters()})
    assert messages[0] and messages[0] == messages[1]
    assert grads[0] == grads[1]

"""alignkit.speedups.norm: a Llama-form RMSNorm as one autograd node gives the same outputs and gradients bit for bit
(frozen or trained weight, with and without CPU bf16 autocast), applies to the norms that run that code and no
other, and leaves a recipe's every logged loss unchanged."""

import copy

import pytest
import torch
from conftest import log_history, run_recipe
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alignkit import speedups
from alignkit.runs import RunRecord
from alignkit.speedups.norm import fuse_rms_norms, is_llama_rms_norm
from alignkit.testing import tiny_model_path


def _fused(module):
    return getattr(module.__dict__.get("forward"), "__func__", None) is not None


@pytest.mark.parametrize("trained_weight", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_one_node_gives_the_same_output_and_gradients_bit_for_bit(trained_weight, autocast, residual):
    """``residual``: x also feeds a later add (as in a decoder layer), so x's gradient sums three terms: their order
    is autograd's (float addition is not associative)."""
    torch.manual_seed(0)
    upstream = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        upstream.weight.uniform_(0.5, 1.5)
    upstream.weight.requires_grad_(trained_weight)
    fused = copy.deepcopy(upstream)
    assert fuse_rms_norms(fused) == 1 and _fused(fused)
    x0, grad = torch.randn(3, 9, 64) * 3, torch.randn(3, 9, 64)
    results = []
    for module in (upstream, fused):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = module(x)
        assert (type(out.grad_fn).__name__ == "RMSNormBackward") is (module is fused)
        (out * 1.7 + x if residual else out).backward(grad)
        results.append((out, x.grad, module.weight.grad))
    (out_a, gx_a, gw_a), (out_b, gx_b, gw_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert (gw_a is None and gw_b is None) if not trained_weight else torch.equal(gw_a, gw_b)


def test_no_grad_and_bf16_inputs_run_the_modules_own_forward():
    norm = LlamaRMSNorm(16)
    fuse_rms_norms(norm)
    x = torch.randn(2, 16, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(norm(x), LlamaRMSNorm.forward(norm, x))
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    out = norm(xb)
    assert type(out.grad_fn).__name__ != "RMSNormBackward" and torch.equal(out, LlamaRMSNorm.forward(norm, xb))


def test_the_norms_that_run_llamas_code_are_fused_and_no_other():
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"))
    layers = llama.config.num_hidden_layers
    assert fuse_rms_norms(llama) == 2 * layers + 1
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))  # fmt: skip
    assert fuse_rms_norms(qwen3) == 2 * 2 + 1 + 2 * 2  # q_norm/k_norm too (bf16 inputs there take their own path)
    gemma = AutoModelForCausalLM.from_pretrained(tiny_model_path("gemma3"))  # x * (1 + w): another formula
    assert fuse_rms_norms(gemma) == 0
    assert not any(is_llama_rms_norm(m) for m in gemma.modules())


@pytest.mark.parametrize("use_peft", ["true", "false"])
def test_sft_trains_the_same_with_and_without_the_row(tmp_path, recipe_trainers, use_peft):
    """The SFT recipe (LoRA with frozen norms; full fine-tuning with trained ones), with and without the row: the row
    ran (recorded, the norms fused) and every logged training and evaluation loss is equal bit for bit."""
    others = "[" + ",".join(n for n in speedups.NAMES if n != "fused_rms_norm") + "]"
    logs = {}
    for name, choice in (("row", "auto"), ("without", others)):
        out = tmp_path / name
        run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--use_peft", use_peft,
                           "--test_size", "4", "--eval_strategy", "steps", "--eval_steps", "3", "--max_steps", "3",
                           "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "0", "--save_steps", "1000",
                           "--disable_tqdm", "true", "--output_dir", str(out), "--speedups", choice])  # fmt: skip
        model = recipe_trainers[-1].model
        fused = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
        assert fused and all(_fused(m) for m in fused) is (name == "row")
        assert ("fused_rms_norm" in RunRecord.read(out).last.speedups.get("trainer", [])) is (name == "row")
        logs[name] = [(e.get("loss"), e.get("eval_loss"), e.get("grad_norm")) for e in log_history(out)]
    assert logs["row"] == logs["without"], logs
    losses = [loss for loss, _, _ in logs["row"] if loss is not None]
    assert len(losses) == 3 and losses[-1] < losses[0]

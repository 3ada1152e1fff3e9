"""RMSNorm as one autograd node: the same forward ops and the same gradient, bit for bit, without autograd's graph of
them.

transformers 5.23's ``LlamaRMSNorm.forward`` (and every family that copies it: Qwen2/3, Mistral, SmolLM2, ...)

    h = x.to(float32); r = rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); return weight * (h * r).to(x.dtype)

records five autograd nodes per call (pow, mean, add, rsqrt and two multiplies) and their backward runs ~20 ATen ops
with the engine's bookkeeping around each; a decoder layer has two such norms, so SmolLM2-135M's 30 layers run 61
per forward. :class:`RMSNorm` runs the same forward ops under one node and, in its backward, the very formulas
autograd's derivatives run for them (``derivatives.yaml``: mul's ``grad * other`` summed to the operand's shape,
rsqrt's ``-0.5 * grad * result.pow(3)``, mean's ``expand / numel``, pow's ``grad * (2 * self.pow(1))``, the two
paths into ``h`` added): the same values in the same order, so outputs and gradients are equal bit for bit (tests
check it with a frozen and a trained weight, with and without CPU bf16 autocast, and on a recipe's logged losses).

It applies to a module whose class's ``forward`` is that code (compared by bytecode, constants and names), with an
fp32 input and weight, while a gradient is being recorded; everything else (no_grad passes, bf16 inputs, another
norm such as Gemma's ``x * (1 + w)``) runs the module's own forward. Measured (benchmarks/README.md, session 16):
forward and backward of one SmolLM2 norm on 331 tokens ~1.7x faster.
"""

from __future__ import annotations

import types

import torch


class RMSNorm(torch.autograd.Function):
    """x: (..., H) fp32, passed twice (``apply(x, x, weight, eps)``); weight: (H,) fp32; eps: float. Returns fp32
    (..., H) = weight * (x * rsqrt(mean(x^2) + eps)), as ``LlamaRMSNorm.forward`` computes it; the backward gives the
    gradients autograd gives for those ops. x's gradient has two terms (through the multiply by r and through the
    square); autograd adds each into x's gradient buffer on its own, after what the later consumers of x (the
    residual add) put there, and float addition is not associative: x is passed twice so that each term comes back
    on its own edge, the multiply's first, and the buffer sums them in autograd's order."""

    @staticmethod
    def forward(ctx, x, x_again, weight, eps: float):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        n = x * r
        ctx.save_for_backward(x, r, n, weight)
        return weight * n

    @staticmethod
    def backward(ctx, grad):
        x, r, n, weight = ctx.saved_tensors
        need_x, _, need_w = ctx.needs_input_grad[:3]
        through_mul = through_pow = grad_w = None
        if need_w:  # out = weight * n: weight's gradient is grad * n, summed to its shape
            grad_w = (grad * n).sum_to_size(weight.shape)
        if need_x:
            grad_n = grad * weight
            through_mul = grad_n * r  # n = x * r
            grad_r = (grad_n * x).sum_to_size(r.shape)
            grad_mean = -0.5 * grad_r * r.pow(3)  # rsqrt's derivative (through the + eps)
            grad_sq = grad_mean.expand(x.shape) / x.shape[-1]  # mean over the last dim
            through_pow = grad_sq * (2 * x)  # pow's 2 * x.pow(1), which is 2 * x exactly
        return through_mul, through_pow, grad_w, None


def _llama_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """True when ``module``'s class runs ``LlamaRMSNorm.forward``'s code (its own or a family's copy of it) and the
    module has the attributes that code reads (``weight`` a parameter, ``variance_epsilon`` a float)."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    llama = _llama_code()
    if code is None or (code.co_code, code.co_consts, code.co_names) != (
        llama.co_code,
        llama.co_consts,
        llama.co_names,
    ):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.nn.Parameter) and isinstance(getattr(module, "variance_epsilon", None), float)


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        torch.is_grad_enabled()
        and hidden_states.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device == hidden_states.device
        and (hidden_states.requires_grad or weight.requires_grad)
    ):
        return RMSNorm.apply(hidden_states, hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Give every Llama-form RMSNorm of ``model`` the one-node forward (on the instance; idempotent). Returns how many
    modules now have it."""
    count = 0
    for module in model.modules():
        if is_llama_rms_norm(module):
            if getattr(module.__dict__.get("forward"), "__func__", None) is not _forward:
                module.forward = types.MethodType(_forward, module)
            count += 1
    return count

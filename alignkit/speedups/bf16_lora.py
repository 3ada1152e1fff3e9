"""peft's LoRA ``Linear`` under CPU bf16 autocast without its per-step casts: the frozen base weight cast to bf16 once
(not in every forward), the layer input cast once for the base GEMM, the adapter and the sibling layers reading the
same input, dropout on bf16 with a mask from 16 random bits per element instead of ``bernoulli_``.

Under ``torch.autocast("cpu", torch.bfloat16)`` (what a ``bf16: true`` trainer wraps its forward in; alignkit's
``dtype: auto`` on a CPU with bf16 units) peft 0.21's ``lora.Linear.forward`` does, per LoRA layer and forward:

- ``base_layer(x)``: autocast casts the frozen fp32 weight to bf16. autocast caches only casts of leaf tensors that
  require grad, and only until the autocast region exits, so the whole frozen backbone is read in fp32 and written in
  bf16 again every step (SmolLM2-135M: 106M values), and a frozen adapter, or trl's 'ref' copy in DPO/KTO's
  reference pass, goes through ``nn.Linear`` and autocast's cast in every forward;
- ``x = self._cast_input_dtype(x, lora_A.weight.dtype)``: the input goes to the adapter's fp32 (a copy where it is
  bf16: o_proj and down_proj take bf16 activations), dropout runs in fp32 (``bernoulli_``: one uniform double per
  element, ~10 ns each on one core: 2.1-3.1 s of a SmolLM2 step at 1 thread, 13-18% of it), and autocast casts the
  dropped-out input to bf16 again for lora_A's GEMM; q/k/v_proj (and gate/up_proj) each cast the same input.

Here, on CPU under bf16 autocast only, for plain LoRA (no DoRA or other variant, no ``adapter_names``, not merged,
a plain ``nn.Linear`` base without hooks): the base GEMM takes a bf16 copy of the frozen weight kept on the layer
(made when the weight first appears and again whenever it changes: another storage, an in-place write, an adapter
merge), as does a frozen adapter's GEMM; the input is cast to bf16 once (:func:`bf16_input`, shared with the sibling
layers that read the same tensor), and the adapter branch runs on that bf16 input with dropout as a 0/1 mask
(:func:`keep_mask`; exact in bf16), the dropout's 1/(1-p) folded into the adapter's scale, and the scale applied to
lora_A's (tokens, r) output instead of lora_B's (tokens, out_features) one (the same product). With adapters disabled
(trl's reference pass on a model without a 'ref' copy) the layer is the base GEMM alone, as in peft. A layer whose
one active adapter is being trained (grad mode on; plain bias-free lora_A/lora_B, the base bias frozen) runs as one
autograd node (:class:`LoraLinear`: its forward and backward GEMMs written out, the adapter's product added inside
lora_B's GEMM) instead of the ~20 nodes autograd records for peft's ops. Everything else (every fp32 run, GPU tensors,
merged adapters, variants) goes to peft's own forward.

The same mathematics: the base GEMM gets the very bf16 values autocast would make (round-to-nearest of the same fp32
weight: the same output bit for bit), and so does a frozen adapter's; trained adapter weights, their gradients and
the optimizer stay fp32 (autocast casts lora_A/lora_B per forward as before); dropout keeps each input with
probability 1-p (p rounded to a multiple of 2^-16, see :func:`keep_mask`) and divides by that probability; the
adapter branch rounds its input to bf16 before the dropout instead of after, a trained layer's output (and its input
gradient) is rounded to bf16 once where peft rounds the base and adapter terms before adding them, and the layer
input's gradients (base, adapter, sibling layers) are summed in bf16 before the one cast back (peft: each cast back,
summed in fp32).
Proven against peft's path and fp32 on the same batch, and in a recipe run: tests/speedups/test_bf16_lora.py.
"""

from __future__ import annotations

import weakref

import torch

_BF16 = torch.bfloat16


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """True when ``x`` is a CPU tensor and CPU autocast runs bf16 here."""
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == _BF16


def frozen_bf16_weight(layer) -> torch.Tensor:
    """The bf16 copy of ``layer.base_layer.weight`` (frozen, fp32), kept on ``layer`` and made again when the weight's
    storage, version counter or the layer's merged adapters change."""
    return _kept_bf16(layer, "_alignkit_bf16_weight", layer.base_layer.weight, tuple(layer.merged_adapters))


def _kept_bf16(owner, attr: str, weight: torch.Tensor, extra=()) -> torch.Tensor:
    """``weight.to(bf16)``, kept on ``owner`` under ``attr`` until the weight's storage, version counter or shape (or
    ``extra``) change: the very values autocast would make, made once instead of every forward."""
    key = (weight.data_ptr(), weight._version, weight.shape, extra)
    kept = getattr(owner, attr, None)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, weight.detach().to(_BF16))
        setattr(owner, attr, kept)
    return kept[1]


_last_input: tuple = ()  # (weakref to the input, its version, grad mode, its bf16 cast)


def bf16_input(x: torch.Tensor) -> torch.Tensor:
    """``x.to(bf16)``, shared by the sibling layers that read the same input in one forward (q/k/v_proj read one
    hidden state, gate/up_proj another): the cast is made once per input tensor, again if ``x`` changes in place or
    the grad mode differs; autograd sums the siblings' input gradients in bf16 and casts them back once. The last
    cast is held here until the next one (one activation: SmolLM2, 1,237 tokens: 1.4 MB)."""
    global _last_input
    if x.dtype == _BF16:
        return x
    grad, last = torch.is_grad_enabled(), _last_input  # one read of the slot: another thread may replace it
    if last and last[0]() is x and last[1] == x._version and last[2] == grad:
        return last[3]
    xb = x.to(_BF16)
    _last_input = (weakref.ref(x), x._version, grad, xb)
    return xb


MASK_BITS = 16  # random bits per dropout decision where p rounds finely enough (see keep_mask)


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask: a bool tensor of ``shape``, each element False (dropped) with probability ``p`` rounded
    to a multiple of 2^-16 (2^-32 where that rounding would move p by more than 1e-3 of itself: p < 0.0077 or
    1 - p < 0.0077), independently; and the probability of True, 1 - that p (what the kept values are divided by, so
    the dropout stays unbiased). At p = 0.05 (alignkit's default ``lora_dropout``) the rounded p is 0.0500031.
    Uniform random bits are drawn 64 at a time from torch's CPU generator (its seeded stream), 16 per element: ~8x
    fewer than ``bernoulli_`` (one uniform double, two 32-bit draws, per element; SmolLM2's 210 LoRA inputs per step
    were 2.1 of 12.6 s of a bf16 step at 1 thread) and half of 32-bit decisions (0.40 s of a 3.07 s step at 2
    threads, benchmarks/bf16_step.py)."""
    n = 1
    for d in shape:
        n *= d
    bits, dtype = MASK_BITS, torch.int16
    if min(p, 1 - p) * 2**bits < 0.5e3:  # the rounding to 2^-16 would move p by more than 1e-3 of itself
        bits, dtype = 32, torch.int32
    per_draw = 64 // bits
    draws = torch.empty((n + per_draw - 1) // per_draw, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits
    threshold = min(round(p * 2**bits), 2**bits - 1)  # p within 2^-33 of 1 still keeps something
    mask = draws.view(dtype)[:n].view(shape) >= threshold - 2 ** (bits - 1)
    return mask, 1.0 - threshold / 2**bits


def _fast(layer, x, args, kwargs) -> bool:
    """This call can take the bf16 path (see the module docstring)."""
    if args or kwargs or not cpu_bf16_autocast(x) or layer.merged or torch.is_inference_mode_enabled():
        return False  # inference tensors have no version counter (and a kept copy made there cannot train)
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or base.weight.dtype != torch.float32:
        return False
    if "forward" in base.__dict__ or base._forward_hooks or base._forward_pre_hooks:  # e.g. accelerate's offload hooks
        return False
    return not any(a in layer.lora_variant for a in layer.active_adapters)


def bf16_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """peft ``lora.Linear.forward`` for plain LoRA under CPU bf16 autocast. x: (..., in_features), any float dtype.
    Returns bf16 (..., out_features), as peft's forward returns under autocast."""
    base = layer.base_layer
    xb = bf16_input(x)
    bias = None if base.bias is None else base.bias.to(_BF16)
    name = _trained_alone(layer)
    if name is not None:
        dropout, scale, mask = layer.lora_dropout[name], layer.scaling[name], None
        if type(dropout) is torch.nn.Dropout and dropout.training and dropout.p > 0:
            keep_bool, keep = keep_mask(xb.shape, dropout.p)
            mask, scale = keep_bool.to(_BF16), scale / keep
        lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return LoraLinear.apply(xb, frozen_bf16_weight(layer), bias, lora_a, lora_b, mask, scale)
    result = torch.nn.functional.linear(xb, frozen_bf16_weight(layer), bias)
    if layer.disable_adapters:
        return result
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout, scale = layer.lora_dropout[name], layer.scaling[name]
        h = xb
        if type(dropout) is torch.nn.Dropout and dropout.training and 0 < dropout.p < 1:
            mask, keep = keep_mask(xb.shape, dropout.p)
            h = xb * mask.to(_BF16)  # 0/1: exact in bf16 (a bf16 mask: no cast inside mul, forward or backward)
            scale = scale / keep  # the dropout's 1/keep
        elif type(dropout) is not torch.nn.Identity and not (type(dropout) is torch.nn.Dropout and dropout.p == 0):
            h = dropout(xb)  # p = 0 (trl's disable_dropout) is the identity: no call, no copy
        down = _adapter_linear(layer.lora_A[name], h) * scale  # scaled at rank r, not out_features
        result = result + _adapter_linear(layer.lora_B[name], down)
    return result


def _trained_alone(layer) -> str | None:
    """The one active adapter's name when this call trains it alone (grad mode on, its lora_A/lora_B plain bias-free
    ``nn.Linear``s with trainable weights and no hooks; the base bias frozen), so :class:`LoraLinear` can run the
    layer; else None."""
    if not torch.is_grad_enabled() or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A:
        return None
    base_bias = layer.base_layer.bias
    if base_bias is not None and base_bias.requires_grad:
        return None
    for m in (layer.lora_A[name], layer.lora_B[name]):
        if type(m) is not torch.nn.Linear or m.bias is not None or not m.weight.requires_grad:
            return None
        if m._forward_hooks or m._forward_pre_hooks or m.weight.dtype != torch.float32:
            return None
    dropout = layer.lora_dropout[name]
    if type(dropout) is torch.nn.Identity or (type(dropout) is torch.nn.Dropout and dropout.p < 1):
        return name
    return None


class LoraLinear(torch.autograd.Function):
    """One trained LoRA layer, forward and backward, as one autograd node: out = x W^T + b + (s (x*m) A^T) B^T.

    xb: (..., in) bf16; weight: (out, in) bf16 (the kept frozen copy); bias: (out,) bf16 or None (frozen); lora_a:
    (r, in) and lora_b: (out, r) fp32 trainable; mask: (..., in) bf16 0/1 or None; scale: float (peft's scaling,
    divided by the dropout's keep probability). Returns bf16 (..., out).

    The GEMMs are those autocast runs (bf16 operands, fp32 accumulation inside the kernel, bf16 results): the
    adapter's fp32 weights cast once per forward, their gradients computed in bf16 and returned fp32 (autocast's
    cast back), the adapter's product added inside lora_B's GEMM (``addmm``: one rounding, where peft rounds the base
    and adapter outputs before adding them) and the input gradient's two terms likewise. What autograd would record as
    ~20 nodes per layer (casts, views, transposes, the dropout and scale multiplies, the add) is one. Under reentrant
    gradient checkpointing the first forward runs without grad (peft's two roundings, kept weight copies) and the
    recomputation with it (this one): the two differ by bf16 rounding of the layer output only."""

    @staticmethod
    def forward(ctx, xb, weight, bias, lora_a, lora_b, mask, scale: float):
        x2 = xb.reshape(-1, xb.shape[-1])
        a, b = lora_a.to(_BF16), lora_b.to(_BF16)
        h = x2 if mask is None else x2 * mask.reshape(x2.shape)
        down = torch.mm(h, a.t()).mul_(scale)  # (N, r): scaled at rank r, not out_features
        out = torch.nn.functional.linear(x2, weight, bias).addmm_(down, b.t())
        ctx.save_for_backward(h, None if mask is None else mask.reshape(x2.shape), weight, a, b, down)
        ctx.scale, ctx.xshape = scale, xb.shape
        return out.view(*xb.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        h, mask, weight, a, b, down = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1]).to(_BF16)
        grad_a = grad_b = grad_x = None
        if need_b:
            grad_b = torch.mm(g.t(), down).float()  # (out, r)
        gd = torch.mm(g, b).mul_(ctx.scale)  # (N, r)
        if need_a:
            grad_a = torch.mm(gd.t(), h).float()  # (r, in)
        if need_x:
            if mask is None:
                grad_x = torch.mm(g, weight).addmm_(gd, a)
            else:
                grad_x = torch.mm(g, weight).add_(torch.mm(gd, a).mul_(mask))
            grad_x = grad_x.view(ctx.xshape)
        return grad_x, None, None, grad_a, grad_b, None, None


def _adapter_linear(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An adapter's ``nn.Linear`` on bf16 ``h``: being trained (a weight that requires grad, grad mode on) as autocast
    runs it (its fp32 weight cast in the forward, its gradient fp32); otherwise (a frozen adapter; trl's 'ref' copy in
    DPO/KTO's reference pass, which peft's ``set_adapter`` marks trainable while it is active; evaluation under
    ``torch.no_grad``) with a kept bf16 copy of its weight, the same values autocast would make. The copy is made again
    when the weight changes: a new storage or version counter, or an optimizer step that holds the weight (fused
    optimizers, transformers' default ``adamw_torch_fused``, write weights in place without a new version; counted
    for frozen weights too, which may be unfrozen, trained and frozen again)."""
    weight = module.weight
    trainable = weight.requires_grad
    if (trainable and torch.is_grad_enabled()) or type(module) is not torch.nn.Linear:
        return module(h)
    counting = _count_optimizer_steps()  # a frozen weight may be trained later (unfrozen) and frozen again
    if module._forward_hooks or module._forward_pre_hooks or (trainable and not counting):
        return module(h)
    extra = (_steps(weight),)
    bias = None if module.bias is None else _kept_bf16(module, "_alignkit_bf16_bias", module.bias, extra)
    return torch.nn.functional.linear(h, _kept_bf16(module, "_alignkit_bf16_weight", weight, extra), bias)


_step_hook: list = []


def _steps(weight: torch.Tensor) -> int:
    """Optimizer steps taken on ``weight`` since :func:`_count_optimizer_steps` began counting."""
    return getattr(weight, "_alignkit_steps", 0)


def _count_optimizer_steps() -> bool:
    """Count, on each parameter, the optimizer steps that hold it from now on (``torch.optim.Optimizer``'s global
    post-step hook: plain, foreach and fused torch optimizers and those built on its ``step`` wrapper; read by
    :func:`_steps`). False the first time (nothing counted before: the caller does not keep a trainable weight this
    once), True after."""
    if _step_hook:
        return True

    def counted(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p._alignkit_steps = _steps(p) + 1

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _step_hook.append(register_optimizer_step_post_hook(counted))
    return False


def _patched_forward(self, x, *args, **kwargs):
    if _fast(self, x, args, kwargs):
        return bf16_lora_forward(self, x)
    return _patched_forward.upstream(self, x, *args, **kwargs)


_patched_forward.alignkit = True
_patched_forward.upstream = None


def use_bf16_lora(trainer) -> bool:
    """Route peft's ``lora.Linear.forward`` through the bf16 path (idempotent) for a trainer that runs CPU bf16
    autocast (``trainer.args.bf16`` without a GPU) on a model with LoRA layers. Returns True when the model has such
    layers (the patch is process-wide, on peft's class; it changes nothing outside CPU bf16 autocast)."""
    from peft.tuners.lora import layer as lora_layer

    if not getattr(trainer.args, "bf16", False) or torch.cuda.is_available():
        return False
    if not any(isinstance(m, lora_layer.Linear) for m in trainer.model.modules()):
        return False
    current = lora_layer.Linear.forward
    if not getattr(current, "alignkit", False):
        _patched_forward.upstream = current
        lora_layer.Linear.forward = _patched_forward
    return True


def restore_peft_lora() -> None:
    """Undo :func:`use_bf16_lora` (a run whose ``speedups`` leaves the row out)."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:
        return
    if getattr(lora_layer.Linear.forward, "alignkit", False):
        lora_layer.Linear.forward = lora_layer.Linear.forward.upstream

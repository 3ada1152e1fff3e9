"""A CPU path for trl's fused LM head: the same per-token log-probabilities, entropy and top-1 flags, in native kernels.

trl 1.16 scores every trainer's tokens through ``trl.kernels.ChunkedLogProbFunction`` (``add_fused_lm_head``): the
projection in ``[4096, 32768]`` tiles folded into online-logsumexp statistics by a Triton kernel on GPU. Without
Triton (every CPU) the fold runs as ~20 separate elementwise torch ops per tile, forward and backward (multiplies by a
logit scale and temperature of 1.0 included): on SmolLM2-135M's 49152-token vocabulary that was the largest share of an
SFT step (benchmarks/README.md, profile). Here, on CPU only, each chunk of tokens gets its full-vocabulary logits and
ATen's fused ``logsumexp`` / ``softmax``; a chunk is 1024 tokens or as many as keep its fp32 logits within
``CHUNK_BYTES`` (SmolLM2's 49,152 vocabulary: 1024 tokens, 200 MB; Gemma 3's 262,144: 256 tokens, 256 MiB), so the
head's memory does not grow with the vocabulary; the backward recomputes the chunk's logits, as trl does (or reuses the
forward's probabilities while all of them fit in ``KEEP_PROBS_BYTES``), so memory stays bounded. Anything else (GPU, logit softcapping) goes to trl's own
function.

Precision: under CPU bf16 autocast (what a ``bf16: true`` trainer runs in; alignkit's ``dtype: auto`` on a CPU with
bf16 units) the projections (logits, their recomputation and the input gradient) run as bf16 GEMMs (fp32
accumulation inside the kernel, bf16 results, as autocast runs every other Linear); each chunk's logits are upcast to
fp32 and each token's target logit is recomputed in fp32 (one dot product per token, N x H: the GEMM's rounding of
the one logit log p_t reads directly is not in it) before anything is summed, so logsumexp, softmax, entropy, the log-probs (hence SFT losses and DPO/KTO
per-sequence sums) and the gradient's ``onehot - p`` are fp32, and the weight gradient (a trainable head) is
accumulated across chunks in fp32. Without autocast (or with trl's ``cast_lm_head_to_fp32``, which turns it off
around the call) everything is fp32, as before.

Math (per token, z = logits * scale, p = softmax(z), t = target): log p_t = z_t - logsumexp(z); entropy
H = -sum_j p_j log p_j; is_top1 = argmax(z) == t (the first maximum, as trl); mean_logits = mean_j z_j;
log_sum_sq_probs = log sum_j p_j^2. Gradients: d log p_t / dz_j = 1[j=t] - p_j,
dH / dz_j = -p_j (log p_j + H).
"""

from __future__ import annotations

import torch

TOKEN_CHUNK = 1024
CHUNK_BYTES = 256 << 20  # at most this much fp32 logits per chunk (then fewer than TOKEN_CHUNK tokens)
KEEP_PROBS_BYTES = 1 << 30  # keep the forward's fp32 probabilities for backward up to this size, else recompute them
_FAST_OUTPUTS = {"log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs"}


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for a ``vocab``-row LM head: TOKEN_CHUNK, or fewer so a chunk's fp32 logits fit CHUNK_BYTES."""
    return max(1, min(TOKEN_CHUNK, CHUNK_BYTES // (4 * vocab)))


def cpu_autocast_dtype() -> torch.dtype | None:
    """torch.bfloat16 while CPU autocast runs bf16 here (the head's GEMMs then run in bf16), else None (fp32)."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return None


def _operands(weight, bias, gemm_dtype):
    """The head's weight and bias as the GEMMs take them: cast once per call (not per chunk) to ``gemm_dtype``, or
    fp32. A frozen head (LoRA: the tied embedding; SmolLM2's 49,152 x 576) cast to bf16 is kept with the weight
    until the weight changes (another storage or an in-place write), instead of cast again in every forward and
    backward."""
    dtype = gemm_dtype or torch.float32
    if dtype == weight.dtype or weight.requires_grad:
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    key = (weight.data_ptr(), weight._version, weight.shape, dtype)
    kept = getattr(weight, "_alignkit_cast", None)
    if kept is None or kept[0] != key:
        kept = (key, weight.detach().to(dtype))
        weight._alignkit_cast = kept
    return kept[1], None if bias is None else bias.to(dtype)


def _logits(hidden, weight, bias, scale: float, targets=None, exact=None) -> torch.Tensor:
    """fp32 logits (N, V) of one chunk; ``weight``/``bias`` from :func:`_operands` (bf16 operands: a bf16 GEMM whose
    result is upcast). With ``targets`` (N,) and ``exact`` (the fp32 ``(weight, bias)``), each token's target logit is
    then recomputed in fp32 (one dot product per token) and written over the GEMM's: log p_t reads it directly, so
    bf16's rounding of it (up to ~0.06 for a logit of ~20) is not in the log-prob."""
    with torch.autocast(hidden.device.type, enabled=False):  # the dtype is chosen here (backward has no autocast)
        z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        if exact is not None:
            w32, b32 = exact
            z_t = torch.linalg.vecdot(hidden.float(), w32[targets].float())
            if b32 is not None:
                z_t += b32[targets].float()
            z.scatter_(1, targets[:, None], z_t[:, None])
    return z.mul_(scale) if scale != 1.0 else z


class CpuLogProb(torch.autograd.Function):
    """hidden: (N, H); weight: (V, H); bias: (V,) or None; targets: (N,) int64 in [0, V). Returns fp32 (log_probs (N,),
    entropy (N,) or None, is_top1 (N,) bool or None, mean_logits (N,) or None, log_sum_sq_probs (N,) or None); the
    last three are not differentiable (as in trl). ``grad_enabled``: the caller's ``torch.is_grad_enabled()`` (the
    forward always runs without grad, and ``ctx.needs_input_grad`` reads True under ``torch.no_grad`` too): the
    probabilities are kept for backward only when a backward can come. ``gemm_dtype``: torch.bfloat16 runs the
    projections as bf16 GEMMs (what CpuFirstLogProbFunction passes under CPU bf16 autocast; everything summed stays
    fp32), None: fp32 GEMMs."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, scale: float, want: tuple[str, ...], grad_enabled: bool = True,
        gemm_dtype: torch.dtype | None = None,
    ):  # fmt: skip
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        want_entropy, want_top1 = "entropy" in want, "is_top1" in want
        logprobs = torch.empty(n, dtype=torch.float32)
        entropy = torch.empty(n, dtype=torch.float32) if want_entropy else None
        top1 = torch.empty(n, dtype=torch.bool) if want_top1 else None
        mean_logits = torch.empty(n, dtype=torch.float32) if "mean_logits" in want else None
        log_sum_sq = torch.empty(n, dtype=torch.float32) if "log_sum_sq_probs" in want else None
        log_z = torch.empty(n, dtype=torch.float32)
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        kept = [] if needs_grad and n * weight.shape[0] * 4 <= KEEP_PROBS_BYTES else None
        step = chunk_tokens(weight.shape[0])
        w, b = _operands(weight, bias, gemm_dtype)
        exact = (weight, bias) if gemm_dtype is not None else None  # bf16 GEMMs: the target logits again in fp32
        for s in range(0, n, step):
            e = min(s + step, n)
            z = _logits(hidden[s:e], w, b, scale, targets[s:e], exact)
            t = targets[s:e, None]
            if want_top1:
                top1[s:e] = z.argmax(-1) == targets[s:e]
            if mean_logits is not None:
                mean_logits[s:e] = z.mean(-1)
            log_z[s:e] = torch.logsumexp(z, -1)
            if log_sum_sq is not None:  # log sum_j p_j^2 = logsumexp(2 z) - 2 logsumexp(z)
                log_sum_sq[s:e] = torch.logsumexp(2 * z, -1) - 2 * log_z[s:e]
            logprobs[s:e] = z.gather(1, t).squeeze(1) - log_z[s:e]
            if want_entropy:
                log_p = z.sub_(log_z[s:e, None])
                p = log_p.exp()
                with torch.autocast(hidden.device.type, enabled=False):  # CPU autocast runs vecdot in bf16
                    entropy[s:e] = -torch.linalg.vecdot(p, log_p)
            elif kept is not None:
                p = z.sub_(log_z[s:e, None]).exp_()
            if kept is not None:
                kept.append(p)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy if want_entropy else log_z)
        ctx.scale, ctx.kept, ctx.gemm_dtype = scale, kept, gemm_dtype
        ctx.mark_non_differentiable(*(x for x in (top1, mean_logits, log_sum_sq) if x is not None))
        return logprobs, entropy, top1, mean_logits, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_non_differentiable):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        with maybe_gather_lm_head_ctx(*ctx.saved_tensors[1:3]):  # ZeRO-3 partitions the head outside its forward
            return CpuLogProb._backward(ctx, grad_logprobs, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if need_bias else None
        n = hidden.shape[0]
        kept, ctx.kept = ctx.kept, None
        step = chunk_tokens(weight.shape[0])
        w, b = _operands(weight, bias, ctx.gemm_dtype)  # cast again rather than kept: no second head in memory
        for k, s in enumerate(range(0, n, step)):
            e = min(s + step, n)
            if kept is not None and grad_entropy is None:  # the forward's probabilities: no second projection
                p, kept[k] = kept[k], None
            else:
                exact = (weight, bias) if ctx.gemm_dtype is not None else None
                log_p = _logits(hidden[s:e], w, b, ctx.scale, targets[s:e], exact).sub_(log_z[s:e, None])
                p = log_p.exp()
            grad = None
            if grad_entropy is not None:  # -g_H * p * (log p + H)
                grad = log_p.add_(entropy[s:e, None]).mul_(p).mul_(-grad_entropy[s:e, None].float())
            if grad_logprobs is not None:  # g * (onehot(t) - p)
                g = grad_logprobs[s:e, None].float()
                grad = p.mul_(-g) if grad is None else grad.sub_(p.mul_(g))
                grad.scatter_add_(1, targets[s:e, None], g)
            if grad is None:
                continue
            if ctx.scale != 1.0:
                grad.mul_(ctx.scale)
            if grad_hidden is not None:  # (N, V) @ (V, H): in the forward's GEMM dtype, stored fp32
                grad_hidden[s:e] = grad.to(w.dtype) @ w
            if grad_weight is not None:  # (V, N) @ (N, H), accumulated over chunks in fp32
                if w.dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), hidden[s:e].float())
                else:
                    grad_weight += grad.t().to(w.dtype) @ hidden[s:e].to(w.dtype)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None,
        )  # fmt: skip


class CpuFirstLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` signature and outputs): CpuLogProb on CPU
    tensors without softcapping, trl's function otherwise."""

    upstream = None  # trl's ChunkedLogProbFunction, set by use_cpu_lm_head

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        outputs = tuple(outputs) or ("log_probs",)
        if hidden.device.type != "cpu" or softcap is not None or not set(outputs) <= _FAST_OUTPUTS:
            return cls.upstream.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
        logprobs, entropy, top1, mean_logits, log_sum_sq = CpuLogProb.apply(
            hidden, weight, bias, targets, float(logit_scale) / float(temperature), outputs, torch.is_grad_enabled(),
            cpu_autocast_dtype(),
        )  # fmt: skip
        return logprobs, entropy, log_sum_sq, mean_logits, top1


def use_cpu_lm_head() -> bool:
    """Route trl's fused LM head through CpuFirstLogProbFunction (idempotent; GPU tensors still take trl's Triton
    path). Returns False when this trl has no such hook (then nothing changes)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is None:
        return False
    if current is not CpuFirstLogProbFunction:
        CpuFirstLogProbFunction.upstream = current
        trl_utils._ChunkedLogProbFunction = CpuFirstLogProbFunction
    compact = getattr(trl_utils, "_use_triton", None)
    if compact is not None and not getattr(compact, "alignkit", False):
        # trl scores only the labeled positions where it runs Triton, every position elsewhere (fixed tile shapes for
        # compiling backends): on CPU that is the LM head on prompt and padding tokens for nothing
        def compact_on_cpu(device) -> bool:
            return device.type == "cpu" or compact(device)

        compact_on_cpu.alignkit = True
        compact_on_cpu.upstream = compact
        trl_utils._use_triton = compact_on_cpu
    return True


def fuse_causal_lm_loss(trainer) -> bool:
    """CPT's loss through trl's fused LM head: transformers' ``Trainer`` asks the causal LM for its full
    ``(batch, seq_len, vocab)`` logits and their cross-entropy (Gemma 3's 262,144 tokens at 4 x 256: 1 GiB of fp32
    logits, plus as much again for each of the softmax and its gradient); here ``trainer.compute_loss`` (Trainer's
    own, unchanged: loss kwargs, token averaging across ranks) runs the model with ``fused_lm_head=True``
    (``trl.trainer.utils.add_fused_lm_head`` on the base model, as trl's SFTTrainer does), which scores the labeled
    positions in chunks (on CPU :class:`CpuLogProb`'s, with ``cpu_lm_head``). The same loss: minus the summed
    log-probability of each next token over the labeled positions, divided by ``num_items_in_batch`` or their count.
    Evaluation goes the same way (its "logits" are then the per-token log-probabilities). Returns False (nothing
    changed) when the trainer smooths labels or has its own ``compute_loss_func`` (they need the logits) or the
    model has no output embeddings."""
    from trl.trainer.utils import add_fused_lm_head

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(trainer.compute_loss, "alignkit_fused", False) or base.get_output_embeddings() is None:
        return False
    if trainer.label_smoother is not None or trainer.compute_loss_func is not None:
        return False
    add_fused_lm_head(base, outputs=("log_probs",))
    compute_loss = trainer.compute_loss

    def fused_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs.get("labels") is not None:
            inputs = {**inputs, "fused_lm_head": True}
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    fused_compute_loss.alignkit_fused = True
    trainer.compute_loss = fused_compute_loss
    return True


def restore_trl_lm_head() -> None:
    """Undo :func:`use_cpu_lm_head`: trl's own function and Triton rule again (``speedups`` without cpu_lm_head)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return
    if getattr(trl_utils, "_ChunkedLogProbFunction", None) is CpuFirstLogProbFunction:
        trl_utils._ChunkedLogProbFunction = CpuFirstLogProbFunction.upstream
    compact = getattr(trl_utils, "_use_triton", None)
    if getattr(compact, "alignkit", False):
        trl_utils._use_triton = compact.upstream

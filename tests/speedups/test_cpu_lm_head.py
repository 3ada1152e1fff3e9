"""alignkit.speedups.lm_head: the CPU path gives trl's fused LM head outputs and gradients."""

import contextlib

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from alignkit.speedups import lm_head


@pytest.mark.parametrize("keep_probs", [True, False])  # backward from the forward's probabilities, or recomputed
@pytest.mark.parametrize("entropy_in_loss", [True, False])
@pytest.mark.parametrize("scale, with_bias", [(1.0, False), (0.7, True)])
def test_cpu_path_matches_trls_function(scale, with_bias, entropy_in_loss, keep_probs, monkeypatch):
    monkeypatch.setattr(lm_head, "TOKEN_CHUNK", 7)  # several chunks, the last one partial
    monkeypatch.setattr(lm_head, "KEEP_PROBS_BYTES", 1 << 30 if keep_probs else 0)
    torch.manual_seed(0)
    n, hidden_size, vocab = 19, 16, 300
    hidden = torch.randn(n, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (n,))
    targets[3] = (hidden[3] @ weight.T * scale + (0 if bias is None else bias * scale)).argmax()  # one top-1 hit
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    results = []
    for fn in (ChunkedLogProbFunction, lm_head.CpuFirstLogProbFunction):
        lm_head.CpuFirstLogProbFunction.upstream = ChunkedLogProbFunction
        leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
        h, w, b = leaves[0], leaves[1], leaves[2] if with_bias else None
        lp, ent, _, _, top1 = fn.apply(h, w, b, targets, 1 / scale if scale != 1.0 else 1.0, 128, None, 1.0, outputs)
        (-lp.sum() + (0.3 * ent.sum() if entropy_in_loss else 0.0)).backward()
        results.append((lp.detach(), ent.detach(), top1, [leaf.grad for leaf in leaves]))
    (lp0, ent0, top0, grads0), (lp1, ent1, top1, grads1) = results
    assert torch.allclose(lp1.double(), lp0.double(), atol=1e-5) and torch.allclose(
        ent1.double(), ent0.double(), atol=1e-5
    )
    assert torch.equal(top1, top0) and top1[3]
    for g0, g1 in zip(grads0, grads1, strict=True):
        assert torch.allclose(g1, g0, atol=1e-5, rtol=1e-4)


def test_softcapping_and_gpu_tensors_go_to_trl(monkeypatch):
    calls = []

    class Upstream:
        @staticmethod
        def apply(*args):
            calls.append(args[-1])
            return ("upstream",)

    monkeypatch.setattr(lm_head.CpuFirstLogProbFunction, "upstream", Upstream)
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    assert lm_head.CpuFirstLogProbFunction.apply(h, w, None, t, 1.0, 8, 30.0, 1.0, ("log_probs",)) == ("upstream",)
    h_meta = torch.empty(3, 4, device="meta")  # any non-CPU device
    assert lm_head.CpuFirstLogProbFunction.apply(h_meta, w, None, t, 1.0, 8, None, 1.0, ("log_probs",)) == ("upstream",)
    assert len(calls) == 2


@pytest.mark.parametrize("keep_probs", [True, False])
def test_bf16_autocast_runs_the_gemms_in_bf16_and_sums_in_fp32(keep_probs, monkeypatch):
    """Under CPU bf16 autocast (trl's bf16=True on CPU) the projections are bf16 GEMMs and everything after them fp32:
    the log-probs and both gradients are those of fp32 log-softmax over ``linear(h.bf16(), w.bf16()).float()`` with
    each target's logit recomputed in fp32 (autograd through those casts is the reference). With autocast turned off around the call (trl's
    ``cast_lm_head_to_fp32``) it is the fp32 path, bit for bit."""
    monkeypatch.setattr(lm_head, "TOKEN_CHUNK", 7)  # several chunks, the last one partial
    monkeypatch.setattr(lm_head, "KEEP_PROBS_BYTES", 1 << 30 if keep_probs else 0)
    torch.manual_seed(0)
    hidden, weight = torch.randn(19, 32), torch.randn(300, 32) * 0.5
    targets = torch.randint(0, 300, (19,))

    def run(*contexts):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with contextlib.ExitStack() as stack:
            for c in contexts:
                stack.enter_context(c)
            lp = lm_head.CpuFirstLogProbFunction.apply(h, w, None, targets, 1.0, 128, None, 1.0, ("log_probs",))[0]
        (lp * torch.linspace(-1, 2, 19)).sum().backward()
        return lp.detach(), h.grad, w.grad

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    lp, grad_h, grad_w = run(bf16())
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    z = torch.nn.functional.linear(h.bfloat16(), w.bfloat16()).float()
    z = z.scatter(1, targets[:, None], (h * w[targets]).sum(-1, keepdim=True))  # the target logits in fp32
    reference = z.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (reference * torch.linspace(-1, 2, 19)).sum().backward()
    assert lp.dtype == grad_h.dtype == grad_w.dtype == torch.float32
    assert torch.allclose(lp, reference.detach(), atol=1e-5)
    for ours, ref in ((grad_h, h.grad), (grad_w, w.grad)):  # bf16 GEMM results: equal to a bf16 rounding
        assert (ours - ref).abs().max() <= 1e-2 * ref.abs().max()
    fp32 = run()
    assert (lp - fp32[0]).abs().max() > 1e-4  # the bf16 GEMM ran: the checks above have teeth
    for a, b in zip(run(bf16(), torch.autocast("cpu", enabled=False)), fp32, strict=True):
        assert torch.equal(a, b)


def test_no_probabilities_are_kept_without_grad(monkeypatch):
    """Under torch.no_grad (the reference forward, evaluation) ctx.needs_input_grad still reads True for parameters:
    the forward must not build (exp) and hold the probabilities for a backward that never comes."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    exps, real_exp = [], torch.Tensor.exp_
    monkeypatch.setattr(torch.Tensor, "exp_", lambda self: exps.append(1) or real_exp(self))
    score = lm_head.CpuFirstLogProbFunction.apply
    with torch.no_grad():
        score(hidden, weight, None, targets, 1.0, 1024, None, 1.0, ("log_probs",))
    assert not exps
    score(hidden, weight, None, targets, 1.0, 1024, None, 1.0, ("log_probs",))[0].sum().backward()
    assert exps  # with grad: kept for backward


def test_large_vocabulary_is_scored_in_bounded_chunks(monkeypatch):
    """A 262,144-row head (Gemma 3) gets chunks of 256 tokens (256 MiB of fp32 logits), SmolLM2's 49,152 rows stay at
    1024; with the bound forcing several chunks the log-probabilities and gradients still equal trl's."""
    assert lm_head.chunk_tokens(262_144) == 256 and lm_head.chunk_tokens(49_152) == lm_head.TOKEN_CHUNK
    torch.manual_seed(0)
    n, hidden_size, vocab = 23, 16, 600
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 4 * vocab * 5)  # 5 tokens per chunk, the last one partial
    monkeypatch.setattr(lm_head, "KEEP_PROBS_BYTES", 0)  # backward recomputes each chunk
    shapes, real_logits = [], lm_head._logits
    monkeypatch.setattr(lm_head, "_logits", lambda h, *a: shapes.append(h.shape[0]) or real_logits(h, *a))
    hidden = torch.randn(n, hidden_size, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) * 0.3
    targets = torch.randint(0, vocab, (n,))
    results = []
    lm_head.CpuFirstLogProbFunction.upstream = ChunkedLogProbFunction
    for fn in (ChunkedLogProbFunction, lm_head.CpuFirstLogProbFunction):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = fn.apply(h, w, None, targets, 1.0, 128, None, 1.0, ("log_probs",))[0]
        lp.sum().backward()
        results.append((lp.detach().double(), h.grad, w.grad))
    assert max(shapes) == 5 and len(shapes) == 2 * 5  # forward and backward, 5 chunks each
    for a, b in zip(*results, strict=True):
        assert torch.allclose(b.double(), a.double(), atol=1e-5, rtol=1e-4)


def test_cpt_trains_through_the_fused_head_with_the_same_loss(tmp_path, monkeypatch):
    """CPT (transformers' Trainer) on tiny:gemma3, with the ``cpt_fused_lm_head`` row and without: the same training
    and evaluation losses, and with it the full-vocabulary cross-entropy of the model's own loss never runs (the
    logits are scored in chunks by the fused head instead)."""
    from conftest import run_recipe, train_losses
    from transformers.loss import loss_utils

    from alignkit.runs import RunRecord

    calls, real = [], loss_utils.nn.functional.cross_entropy
    monkeypatch.setattr(loss_utils.nn.functional, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["--config", "recipes/tiny/cpt.yaml", "--model_name_or_path", "tiny:gemma3", "--load_in_4bit", "false",
            "--lora_dropout", "0", "--optim", "sgd", "--learning_rate", "0.5", "--max_steps", "3", "--test_size",
            "0.25", "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
    runs, ce_calls = {}, {}
    for choice in ("[cpt_fused_lm_head]", "none"):
        calls.clear()
        out = runs[choice] = tmp_path / choice.strip("[]")
        run_recipe("cpt", [*argv, "--output_dir", str(out), "--speedups", choice])
        ce_calls[choice] = len(calls)
    assert RunRecord.read(runs["[cpt_fused_lm_head]"]).last.speedups == {"trainer": ["cpt_fused_lm_head"]}
    assert ce_calls == {"[cpt_fused_lm_head]": 0, "none": ce_calls["none"]} and ce_calls["none"] >= 3, ce_calls
    fused, full = (train_losses(runs[c]) for c in ("[cpt_fused_lm_head]", "none"))
    assert len(fused) == 3 and fused == pytest.approx(full, rel=1e-5), (fused, full)
    assert fused[-1] < fused[0], "the loss did not fall: the comparison would prove nothing"
    evals = [RunRecord.read(runs[c]).metrics["eval_loss"] for c in ("[cpt_fused_lm_head]", "none")]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5), evals

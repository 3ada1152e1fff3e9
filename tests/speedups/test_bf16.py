"""bf16 mixed precision on CPU (``torch.autocast("cpu", torch.bfloat16)``, what accelerate wraps a ``bf16=True``
trainer's forward in): every speed-up gives what it gives in fp32 on the same batch and weights, within the stated
tolerance, and the quantities that are summed (log-probs, losses) come back in fp32.

Tolerances: about 10x the largest difference measured on an Intel Xeon with AMX, with oneDNN/MKL/ATen at their best ISA and
capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, where bf16 autocast
runs without bf16 units); each test's docstring gives the figures. bf16 keeps 8 bits of mantissa (relative rounding
2^-9 = 2e-3 per value); on the tiny model per-token log-probs move by ~2e-3.
"""

import pytest
import torch
from speedups.test_shared_prompt import _cpu_lm_head, _model, _pairs, _score
from trl.trainer.dpo_trainer import DataCollatorForPreference

from alignkit.config import AdapterArguments, ModelArguments, QuantizationArguments
from alignkit.models.loader import load_base_model, load_model
from alignkit.speedups.attention import PER_DOCUMENT, use_fast_attention


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _cosine(a: dict, b: dict) -> float:
    """Cosine similarity of two gradient sets, flattened together."""
    x = torch.cat([a[k].flatten().double() for k in sorted(a)])
    y = torch.cat([b[k].flatten().double() for k in sorted(a)])
    return float(x @ y / (x.norm() * y.norm()))


# measured (AMX / capped at AVX2), the LM head's GEMMs in bf16: sums 1.8e-4 / 1.8e-4 relative, margins 0.003 / 0.003,
# gradients cosine 0.99997 / 0.99997 (with the head in fp32 before: 1.8e-4 / 1.8e-4, 0.002 / 0.003, 0.99997)
DPO_SUM_REL, DPO_MARGIN_ABS, GRAD_COSINE = 2e-3, 0.03, 0.999


def test_shared_prompt_dpo_log_prob_sums_in_bf16(monkeypatch):
    """DPO through the shared-prompt forward and the CPU LM head: per-sequence log-prob sums, the chosen - rejected
    margins DPO's loss takes, and the adapter gradients, bf16 autocast vs fp32."""
    _cpu_lm_head(monkeypatch)
    model = _model()
    inputs = DataCollatorForPreference(pad_token_id=0)(_pairs())
    fp32, grads32 = _score(model, inputs, shared=True)
    with bf16():
        half, grads16 = _score(model, inputs, shared=True)
    assert half.log_probs.dtype == torch.float32
    sums32, sums16 = fp32.log_probs.sum(1), half.log_probs.sum(1)
    rel = ((sums16 - sums32).abs() / sums32.abs()).max().item()
    margin32, margin16 = sums32[:4] - sums32[4:], sums16[:4] - sums16[4:]
    margin = (margin16 - margin32).abs().max().item()
    cosine = _cosine(grads32, grads16)
    print(f"DPO bf16 vs fp32: sums {rel:.1e} rel, margins {margin:.3f} abs, gradient cosine {cosine:.5f}")
    assert rel < DPO_SUM_REL and margin < DPO_MARGIN_ABS and cosine > GRAD_COSINE


# measured (AMX / capped at AVX2), the LM head's GEMMs in bf16: loss 2.5e-5 / 1.0e-5 relative, per-token log-probs
# 0.002 / 0.002, gradients cosine 0.99997 / 0.99997 (head in fp32 before: 2.3e-5 / 8.6e-6, 0.002 / 0.002)
SFT_LOSS_REL, TOKEN_ABS = 1e-3, 0.02


def test_cpu_lm_head_sft_loss_in_bf16(monkeypatch):
    """An SFT forward and backward through trl's fused LM head on the CPU path (bf16 GEMMs, fp32 logsumexp and loss
    inside bf16 autocast): the loss, the per-token log-probs and the adapter gradients, bf16 vs fp32."""
    _cpu_lm_head(monkeypatch)
    model = _model("CAUSAL_LM")
    inputs = DataCollatorForPreference(pad_token_id=0)(_pairs())
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for context in (torch.autocast("cpu", enabled=False), bf16()):
        model.zero_grad()
        with context:
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), out.log_probs.detach(), grads))
    (loss32, lp32, g32), (loss16, lp16, g16) = results
    assert loss16.dtype == torch.float32 and lp16.dtype == torch.float32
    rel = abs(loss16.item() - loss32.item()) / abs(loss32.item())
    token = (lp16 - lp32)[mask[:, 1:].bool() if lp32.shape[1] == mask.shape[1] - 1 else mask.bool()].abs().max()
    cosine = _cosine(g32, g16)
    print(f"SFT bf16 vs fp32: loss {rel:.1e} rel, token log-probs {token:.3f} abs, gradient cosine {cosine:.5f}")
    assert rel < SFT_LOSS_REL and token < TOKEN_ABS and cosine > GRAD_COSINE


# measured (AMX / capped at AVX2): per-token log-probs 0.016 / 0.016, per-row sums 8.2e-5 / 8.2e-5 relative, gradients
# cosine 0.999991 / 0.999991 (without the fp32 target logit: 0.029, 1.9e-4); bounds ~6-12x
HEAD_TOKEN_ABS, HEAD_SUM_REL, HEAD_COSINE = 0.1, 1e-3, 0.9999


def test_cpu_lm_head_bf16_gemms_against_fp32(monkeypatch):
    """The CPU LM head's bf16 GEMMs (under bf16 autocast) against its fp32 path on the same hidden states and head,
    at SmolLM2-135M's width (576) with logits as large as a trained model's (targets planted at logit ~20, others
    spread with std ~3), several chunks: per-token log-probs, per-row sums of 64 tokens (what DPO/KTO compare) and the
    gradients of hidden states and head."""
    from alignkit.speedups import lm_head

    monkeypatch.setattr(lm_head, "TOKEN_CHUNK", 100)
    g = torch.Generator().manual_seed(0)
    n, width, vocab = 256, 576, 4096
    weight = torch.randn(vocab, width, generator=g) * 0.125  # logits std ~3
    targets = torch.randint(0, vocab, (n,), generator=g)
    hidden = torch.randn(n, width, generator=g)
    confident = torch.arange(n) % 2 == 0  # half the tokens: the target's logit pushed to ~20 (a trained model's)
    w_t = weight[targets]
    hidden[confident] += (20 - (hidden * w_t).sum(1, keepdim=True))[confident] * (w_t / w_t.square().sum(1, True))[
        confident
    ]
    upstream = torch.linspace(-1, 1, n)

    def run(context):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with context:
            lp = lm_head.CpuFirstLogProbFunction.apply(h, w, None, targets, 1.0, 128, None, 1.0, ("log_probs",))[0]
        (lp * upstream).sum().backward()
        return lp.detach(), {"hidden": h.grad, "weight": w.grad}

    lp32, g32 = run(torch.autocast("cpu", enabled=False))
    lp16, g16 = run(bf16())
    token = (lp16 - lp32).abs().max().item()
    sums32, sums16 = lp32.view(4, 64).sum(1), lp16.view(4, 64).sum(1)
    rel = ((sums16 - sums32).abs() / sums32.abs()).max().item()
    cosine = _cosine(g32, g16)
    print(f"LM head bf16 vs fp32: token log-probs {token:.4f} abs, sums {rel:.1e} rel, gradient cosine {cosine:.6f}")
    assert lp16.dtype == torch.float32 and token > 0  # the bf16 GEMMs ran
    assert token < HEAD_TOKEN_ABS and rel < HEAD_SUM_REL and cosine > HEAD_COSINE


# measured (AMX / capped at AVX2), token log-probs: per-document bf16 vs fp32 0.002 / 0.002; per-document vs masked
# SDPA, both bf16: 0.002 / 0.000
ATTENTION_ABS = 0.02


@pytest.mark.parametrize("layout", ["padding_free", "right_padded"])
def test_per_document_attention_in_bf16(layout):
    """Per-document attention on a padding-free batch (rows concatenated, position_ids restart) and a right-padded
    one: bf16 autocast gives fp32's token log-probs within ATTENTION_ABS, and what masked SDPA gives in bf16."""
    torch.manual_seed(0)
    model = load_base_model(ModelArguments(model_name_or_path="tiny:llama"))
    if layout == "padding_free":
        ids = torch.randint(5, 200, (1, 40))
        inputs = {"input_ids": ids, "position_ids": torch.cat([torch.arange(n) for n in (12, 20, 8)])[None]}
        keep = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids = torch.randint(5, 200, (3, 16))
        mask = torch.ones_like(ids)
        mask[1, 10:], mask[2, 5:] = 0, 0
        inputs, keep = {"input_ids": ids, "attention_mask": mask}, mask.bool()

    def token_log_probs(attention: str, context) -> torch.Tensor:
        model.set_attn_implementation("sdpa")
        if attention == PER_DOCUMENT:
            assert use_fast_attention(model) == PER_DOCUMENT
        with torch.no_grad(), context:
            logits = model(**inputs, use_cache=False).logits
        return logits.float().log_softmax(-1)[keep].gather(-1, ids[keep][:, None])

    fp32 = token_log_probs(PER_DOCUMENT, torch.autocast("cpu", enabled=False))
    half = token_log_probs(PER_DOCUMENT, bf16())
    masked = token_log_probs("sdpa", bf16())
    vs_fp32, vs_masked = (half - fp32).abs().max().item(), (half - masked).abs().max().item()
    print(f"per-document attention, {layout}: bf16 vs fp32 {vs_fp32:.3f}, vs masked SDPA in bf16 {vs_masked:.3f}")
    assert vs_fp32 < ATTENTION_ABS and vs_masked < ATTENTION_ABS


def test_4bit_training_layout_holds_in_bf16(monkeypatch):
    """QLoRA with bf16 compute in the 4-bit layers (what 'auto' picks on a CPU with bf16 units) and bf16 autocast:
    an evaluation-mode forward before training must not change the gradients (bitsandbytes repacks 4-bit weights for
    inference on AVX512-BF16 CPUs, a layout without backward; alignkit's keep_4bit_training_layout row prevents it).
    Measured: identical gradients (difference 0.0); with the fix undone on this AMX CPU: the repack happens and the
    backward fails or differs."""
    import bitsandbytes as bnb

    from alignkit import runtime

    monkeypatch.setenv(runtime.CPU_AMP_ENV, "on")
    runtime.cpu_mixed_precision.cache_clear()
    try:
        assert runtime.compute_dtype_name("auto") == "bfloat16"
        tiny, quant = ModelArguments(model_name_or_path="tiny:llama"), QuantizationArguments(load_in_4bit=True)
        ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(0))
        grads = []
        for evaluate_first in (False, True):
            torch.manual_seed(0)
            model = load_model(tiny, quant, AdapterArguments(lora_dropout=0.0))
            layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
            assert layer.compute_dtype == torch.bfloat16
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.05)
            if evaluate_first:
                model.eval()
                with torch.no_grad(), bf16():
                    model(input_ids=ids)
                model.train()
            with bf16():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
        print(f"4-bit bf16: gradients after an evaluation differ by {worst:.1e}")
        assert worst < 1e-6
    finally:
        runtime.cpu_mixed_precision.cache_clear()


# measured (AMX): 8.8e-5 (with the entropy's dot product left to autocast, which runs linalg.vecdot in bf16 on CPU:
# 0.022)
ENTROPY_ABS = 1e-3


def test_cpu_lm_head_entropy_is_fp32_under_bf16():
    """The CPU LM head's entropy under bf16 autocast: its bf16 GEMM's logits, then -sum p log p in fp32 (CPU autocast
    lists linalg.vecdot among its bf16 ops: the dot product must run with autocast off). Against the same bf16 logits'
    entropy in fp64, at SmolLM2's width, several chunks."""
    from alignkit.speedups import lm_head

    g = torch.Generator().manual_seed(0)
    n, width, vocab = 256, 576, 4096
    weight = torch.randn(vocab, width, generator=g) * 0.125
    targets = torch.randint(0, vocab, (n,), generator=g)
    hidden = torch.randn(n, width, generator=g)
    with bf16():
        entropy = lm_head.CpuFirstLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, 128, None, 1.0, ("log_probs", "entropy")
        )[1]
    with torch.autocast("cpu", enabled=False):
        log_p = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).double().log_softmax(-1)
    reference = -(log_p.exp() * log_p).sum(-1)
    worst = (entropy.double() - reference).abs().max().item()
    print(f"CPU LM head entropy under bf16 vs fp64 of the same logits: {worst:.1e}")
    assert entropy.dtype == torch.float32 and worst < ENTROPY_ABS


def test_cpu_lm_head_keeps_a_frozen_heads_bf16_copy_until_it_changes():
    """A frozen head's bf16 copy is made once and made again after an in-place write or for a new tensor: the
    log-probs under bf16 autocast always match a head that was never cast before."""
    from alignkit.speedups import lm_head

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 64, generator=g)
    hidden, targets = torch.randn(32, 64, generator=g), torch.randint(0, 512, (32,), generator=g)

    def log_probs(w):
        with bf16(), torch.no_grad():
            return lm_head.CpuFirstLogProbFunction.apply(hidden, w, None, targets, 1.0, 128, None, 1.0, ())[0]

    first = log_probs(weight)
    kept = weight._alignkit_cast[1]
    assert torch.equal(log_probs(weight), first) and weight._alignkit_cast[1] is kept  # cast once
    with torch.no_grad():
        weight.mul_(0.5)
    assert torch.equal(log_probs(weight), log_probs(weight.clone()))  # the in-place write was seen
    assert not torch.equal(log_probs(weight), first)

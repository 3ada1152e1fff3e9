"""alignkit.speedups.bf16_lora: peft's LoRA layers under CPU bf16 autocast with the frozen weight cast once and the
adapter branch on bf16 input give what peft's own forward gives under bf16 autocast, and what fp32 gives, within
the stated tolerances; outside bf16 autocast nothing changes (bit for bit).

Tolerances: about 10x the largest difference measured on an Intel Xeon with AMX, at its best ISA and capped at AVX2
(ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2); figures next to each bound.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as lora_layer
from transformers import AutoModelForCausalLM

from alignkit.speedups import bf16_lora
from alignkit.testing import tiny_model_path


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture
def patched(monkeypatch):
    """bf16_lora's forward on peft's class for this test only."""
    monkeypatch.setattr(lora_layer.Linear, "forward", lora_layer.Linear.forward)
    bf16_lora._patched_forward.upstream = lora_layer.Linear.forward
    monkeypatch.setattr(lora_layer.Linear, "forward", bf16_lora._patched_forward)
    return bf16_lora._patched_forward.upstream


def _model(dropout: float = 0.0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    for name, p in model.named_parameters():  # a non-zero adapter, so its gradients flow everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _layer(inputs: int, outputs: int, bias: bool = True, dropout: float = 0.0, r: int = 4):
    """One peft LoRA Linear around a frozen nn.Linear (peft freezes the base), its adapter as peft starts it (lora_B
    zero)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(inputs, outputs, bias=bias))
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"])
    layer = get_peft_model(net, config).base_model.model[0]
    assert isinstance(layer, lora_layer.Linear) and not layer.base_layer.weight.requires_grad
    return layer


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (2, 24), generator=g)
    return {"input_ids": ids, "labels": ids}


def _run(model, context, batch):
    model.zero_grad()
    with context:
        out = model(**batch, use_cache=False)
    out.loss.backward()
    log_probs = out.logits.float().log_softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), log_probs.detach(), grads


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten().double() for k in sorted(a)])
    y = torch.cat([b[k].flatten().double() for k in sorted(a)])
    return float(x @ y / (x.norm() * y.norm()))


def test_base_gemm_is_autocasts_bit_for_bit(patched):
    """With a zero adapter the layer's output is the base GEMM alone: the kept bf16 weight gives autocast's own
    result bit for bit (the same round-to-nearest of the same fp32 weight)."""
    layer = _layer(64, 48)
    x = torch.randn(5, 64)
    with bf16():
        mine = layer(x)
        peft = patched(layer, x)
    assert mine.dtype == peft.dtype == torch.bfloat16
    assert torch.equal(mine, peft)


# measured (AMX / capped at AVX2), with LoraLinear (a trained layer's output rounded once, not peft's twice): vs peft's
# bf16 forward loss 3.2e-5 / 3.6e-5, token log-probs 0.0020 / 0.0020, gradient cosine 0.999980 / 0.999978; vs fp32
# 1.3e-5 / 1.8e-5, 0.0019 / 0.0019, 0.999978 / 0.999978 (before LoraLinear: vs peft 0.0, 0.0, 0.999992)
LOSS_REL, TOKEN_ABS, GRAD_COSINE = 1e-3, 0.02, 0.999


def test_bf16_lora_against_peft_bf16_and_fp32(patched, monkeypatch):
    """The tiny model, LoRA on every linear layer, no dropout: loss, per-token log-probs and adapter gradients under
    bf16 autocast with the patched forward vs peft's forward under bf16 autocast, and vs fp32."""
    model, batch = _model(), _batch()
    mine = _run(model, bf16(), batch)
    monkeypatch.setattr(lora_layer.Linear, "forward", patched)
    peft = _run(model, bf16(), batch)
    fp32 = _run(model, torch.autocast("cpu", enabled=False), batch)
    for name, ref in (("peft bf16", peft), ("fp32", fp32)):
        rel = abs(mine[0].item() - ref[0].item()) / abs(ref[0].item())
        token = (mine[1] - ref[1]).abs().max().item()
        cosine = _cosine(mine[2], ref[2])
        print(f"bf16_lora vs {name}: loss {rel:.1e} rel, token log-probs {token:.4f} abs, gradient cosine {cosine:.6f}")
        assert rel < LOSS_REL and token < TOKEN_ABS and cosine > GRAD_COSINE
    assert all(g.dtype == torch.float32 for g in mine[2].values())


def test_fp32_is_untouched(patched, monkeypatch):
    """Outside bf16 autocast the patched forward is peft's: the same loss and gradients bit for bit."""
    model, batch = _model(dropout=0.1), _batch()
    torch.manual_seed(1)
    mine = _run(model, torch.autocast("cpu", enabled=False), batch)
    monkeypatch.setattr(lora_layer.Linear, "forward", patched)
    torch.manual_seed(1)
    peft = _run(model, torch.autocast("cpu", enabled=False), batch)
    assert torch.equal(mine[0], peft[0])
    assert all(torch.equal(mine[2][k], peft[2][k]) for k in mine[2])


def test_dropout_keeps_its_expectation(patched):
    """Dropout as a 0/1 mask with 1/(1-p) in the adapter's scale: over many draws the adapter branch averages to
    its output without dropout (what peft's inverted dropout keeps), and about p of the inputs are dropped."""
    layer = _layer(64, 48, bias=False, dropout=0.25)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(3, 64)
    with torch.no_grad(), bf16():
        base = torch.nn.functional.linear(x, layer.base_layer.weight)
        layer.eval()
        clean = layer(x).float() - base.float()
        layer.train()
        draws = (layer(x.repeat(1000, 1)).float() - base.float().repeat(1000, 1)).view(1000, *clean.shape)  # 1000 masks
    mean_err = (draws.mean(0) - clean).abs().max().item() / clean.abs().max().item()
    print(f"dropout: mean of 1000 draws vs no dropout {mean_err:.3f} of the largest output")
    assert mean_err < 0.08
    assert not torch.equal(draws[0], draws[1])


def test_the_kept_weight_follows_the_weight(patched):
    """A merge (peft writes into ``weight.data``), an in-place change and a new tensor each give a new bf16 copy."""
    layer = _layer(16, 8, bias=False, r=2)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    first = bf16_lora.frozen_bf16_weight(layer)
    assert bf16_lora.frozen_bf16_weight(layer) is first
    layer.merge()
    merged = bf16_lora.frozen_bf16_weight(layer)
    assert merged is not first and torch.equal(merged, layer.base_layer.weight.to(torch.bfloat16))
    layer.unmerge()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)
    doubled = bf16_lora.frozen_bf16_weight(layer)
    assert torch.equal(doubled, layer.base_layer.weight.to(torch.bfloat16))
    layer.base_layer.weight = torch.nn.Parameter(torch.zeros(8, 16), requires_grad=False)
    assert not bf16_lora.frozen_bf16_weight(layer).any()


# measured (AMX / capped at AVX2): 3 SGD steps (lr 0.5), both bf16, largest per-step loss difference with vs without
# the row 6.8e-6 / 8.4e-6 relative (step 1 equal: lora_B starts at zero)
RECIPE_LOSS_REL = 1e-4


def test_a_bf16_sft_run_applies_the_row_and_trains_as_peft_does(tmp_path):
    """The tiny SFT recipe (LoRA, no dropout) under bf16 autocast, with the row (``speedups: auto``) and with every
    other row but this one: the run records the row only where it ran, peft's forward is restored when the row is
    left out, and the losses agree; an fp32 run does not apply it."""
    from conftest import run_recipe, train_losses
    from speedups.test_speedups import TINY

    from alignkit import speedups
    from alignkit.runs import RunRecord

    others = "[" + ",".join(n for n in speedups.NAMES if n != "cpu_bf16_lora") + "]"
    runs = {}
    for name, extra in (("row", ["--bf16", "true", "--use_cpu", "true"]),
                        ("peft", ["--bf16", "true", "--use_cpu", "true", "--speedups", others]),
                        ("fp32", [])):  # fmt: skip
        runs[name] = tmp_path / name
        run_recipe("sft", [*TINY, *extra, "--output_dir", str(runs[name])])
        if name == "peft":
            assert not getattr(lora_layer.Linear.forward, "alignkit", False)
    ran = {n: RunRecord.read(out).last.speedups.get("trainer", []) for n, out in runs.items()}
    assert "cpu_bf16_lora" in ran["row"] and "cpu_bf16_lora" not in ran["peft"] + ran["fp32"], ran
    row, peft = train_losses(runs["row"]), train_losses(runs["peft"])
    worst = max(abs(a - b) / abs(b) for a, b in zip(row, peft, strict=True))
    print(f"bf16 SFT with vs without cpu_bf16_lora: losses {row} vs {peft}, worst {worst:.1e} rel")
    assert row[0] == peft[0] and worst < RECIPE_LOSS_REL


def test_keep_mask_rounds_p_to_16_bits_where_that_is_fine_else_32():
    """p = 0.05 (alignkit's lora_dropout) draws 16 bits per element: the returned keep probability is 1 - p rounded
    to 2^-16 (so the dropout stays unbiased) and the dropped share matches it; p = 0.001 (rounding to 2^-16 would
    move it by 1.7% of itself) takes 32 bits; every element is decided independently of its neighbours."""
    torch.manual_seed(0)
    mask, keep = bf16_lora.keep_mask(torch.Size([2000, 1000]), 0.05)
    assert keep == 1 - 3277 / 2**16 and abs((1 - keep) - 0.05) < 1e-5
    dropped = 1 - mask.float().mean().item()
    assert abs(dropped - (1 - keep)) < 5 * (0.05 * 0.95 / mask.numel()) ** 0.5, dropped
    pairs = (~mask[:, 0::2] & ~mask[:, 1::2]).float().mean().item()  # two neighbours from one 64-bit draw
    assert abs(pairs - 0.05**2) < 5 * (0.05**2 / (mask.numel() / 2)) ** 0.5, pairs
    mask, keep = bf16_lora.keep_mask(torch.Size([4000, 1000]), 0.001)
    assert keep == 1 - round(0.001 * 2**32) / 2**32
    assert abs((1 - mask.float().mean().item()) - 0.001) < 5 * (0.001 / mask.numel()) ** 0.5


def test_sibling_layers_share_one_input_cast(patched):
    """q/k/v_proj (and gate/up_proj) read the same hidden state: it is cast to bf16 once; a changed input (in place),
    another tensor or another grad mode gets its own cast. The tiny model's loss and gradients under bf16 with the
    shared cast are those of test_bf16_lora_against_peft_bf16_and_fp32 (that test runs this path)."""
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 1.0
    first = bf16_lora.bf16_input(h)
    assert bf16_lora.bf16_input(h) is first and first.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16_lora.bf16_input(h) is not first
    other = h.clone()
    assert bf16_lora.bf16_input(other) is not first
    with torch.no_grad():
        h.mul_(2)
    again = bf16_lora.bf16_input(h)
    assert again is not first and torch.equal(again, h.to(torch.bfloat16))
    casts = []
    model = _model()
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if args and args[0] is torch.bfloat16 and self.dim() == 3:
            casts.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    with bf16(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", counting_to)
        model(**_batch(), use_cache=False)
    layers = model.config.num_hidden_layers
    # one cast per fp32 input: the hidden state q/k/v_proj read and the one gate/up_proj read (o_proj's and
    # down_proj's inputs arrive in bf16 here); without sharing 5 per decoder layer
    assert len(casts) == 2 * layers, casts


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_adapter_and_disabled_adapters_give_peft_bf16_bit_for_bit(patched, monkeypatch, frozen):
    """An adapter without gradient (frozen, or trainable under ``torch.no_grad``: trl's 'ref' copy in DPO/KTO's
    reference pass is marked trainable by peft's ``set_adapter``) runs on kept bf16 copies of its weights, and
    disabled adapters run the base GEMM alone: the outputs equal peft's under bf16 autocast bit for bit."""
    model = _model()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(not frozen)
    batch = _batch()
    with torch.no_grad(), bf16():
        mine = model(**batch, use_cache=False).logits
        with model.disable_adapter():
            mine_off = model(**batch, use_cache=False).logits
    kept = [m for m in model.modules() if hasattr(m, "_alignkit_bf16_weight") and isinstance(m, torch.nn.Linear)]
    assert kept, "the adapter's weights were not kept in bf16"
    monkeypatch.setattr(lora_layer.Linear, "forward", patched)
    with torch.no_grad(), bf16():
        peft = model(**batch, use_cache=False).logits
        with model.disable_adapter():
            peft_off = model(**batch, use_cache=False).logits
    assert torch.equal(mine, peft) and torch.equal(mine_off, peft_off)
    assert not torch.equal(mine, mine_off)


@pytest.mark.parametrize("optim", ["fused", "foreach"])
def test_a_forward_without_grad_after_an_optimizer_step_sees_the_new_adapter(patched, optim):
    """Evaluation or generation (``torch.no_grad``) after an optimizer step uses the updated adapter: fused AdamW
    (transformers' default ``adamw_torch_fused``) writes the weights in place without a new version counter, so a
    trainable adapter's kept copy is made again after every optimizer step (found in review: without that the kept
    copy went stale, off by up to 2.27)."""
    layer = _layer(32, 16)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(4, 32)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.5, **({"fused": True} if optim == "fused" else {"foreach": True}))
    with torch.no_grad(), bf16():
        layer(x)  # the first one starts the optimizer-step count
        before = layer(x)
    assert hasattr(layer.lora_A["default"], "_alignkit_bf16_weight")  # kept
    with bf16():
        layer(x).float().pow(2).sum().backward()
    opt.step()
    with torch.no_grad(), bf16():
        after, peft = layer(x), patched(layer, x)
    assert not torch.equal(peft, before) and torch.equal(after, peft)


def test_inference_mode_takes_pefts_forward_and_training_goes_on(patched):
    """Under ``torch.inference_mode`` (transformers' pipelines) the layer is peft's (inference tensors have no
    version counter), and nothing kept there leaks into a later training step."""
    layer = _layer(32, 16)
    with torch.inference_mode(), bf16():
        h = torch.randn(4, 32) * 1.0
        assert torch.equal(layer(h), patched(layer, h))
        layer(torch.randn(4, 32).to(torch.bfloat16))
    x = torch.randn(4, 32, requires_grad=True)
    with bf16():
        layer(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_keep_mask_with_p_next_to_one_still_divides_by_a_positive_keep():
    """p within 2^-33 of 1: the threshold stays below 2^32 (it wrapped around: everything kept, keep 0)."""
    mask, keep = bf16_lora.keep_mask(torch.Size([1000]), 1 - 1e-10)
    assert keep > 0 and not mask.any()


# measured (AMX), p = 0 / 0.25: output 0.0030 / 0.0046, input gradient 0.0081 / 0.0059, lora_A 0.0037 / 0.0032,
# lora_B 0.0038 / 0.0052 of the largest value (bf16's rounding, 2^-8 = 0.0039, over a few roundings)
LORA_LINEAR_REL = 0.03


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_a_trained_layer_as_one_node_equals_its_fp32_math(patched, monkeypatch, dropout):
    """A trained adapter's layer (grad mode on) runs as LoraLinear, one autograd node: its output and the gradients
    of the input, lora_A and lora_B equal the same mathematics in fp32 autograd (base GEMM, the dropout mask, the
    adapter scaled by 1/keep) within bf16's rounding; the adapter's gradients come back fp32."""
    layer = _layer(48, 40, bias=True, dropout=dropout)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(2, 7, 48, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    fixed = (torch.rand(2, 7, 48, generator=g) >= dropout, 1 - dropout)
    monkeypatch.setattr(bf16_lora, "keep_mask", lambda shape, p: fixed)
    nodes = []
    real = bf16_lora.LoraLinear.apply
    monkeypatch.setattr(bf16_lora.LoraLinear, "apply", lambda *a: nodes.append(1) or real(*a))
    with bf16():
        out = layer(x)
    up = torch.randn(out.shape)
    (out.float() * up).sum().backward()
    assert nodes and out.dtype == torch.bfloat16 and out.grad_fn.name().startswith("LoraLinear")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mine = (out.float(), x.grad, a.grad, b.grad)
    assert a.grad.dtype == b.grad.dtype == torch.float32
    x32 = x.detach().clone().requires_grad_(True)
    a32, b32 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    h = x32 * fixed[0] if dropout else x32
    scale = layer.scaling["default"] / (fixed[1] if dropout else 1.0)
    ref = (
        torch.nn.functional.linear(x32, layer.base_layer.weight, layer.base_layer.bias)
        + (h @ a32.t()) @ b32.t() * scale
    )
    (ref * up).sum().backward()
    for name, m, r in zip(
        ("output", "input grad", "lora_A grad", "lora_B grad"), mine, (ref, x32.grad, a32.grad, b32.grad)
    ):
        err = (m - r).abs().max().item() / r.abs().max().item()
        print(f"LoraLinear p={dropout} {name}: {err:.4f} of the largest")
        assert err < LORA_LINEAR_REL, (name, err)


def test_a_trained_layer_whose_input_needs_no_gradient_computes_none(patched):
    """The first layer's input (the embeddings, frozen) needs no gradient: LoraLinear computes none, and the
    adapter gets its gradient (lora_B's; lora_A's is zero while lora_B is, as peft starts it)."""
    layer = _layer(32, 16, bias=False)
    with bf16():
        layer(torch.randn(5, 32)).float().sum().backward()
    assert layer.lora_A["default"].weight.grad is None or layer.lora_A["default"].weight.grad.abs().sum() == 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_a_copy_kept_while_frozen_follows_steps_taken_while_unfrozen(patched):
    """An adapter kept in bf16 while frozen, then unfrozen and trained with fused AdamW (no new version counter) and
    frozen again, is copied again (found in review: the copy was keyed without a step count, off by 13.1)."""
    layer = _layer(32, 16)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    x = torch.randn(4, 32)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    opt = torch.optim.AdamW(params, lr=0.5, fused=True)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad(), bf16():
        before = layer(x)
    assert hasattr(layer.lora_A["default"], "_alignkit_bf16_weight")  # kept while frozen
    for p in params:
        p.requires_grad_(True)
    for _ in range(2):
        with bf16():
            layer(x).float().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad(), bf16():
        after, peft = layer(x), patched(layer, x)
    assert not torch.equal(peft, before) and torch.equal(after, peft)

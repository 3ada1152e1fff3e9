"""Training invariants that must survive upgrades of trl, transformers, peft, bitsandbytes and alignkit.

Each test states its tolerance and the difference measured on CPU fp32 when it was written, and where it matters,
what a broken implementation gives, so that the tolerance visibly separates the two.
"""

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file
from trl import SFTTrainer

from alignkit.config import AdapterArguments, ModelArguments, QuantizationArguments, SFTConfig
from alignkit.models.loader import load_base_model, load_model
from alignkit.models.tokenizer import load_tokenizer
from alignkit.speedups.bnb_4bit import adapter_dtype_fix
from regression.golden import run_recipe

pytestmark = pytest.mark.regression

TINY = ModelArguments(model_name_or_path="tiny:llama")
NO_DROPOUT = AdapterArguments(
    lora_dropout=0.0
)  # dropout masks depend on batch shape; the invariants are about the math
SYSTEM = "You are a careful calculator. End every reply with a line 'ANSWER: <number>'."


def varied_rows(n: int = 16) -> list[dict]:
    """Conversations whose lengths differ by up to ~8x, so that per-token and per-example averaging disagree."""
    rows = []
    for i in range(n):
        a, b = 10 + 3 * i, 20 + 5 * i
        answer = f"ANSWER: {a + b}" if i % 2 else " ".join([f"{a} + {b} = {a + b}."] * (3 + i)) + f"\nANSWER: {a + b}"
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"messages": messages})
    return rows


def _write_rows(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in varied_rows()))
    return path


def _rel(pairs, key) -> float:
    return max(abs(a[key] - b[key]) / abs(a[key]) for a, b in pairs)


def _steps(output_dir) -> list[dict]:
    return [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def _sft_trainer(model, tokenizer, rows, tmp_path, **args) -> SFTTrainer:
    import datasets

    config = SFTConfig(
        output_dir=str(tmp_path / "trainer"), save_strategy="no", disable_tqdm=True, max_length=512, **args
    )
    return SFTTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )


# ---------------------------------------------------------------------------------------------------------------------
# The recipe-level invariants compare weights after plain SGD steps (--optim sgd). Under AdamW, a weight whose true
# gradient is ~0 moves by about lr * sign(rounding noise) on the first step, so the weight difference measured how
# Adam amplifies the CPU's rounding (1.8e-4 here, 3.2e-4 with oneDNN/MKL/ATen capped at AVX2, 2.1e-3 on an AVX2-only
# AMD EPYC: the bound of 1e-3 failed there). After SGD steps weights differ by lr x the summed gradient differences,
# which the gradient invariant bounds. What the optimizer does is pinned by the golden trajectories, not here.
SGD = "--optim sgd"
WEIGHTS_BOUND = 1e-8  # measured: 5.8e-11 .. 8.7e-11 (both invariants, oneDNN/MKL/ATen at AVX-512 or capped at AVX2)


def _max_weight_diff(a, b) -> float:
    w_a, w_b = (load_file(d / "adapter_model.safetensors") for d in (a, b))
    return max((w_a[k] - w_b[k]).abs().max().item() for k in w_a)


def _sft_run(tmp_path, name, data, args, monkeypatch=None, per_micro_batch_mean=False):
    output_dir = tmp_path / name
    if per_micro_batch_mean:  # the broken control: transformers' loss without num_items_in_batch
        from alignkit.train.runner import Run

        build = Run.build_trainer

        def build_broken(self, *a, **kw):
            trainer = build(self, *a, **kw)
            trainer.model_accepts_loss_kwargs = False
            return trainer

        monkeypatch.setattr(Run, "build_trainer", build_broken)
    common = f"--model_name_or_path tiny:llama --datasets [{data}] --learning_rate 5e-3 --lora_dropout 0 {SGD}"
    run_recipe("sft", shlex.split(f"{common} {args} --output_dir {output_dir} --seed 42 --disable_tqdm true"))
    if per_micro_batch_mean:
        monkeypatch.undo()
    return output_dir


def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    """batch 8 x accumulation 1 == batch 1 x accumulation 8, through the SFT recipe.

    trl/transformers divide the summed token losses by the label tokens of the whole accumulated batch
    (num_items_in_batch), so both compute the same mean over the same tokens. Measured (1-2 threads, every ISA cap):
    per-step loss and grad norm equal to the logged precision, adapter weights after 2 SGD steps <= 8.7e-11 apart.
    Control: averaging per micro-batch instead (the old accumulation bug, run here) gives loss 4.9e-4 and grad norm
    4.6e-2 relative, weights 8.8e-5 apart.
    """
    data = _write_rows(tmp_path / "sft.jsonl")
    big = _sft_run(tmp_path, "batch8", data, "--max_steps 2 --per_device_train_batch_size 8")
    accumulated = _sft_run(
        tmp_path, "batch1x8", data, "--max_steps 2 --per_device_train_batch_size 1 --gradient_accumulation_steps 8"
    )
    control = _sft_run(
        tmp_path,
        "control",
        data,
        "--max_steps 2 --per_device_train_batch_size 1 --gradient_accumulation_steps 8",
        monkeypatch,
        per_micro_batch_mean=True,
    )
    pairs = list(zip(_steps(big), _steps(accumulated), strict=True))
    control_pairs = list(zip(_steps(big), _steps(control), strict=True))
    worst, worst_control = _max_weight_diff(big, accumulated), _max_weight_diff(big, control)
    print(
        f"grad accumulation: loss {_rel(pairs, 'loss'):.1e} rel, grad norm {_rel(pairs, 'grad_norm'):.1e} rel, "
        f"weights {worst:.1e} abs; control (per-micro-batch mean): loss {_rel(control_pairs, 'loss'):.1e}, "
        f"grad norm {_rel(control_pairs, 'grad_norm'):.1e}, weights {worst_control:.1e}"
    )
    for step, (one, many) in enumerate(pairs, start=1):
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-5), f"step {step}: loss"
        assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), f"step {step}: grad norm"
    assert worst < WEIGHTS_BOUND, f"adapter weights differ by up to {worst:.2e} after 2 steps"
    assert _rel(control_pairs, "grad_norm") > 1e-2 and worst_control > 100 * WEIGHTS_BOUND, (
        "control: a per-micro-batch mean should break the invariant; the check is blind"
    )


# ---------------------------------------------------------------------------------------------------------------------
def _token_nll(logits, labels):
    """Per-token NLL of the labelled positions of one sequence (labels shifted as the model's loss does)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = labels[1:]
    keep = targets != -100
    return -logprobs[keep].gather(-1, targets[keep, None]).squeeze(-1)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_per_document"])
def test_padding_free_packing_gives_each_example_its_padded_loss(attn, tmp_path):
    """trl's padding-free packing (packing=True, 'bfd': rows concatenated, position_ids restart at each row, no
    attention mask) vs the padded, unpacked batch of the same rows, same weights.

    transformers derives a block-diagonal causal mask from the position_ids on CPU (sdpa and eager), so no row attends
    to its neighbours. Measured: per-example mean loss and batch loss 0 (1 thread) to 1e-6 (2 threads), gradients 2e-7
    of their largest entry. Control: the same packed rows without position_ids (one long causal sequence) change the
    per-example losses by up to 1.4e-2.
    """
    model = load_base_model(ModelArguments(model_name_or_path="tiny:llama", attn_implementation=attn))
    tokenizer = load_tokenizer(TINY, chat=True)
    rows = varied_rows()
    packed = _sft_trainer(model, tokenizer, rows, tmp_path, packing=True)
    padded = _sft_trainer(model, tokenizer, rows, tmp_path, packing=False)
    assert packed.padding_free and len(packed.train_dataset) < len(rows), "the rows were not packed"
    packed_batch = packed.data_collator(list(packed.train_dataset))
    padded_batch = padded.data_collator(list(padded.train_dataset))
    assert "attention_mask" not in packed_batch and packed_batch["input_ids"].shape[0] == 1

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]).logits
        unpacked = {}
        for i, mask in enumerate(padded_batch["attention_mask"].bool()):
            ids = tuple(padded_batch["input_ids"][i][mask].tolist())
            unpacked[ids] = _token_nll(logits[i][mask], padded_batch["labels"][i][mask]).mean().item()
        ids, labels = packed_batch["input_ids"], packed_batch["labels"]
        with_boundaries = model(input_ids=ids, position_ids=packed_batch["position_ids"]).logits[0]
        without_boundaries = model(input_ids=ids).logits[0]
    bounds = packed_batch["cu_seq_lens_q"].tolist()
    diffs, control = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        want = unpacked[tuple(ids[0, start:end].tolist())]
        diffs.append(abs(_token_nll(with_boundaries[start:end], labels[0, start:end]).mean().item() - want))
        control.append(abs(_token_nll(without_boundaries[start:end], labels[0, start:end]).mean().item() - want))
    assert len(diffs) == len(rows)
    assert max(diffs) < 1e-5, f"{attn}: packed per-example loss differs from padded by up to {max(diffs):.2e}"
    assert max(control) > 1e-3, "control: ignoring the row boundaries should change the losses; the check is blind"

    model.train()  # the trainers' own loss (token mean over the batch) and its gradients
    grads = []
    for trainer, batch in ((packed, packed_batch), (padded, padded_batch)):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_packed, g_packed), (loss_padded, g_padded) = grads
    scale = max(g.abs().max().item() for g in g_padded.values())
    worst = max((g_packed[n] - g_padded[n]).abs().max().item() for n in g_padded)
    print(
        f"packing ({attn}): per-example loss {max(diffs):.1e} abs (control without boundaries {max(control):.1e}), "
        f"batch loss {abs(loss_packed - loss_padded):.1e} abs, gradients {worst / scale:.1e} of max"
    )
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6)
    assert worst < 1e-5 * scale, f"{attn}: gradients differ by {worst / scale:.2e} of their largest entry"


def test_padding_free_batches_train_as_padded_batches(tmp_path):
    """alignkit's SFT default (padding_free_batches: rows concatenated, no pad tokens) trains exactly as padded
    batches, through the SFT recipe. Measured over 3 SGD steps on rows of 1-8x different lengths (1-2 threads, every
    ISA cap): loss <= 1.5e-7 relative, grad norm equal to the logged precision, adapter weights <= 8.7e-11 absolute
    (summation order differs). The control that ignores row boundaries is in the test above (1.4e-2 per-example loss). With LoRA
    dropout on, the two differ slightly more (the masks are drawn for differently shaped tensors): that is why the
    invariant is pinned at dropout 0."""
    data = _write_rows(tmp_path / "sft.jsonl")
    runs = {
        free: _sft_run(tmp_path, f"padding_free_{free}", data, f"--max_steps 3 --per_device_train_batch_size 8 "
                       f"--padding_free_batches {free}")
        for free in ("true", "false")
    }  # fmt: skip
    pairs = list(zip(_steps(runs["true"]), _steps(runs["false"]), strict=True))
    worst = _max_weight_diff(runs["true"], runs["false"])
    print(f"padding-free batches: loss {_rel(pairs, 'loss'):.1e} rel, grad norm {_rel(pairs, 'grad_norm'):.1e} rel, "
          f"weights {worst:.1e} abs")  # fmt: skip
    for step, (free, padded) in enumerate(pairs, start=1):
        assert free["num_tokens"] == padded["num_tokens"], f"step {step}: not the same rows"
        assert free["loss"] == pytest.approx(padded["loss"], rel=1e-5), f"step {step}: loss"
        assert free["grad_norm"] == pytest.approx(padded["grad_norm"], rel=5e-4), f"step {step}: grad norm"
    assert worst < WEIGHTS_BOUND, f"adapter weights differ by up to {worst:.2e} after 3 steps"


# ---------------------------------------------------------------------------------------------------------------------
def test_qlora_step_equals_step_on_dequantized_weights(tmp_path):
    """Two SFT steps of QLoRA on the 4-bit tiny model == the same steps on an fp32 model holding the dequantized 4-bit
    weights and the same adapter, after an evaluation pass (as eval_strategy runs one).

    bitsandbytes computes 4-bit layers on CPU by dequantizing, so the two agree exactly. Measured: loss, grad norm and
    adapter weights identical (difference 0.0). Without alignkit's loader fix (bnb repacks 4-bit weights for inference
    on the first eval-mode forward on AVX512-BF16 CPUs, a layout without backward) the grad norm was 0.25 vs 0.44.
    """
    import bitsandbytes as bnb

    rows = varied_rows()[:8]
    tokenizer = load_tokenizer(TINY, chat=True)
    quantized = load_model(TINY, QuantizationArguments(load_in_4bit=True), NO_DROPOUT)
    dequantized = load_model(TINY, None, NO_DROPOUT)
    modules_4bit = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert modules_4bit, "the tiny model was not quantized"
    for name, module in dequantized.named_modules():
        if name in modules_4bit:
            weight = modules_4bit[name].weight
            module.weight.data = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(module.weight.dtype)

    trainers = [
        _sft_trainer(m, tokenizer, rows, tmp_path, max_steps=2, learning_rate=5e-3, per_device_train_batch_size=8)
        for m in (quantized, dequantized)
    ]
    adapter_dtype_fix(trainers[0].model, torch.float32)  # as Run.train does after trl's bf16 cast of QLoRA adapters
    adapter = dict(quantized.named_parameters())
    for name, param in dequantized.named_parameters():
        if param.requires_grad:
            param.data.copy_(adapter[name].data)

    quantized.eval()  # an evaluation before training: the path that broke
    with torch.no_grad():
        batch = trainers[1].data_collator(list(trainers[1].train_dataset))
        step0 = (quantized(**batch).logits - dequantized(**batch).logits).abs().max().item()
    assert step0 < 1e-5, f"4-bit vs dequantized logits differ by {step0:.2e}"

    histories = []
    for trainer in trainers:
        trainer.train()
        histories.append([e for e in trainer.state.log_history if "loss" in e])
    pairs = list(zip(*histories, strict=True))
    final = dict(dequantized.named_parameters())
    worst = max((p.data - final[n].data).abs().max().item() for n, p in quantized.named_parameters() if p.requires_grad)
    print(
        f"4-bit vs dequantized: logits at step 0 {step0:.1e}, loss {_rel(pairs, 'loss'):.1e} rel, "
        f"grad norm {_rel(pairs, 'grad_norm'):.1e} rel, adapter weights {worst:.1e} abs"
    )
    for step, (q, d) in enumerate(pairs, start=1):
        assert q["loss"] == pytest.approx(d["loss"], rel=1e-5), f"step {step}: loss"
        assert q["grad_norm"] == pytest.approx(d["grad_norm"], rel=1e-4), f"step {step}: grad norm"
    assert worst < 1e-5, f"adapter weights differ by up to {worst:.2e}"


# ---------------------------------------------------------------------------------------------------------------------
ADAPTERS = {
    "lora": (AdapterArguments(), QuantizationArguments()),
    "rslora": (AdapterArguments(use_rslora=True), QuantizationArguments()),
    "dora": (AdapterArguments(use_dora=True), QuantizationArguments()),
    "qlora": (AdapterArguments(), QuantizationArguments(load_in_4bit=True)),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_fresh_adapter_leaves_logits_unchanged(kind):
    """A freshly initialised adapter (LoRA B = 0; DoRA magnitude = the weight norms) must not change the model.
    Measured: 0.0 for LoRA, rsLoRA, DoRA and QLoRA."""
    adapter_args, quant_args = ADAPTERS[kind]
    tokenizer = load_tokenizer(TINY)
    batch = tokenizer(
        ["the model is good and the data is bad", "Alice visited paris, 12 + 30 = 42"],
        return_tensors="pt",
        padding=True,
    )
    base = load_base_model(TINY, quant_args).eval()
    adapted = load_model(TINY, quant_args, adapter_args).eval()
    assert any(p.requires_grad for p in adapted.parameters())
    with torch.no_grad():
        diff = (adapted(**batch).logits - base(**batch).logits).abs().max().item()
    print(f"fresh {kind} adapter: logits change by {diff:.1e}")
    assert diff < 1e-5, f"{kind}: a fresh adapter changes the logits by {diff:.2e}"

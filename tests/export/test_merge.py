"""alignkit merge: the merged model reproduces base + adapter (full precision: 1e-4; 4-bit: stated bounds), loads with
plain AutoModelForCausalLM, generates and stops at the chat template's end-of-turn token; a merge above the parity
bound exits 1 and is not pushed until forced."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import main as cli
from alignkit.config.args import ModelArguments, QuantizationArguments
from alignkit.data.templates import CHATML, end_of_turn_ids
from alignkit.errors import ConfigError
from alignkit.export.merge import merge_adapter
from alignkit.models.loader import load_base_model

from .conftest import HubRecorder

PROMPTS = ["What is 12 + 30? ANSWER: 42", "Alice visited the river with her dog."]
# Stated bounds. Float32 on both sides: 1e-4. The dequantize path is held to the same 1e-4 against the 4-bit base +
# adapter, since the 4-bit reference dequantizes each weight to its fp32 compute dtype (alignkit keeps bitsandbytes'
# training layout on CPU; its bf16 inference kernel would add ~4e-3). The full_precision path of a 4-bit adapter is
# exact against the full-precision base + adapter and differs from the trained 4-bit model by the quantization error.
EXACT = 1e-4
QUANTIZATION_GAP = 1e-2  # the full_precision merge of the tiny 4-bit adapter differs by more than this (~0.5)


def _logits(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    return logits[batch["attention_mask"].bool()]


def _base(path_or_name, four_bit=False):
    return load_base_model(
        ModelArguments(model_name_or_path=path_or_name), QuantizationArguments(load_in_4bit=four_bit)
    )


def _tiny_base_of(adapter_dir):
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_full_precision_merge_matches_base_plus_adapter_and_generates(sft_fp, tmp_path):
    adapter = sft_fp.output_dir
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.method == "full_precision" and result.parity.passed and result.parity.max_abs_diff < EXACT

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, nothing from alignkit
    base = _base(_tiny_base_of(adapter))
    base_logits = _logits(base, tokenizer)
    reference = _logits(PeftModel.from_pretrained(base, adapter), tokenizer)
    assert (_logits(merged, tokenizer) - reference).abs().max() < EXACT
    assert (reference - base_logits).abs().max() > 0.05  # the adapter changes the model: the check above has teeth

    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "README.md", "alignkit_run.json", "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = merged.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert merged.generation_config.pad_token_id == tokenizer.pad_token_id

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = merged.generate(**chat, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > chat["input_ids"].shape[1]
    meta = json.loads((tmp_path / "merged" / "alignkit_run.json").read_text())
    assert meta["merge"]["method"] == "full_precision" and [e["stage"] for e in meta["lineage"]] == ["sft", "merge"]
    assert "method: `full_precision`" in (tmp_path / "merged" / "README.md").read_text()


def test_dequantize_merge_of_4bit_dpo_chain(chain, tmp_path):
    """The default for a 4-bit adapter: merge into the dequantized base, i.e. the model that was trained."""
    result = merge_adapter(chain.dpo, tmp_path / "merged")
    assert result.method == "dequantize"
    assert result.parity.max_abs_diff < EXACT and result.parity.passed  # vs 4-bit base + adapter
    assert abs(result.parity.loss_delta) < 1e-3

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    four_bit = _base(_tiny_base_of(chain.dpo), four_bit=True)
    trained = _logits(PeftModel.from_pretrained(four_bit, chain.dpo), tokenizer)
    assert (_logits(merged, tokenizer) - trained).abs().max() < EXACT
    # The merge itself: against the dequantized base + the unmerged adapter.
    dequantized = _base(_tiny_base_of(chain.dpo), four_bit=True).dequantize(dtype=torch.float32)
    assert (
        _logits(merged, tokenizer) - _logits(PeftModel.from_pretrained(dequantized, chain.dpo), tokenizer)
    ).abs().max() < EXACT

    card = (tmp_path / "merged" / "README.md").read_text()
    assert (
        "# CPT -> SFT -> DPO merged model" in card
        and "method: `dequantize`" in card
        and "library_name: transformers" in card
    )
    assert json.loads((tmp_path / "merged" / "alignkit_run.json").read_text())["merge"]["method"] == "dequantize"


def test_full_precision_merge_of_4bit_adapter_is_gated_before_push(chain, tmp_path, monkeypatch, capsys):
    """Merging a 4-bit-trained adapter into the full-precision base is exact against that base + adapter, but not
    the model that was trained: the gate reports the gap and refuses to push unless forced."""
    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "merged"
    argv = [
        "merge",
        str(chain.sft),
        "--output",
        str(out),
        "--method",
        "full_precision",
        "--push_to_hub",
        "--hub_model_id",
        "tiny-merged",
    ]
    assert cli(argv) == 1  # the gate failed (exit 1, as export gguf's): the merge is kept, nothing is pushed
    err = capsys.readouterr().err
    assert "MergeParityError" in err and "not pushed to the Hub" in err and "--force" in err
    assert not hub.named("upload_folder")
    meta = json.loads((out / "alignkit_run.json").read_text())["merge"]
    assert (
        meta["method"] == "full_precision"
        and not meta["parity_passed"]
        and meta["max_abs_logit_diff"] > QUANTIZATION_GAP
    )

    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    full = _base(_tiny_base_of(chain.sft))
    assert (
        _logits(merged, tokenizer) - _logits(PeftModel.from_pretrained(full, chain.sft), tokenizer)
    ).abs().max() < EXACT

    assert cli([*argv, "--force", "--private"]) == 0
    (upload,) = hub.named("upload_folder")
    assert upload["repo_id"] == "alice/tiny-merged"
    assert all(
        upload["uploaded"][n] == (out / n).read_bytes() for n in upload["uploaded"] if n.endswith(".safetensors")
    )
    assert sorted(upload["allow_patterns"]) == [
        "README.md", "alignkit_run.json", "chat_template.jinja", "config.json", "generation_config.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert {"repo_id": "alice/tiny-merged", "private": True, "exist_ok": True} in hub.named("create_repo")


def test_merge_refuses_wrong_requests_before_loading(sft_fp, tmp_path):
    with pytest.raises(ConfigError, match="full_precision"):
        merge_adapter(sft_fp.output_dir, tmp_path / "m", method="dequantize")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier merge"):
        merge_adapter(sft_fp.output_dir, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_generation_stops_at_the_templates_end_of_turn_when_eos_differs(tiny_llama):
    """A base whose eos is <|endoftext|> but whose chat template closes turns with <|im_end|>: generate() must stop
    at both, or a merged chat model runs on past its answer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML
    ids = end_of_turn_ids(tokenizer)
    assert ids == [tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_parity_scores_encoder_decoders_without_decoder_inputs(kind):
    """The merge gate scores a seq2seq head on prompts alone: T5 (no decoder inputs derived from input_ids) as well as
    BART; a LoRA adapter and its merge give the same logits."""
    import copy

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from alignkit.export.parity import score as _score

    torch.manual_seed(0)
    small = dict(vocab_size=64, d_model=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if kind == "t5":
        config = transformers.T5Config(d_kv=8, d_ff=32, num_layers=1, num_heads=2, **small)
        model, targets = transformers.T5ForConditionalGeneration(config), ["q", "v"]
    else:
        config = transformers.BartConfig(
            encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, bos_token_id=2, forced_eos_token_id=1, **small,
        )  # fmt: skip
        model, targets = transformers.BartForConditionalGeneration(config), ["q_proj", "v_proj"]
    peft = get_peft_model(model.eval(), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    batch = transformers.BatchEncoding(
        {
            "input_ids": torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        }
    )
    adapter_logits, _ = _score(peft, batch, causal=False)
    merged_logits, _ = _score(copy.deepcopy(peft).merge_and_unload(), batch, causal=False)
    assert adapter_logits.shape == (2, 4, 64)
    assert (adapter_logits - merged_logits).abs().max() < 1e-5


def test_a_4bit_adapter_trained_with_bf16_compute_merges_within_the_exact_bound(tmp_path, monkeypatch):
    """The 'auto' rule computes 4-bit layers in bf16 on CPUs with bf16 units (docs/cpu-mixed-precision.md): the
    parity gate still compares two fp32 computations (the reference's bf16 rounding is not a merge error;
    measured on the SmolLM2 demo: max |logit diff| 1.21 before, 1.3e-4 after)."""
    from .conftest import FAST, REPO, run_recipe

    monkeypatch.chdir(REPO)
    run = tmp_path / "sft"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--bnb_4bit_compute_dtype", "bfloat16",
                       "--output_dir", str(run), *FAST])  # fmt: skip
    result = merge_adapter(run, tmp_path / "merged")
    assert result.method == "dequantize"
    assert result.parity.passed and result.parity.max_abs_diff < EXACT, result.parity.summary()


def test_a_checkpoint_of_a_4bit_run_merges_and_loads_as_that_run_trained_it(tmp_path, monkeypatch):
    """A ``checkpoint-N`` folder has no ``alignkit_run.json`` of its own: its run's record describes it
    (``RunRecord.for_model``), so merging it dequantizes the 4-bit base it was trained on (not a full-precision base
    that parity would compare with itself), and ``load_trained`` puts its adapter on the 4-bit base."""
    from alignkit.models import load_trained
    from alignkit.runs import CHECKPOINT, RunRecord

    from .conftest import FAST, REPO, run_recipe

    monkeypatch.chdir(REPO)
    run = tmp_path / "sft"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--output_dir", str(run), *FAST,
                       "--save_strategy", "steps", "--save_steps", "1"])  # fmt: skip
    checkpoint = run / "checkpoint-1"
    assert not RunRecord.exists(checkpoint) and RunRecord.read(run).last.group(QuantizationArguments).load_in_4bit
    record = RunRecord.for_model(checkpoint)
    assert record.status == CHECKPOINT and record.usable and not record.metrics
    assert RunRecord.for_model(tmp_path / "checkpoint-9") is None  # no such folder: not its parent's record
    model, _ = load_trained(checkpoint)
    assert model.get_base_model().is_loaded_in_4bit
    result = merge_adapter(checkpoint, tmp_path / "merged")
    assert result.method == "dequantize"
    assert result.parity.passed and result.parity.max_abs_diff < EXACT, result.parity.summary()
    merged = RunRecord.read(tmp_path / "merged")
    assert merged.finished and merged.merge.method == "dequantize"

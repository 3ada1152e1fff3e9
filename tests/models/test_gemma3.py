"""Gemma 3's family-sensitive parts on tiny:gemma3 (alignkit.testing.tiny: 2 sliding-window layers of 8 tokens and one
full-attention layer, tied embeddings, Gemma's special tokens, no chat template): SFT in Gemma's own chat format,
merge parity with the tied head kept tied, trainable token rows through trl's fused LM head, 4-bit load, the SFT ->
DPO hand-off, the sequence-classification head (and a clear refusal for the heads transformers lacks), and packed
rows longer than the window attending exactly as the model's own masked attention."""

import pytest
import torch
from conftest import run_recipe, train_losses
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError
from alignkit.export.merge import merge_adapter
from alignkit.models.loader import load_base_model
from alignkit.speedups.attention import register, use_fast_attention
from alignkit.testing.tiny import GEMMA3_WINDOW

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--gradient_checkpointing", "false", "--lora_dropout", "0"]
SFT = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", "tiny:gemma3", "--chat_template", "gemma3",
       "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "8", "--learning_rate", "2e-2", *FAST]  # fmt: skip


def _sft(out, *extra):
    run_recipe("sft", [*SFT, "--output_dir", str(out), *extra])
    return out


@pytest.fixture(scope="module")
def sft_head(tmp_path_factory):
    """LoRA plus the (tied) LM head trained in full (lora_modules_to_save: [lm_head])."""
    return _sft(tmp_path_factory.mktemp("sft_head"), "--lora_modules_to_save", "[lm_head]")


def test_tiny_gemma3_is_gemma3_in_miniature():
    model = load_base_model(ModelArguments(model_name_or_path="tiny:gemma3"))
    config, tok = model.config, AutoTokenizer.from_pretrained(model.name_or_path)
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.tie_word_embeddings
    assert config.sliding_window == GEMMA3_WINDOW and config.layer_types.count("sliding_attention") == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template is None and tok.convert_tokens_to_ids("<end_of_turn>") != tok.unk_token_id


def test_lora_sft_in_gemmas_chat_format_learns_and_merges_exactly(tmp_path):
    out = _sft(tmp_path / "sft")
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                                   tokenize=False)  # fmt: skip
    assert text.startswith("<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyes<end_of_turn>")
    result = merge_adapter(out, tmp_path / "merged")
    assert result.parity.passed and result.parity.max_abs_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    eos = merged.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in (eos if isinstance(eos, list) else [eos])


def test_trained_tied_head_survives_merge_still_tied(sft_head, tmp_path):
    """modules_to_save: [lm_head] on a tied model trains the one shared matrix (peft's ensure_weight_tying): the
    merged model is still tied, its head is the trained one (not the base's), and the logits match base + adapter."""
    result = merge_adapter(sft_head, tmp_path / "merged")
    assert result.parity.passed and result.parity.max_abs_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = load_base_model(ModelArguments(model_name_or_path="tiny:gemma3"))
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert (merged.lm_head.weight - base.lm_head.weight).abs().max() > 1e-3  # the trained head, kept


def test_new_token_rows_train_through_the_fused_head_and_survive_merge(tmp_path):
    """chat_template: chatml adds <|im_start|>/<|im_end|> rows, trained as peft trainable tokens; on a tied head
    peft's wrapper has no ``bias``, which trl's fused LM head reads (alignkit exposes it). The rows survive merge."""
    out = _sft(tmp_path / "sft", "--chat_template", "chatml")
    assert train_losses(out)[-1] < train_losses(out)[0]
    result = merge_adapter(out, tmp_path / "merged")
    assert result.parity.passed and result.parity.max_abs_diff < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    im_end = AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("<|im_end|>")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and im_end >= 512  # a new row, still tied
    assert merged.model.embed_tokens.weight[im_end].abs().sum() > 0


def test_4bit_load_and_dpo_handoff(sft_head, tmp_path):
    four_bit = load_base_model(
        ModelArguments(model_name_or_path="tiny:gemma3"), QuantizationArguments(load_in_4bit=True)
    )
    assert any(type(m).__name__ == "Linear4bit" for m in four_bit.modules())
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
    assert torch.isfinite(four_bit(input_ids=ids).logits).all()
    out = tmp_path / "dpo"
    run_recipe("dpo", ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(sft_head), "--load_in_4bit",
                       "false", "--test_size", "0", "--max_train_samples", "8", "--max_steps", "2",
                       "--output_dir", str(out), *FAST])  # fmt: skip
    assert (out / "adapter_model.safetensors").is_file() and len(train_losses(out)) == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(sft_head).chat_template


def test_sequence_classification_head_trains_and_missing_heads_are_refused(tmp_path):
    task = [
        "--model_name_or_path",
        "tiny:gemma3",
        "--load_in_4bit",
        "false",
        "--max_steps",
        "6",
        "--disable_tqdm",
        "true",
    ]
    run_recipe("task", ["--config", "recipes/tiny/task_cls.yaml", *task, "--output_dir", str(tmp_path / "cls")])
    assert train_losses(tmp_path / "cls")[-1] < train_losses(tmp_path / "cls")[0]
    with pytest.raises(ConfigError, match=r"no AutoModelForTokenClassification .* \['causal_lm', 'seq_cls'\]"):
        run_recipe("task", ["--config", "recipes/tiny/task_ner.yaml", *task, "--output_dir", str(tmp_path / "ner")])


def test_packed_rows_longer_than_the_window_attend_as_the_models_own_mask():
    """Per-document SDPA drops the mask, which is right only for plain causal layers: on sliding-window layers the
    attention module's rule keeps transformers' own masked SDPA, whose packed rows (3x the window) equal each row
    alone. Forced on, per-document attention would see past the window: the rule has teeth."""
    model = load_base_model(ModelArguments(model_name_or_path="tiny:gemma3")).eval()
    assert use_fast_attention(model) is None and model.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    lengths = [3 * GEMMA3_WINDOW, 2 * GEMMA3_WINDOW + 3, 5]
    ids = torch.randint(10, 500, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
        starts = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
        alone = torch.cat([model(input_ids=ids[:, s:e], use_cache=False).logits[0] for s, e in zip(starts, starts[1:])])
        assert torch.allclose(packed, alone, atol=1e-5)
        model.set_attn_implementation(register())
        forced = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
        model.set_attn_implementation("sdpa")
    assert (forced - alone).abs().max() > 1e-3


def test_grpo_on_a_4bit_backbone_raises_its_reward_and_merges(tmp_path):
    """GRPO in Gemma's chat format on the 4-bit tiny Gemma 3, its tied head trained too (lora_modules_to_save, one
    shared matrix): the reward rises and the dequantize merge passes its parity gate."""
    from conftest import log_history

    out = tmp_path / "grpo"
    run_recipe("grpo", ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:gemma3", "--chat_template",
                        "gemma3", "--load_in_4bit", "true", "--lora_modules_to_save", "[lm_head]", "--num_generations",
                        "8", "--per_device_train_batch_size", "16", "--max_completion_length", "16", "--reward_funcs",
                        "alignkit.testing.rewards:plain_letters", "--learning_rate", "2e-2", "--max_steps", "12",
                        "--output_dir", str(out), *FAST])  # fmt: skip
    rewards = [e["reward"] for e in log_history(out) if "reward" in e]
    assert len(rewards) == 12 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    merged = merge_adapter(out, tmp_path / "merged")
    assert merged.method == "dequantize" and merged.parity.passed

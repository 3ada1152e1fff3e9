"""The Ollama Modelfile beside every GGUF (issue 40): its stop parameters are the tokenizer's end-of-turn ids (what
chat, the merged generation_config and the export gate stop on), its TEMPLATE is the family's, its SYSTEM the
default prompt the family's template inserts; a family without an Ollama template says so instead of guessing."""

from __future__ import annotations

import re

import pytest

from alignkit.export.modelfile import GO_TEMPLATES, modelfile_text

FAMILIES = ["smollm2", "qwen2_5", "gemma3", "llama3", "phi3"]


def _saved(tmp_path, family):
    from alignkit.testing.families import family_tokenizer

    tokenizer = family_tokenizer(family)
    tokenizer.save_pretrained(tmp_path / family)
    return tmp_path / family, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_parameters_are_the_tokenizers_end_of_turn_ids(tmp_path, family):
    from alignkit.data.templates import end_of_turn_ids

    folder, tokenizer = _saved(tmp_path, family)
    text, found = modelfile_text(folder, folder / "m-f16.gguf")
    assert found == family
    assert text.splitlines()[1] == "FROM ./m-f16.gguf"
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    assert [tokenizer.convert_tokens_to_ids(s) for s in stops] == end_of_turn_ids(tokenizer)
    family_end = {"smollm2": "<|im_end|>", "qwen2_5": "<|im_end|>", "gemma3": "<end_of_turn>",
                  "llama3": "<|eot_id|>", "phi3": "<|end|>"}[family]  # fmt: skip
    assert family_end in stops
    if family in GO_TEMPLATES:
        assert f'TEMPLATE """{GO_TEMPLATES[family]}"""' in text
    else:
        assert "TEMPLATE" not in text.replace("no Ollama TEMPLATE", "") and "embedded in the GGUF" in text


def test_the_default_system_prompt_is_the_one_the_template_inserts(tmp_path):
    folder, tokenizer = _saved(tmp_path, "smollm2")
    text, _ = modelfile_text(folder, folder / "m.gguf")
    system = re.search(r'^SYSTEM """(.*)"""$', text, flags=re.M).group(1)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith(f"<|im_start|>system\n{system}<|im_end|>\n") and "SmolLM" in system
    folder, _ = _saved(tmp_path, "llama3")
    assert "SYSTEM" not in modelfile_text(folder, folder / "m.gguf")[0]

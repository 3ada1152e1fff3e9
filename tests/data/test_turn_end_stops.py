"""Every token a family's template ends an assistant turn with, in any branch, is a stop (defect 17b-1): Llama 3.1
ends a built-in tool call (``builtin_tools``, ``<|python_tag|>``) with ``<|eom_id|>``, which Meta's generation config
lists among the eos ids; alignkit's stops missed it, so a model trained in that format ran on after such a call in
chat/generate, GRPO sampling, the merged generation_config and the Modelfile. Tokenizer-only, on tiny:llama's base
vocabulary with each family installed (as ``chat_template: <family>`` does) and on the family tokenizers."""

import json
import re

import pytest

from alignkit.data.chat_families import FAMILIES, family_names, save_tokenizer
from alignkit.data.chat_probes import PROBE_TOOLS, PROBES, TOOL_NAME
from alignkit.data.templates import end_of_turn_ids, span_stop, special_ids, turn_spans
from alignkit.models import apply_contract
from alignkit.testing.families import family_tokenizer

# the tools probe's call made to a tool the template treats as built in (Llama 3.1: <|python_tag|> ... <|eom_id|>)
BUILTIN = (PROBES["tools"][0], {"tools": PROBE_TOOLS, "builtin_tools": [TOOL_NAME]})


def _replies(tok):
    """(probe, the trained ids that end each assistant turn a reply ends: followed by a tool result or by nothing),
    rendered by the tokenizer's (twin) template: what a sampler must stop after."""
    for name, (messages, kwargs) in {**PROBES, "builtin": BUILTIN}.items():
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or (i + 1 < len(messages) and messages[i + 1]["role"] == "user"):
                continue
            try:
                out = tok.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True, **kwargs)  # fmt: skip
            except Exception:  # noqa: BLE001 - the template refuses this probe (Gemma's alternating roles)
                continue
            ids = list(out["input_ids"])
            a, b = turn_spans(ids, list(out["assistant_masks"]), tok)[-1]
            yield f"{name}[:{i + 1}]", span_stop(ids[a:b], special_ids(tok), tok)


@pytest.mark.parametrize("family", [f for f in family_names() if f != "chatml_eos"])
def test_every_turn_a_reply_ends_ends_on_a_stop_token(family):
    from alignkit.testing.tiny import _base_llama_tokenizer

    tok = _base_llama_tokenizer()
    apply_contract(tok, chat_template=family, chat=True, assistant_only_loss=True)  # the twin, every marker added
    stops = set(tok.alignkit_stop_ids)
    assert stops == set(end_of_turn_ids(tok))
    for probe, stop in _replies(tok):
        assert stop is not None and stop in stops, (probe, tok.convert_ids_to_tokens(sorted(stops)))
    from alignkit.data.chat_families import stop_tokens

    assert set(tok.convert_tokens_to_ids(list(stop_tokens(family)))) <= stops


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_family_tokenizers_stop_where_their_turns_end(family):
    tok = family_tokenizer(family)  # the stock template (chat, generate, merge, Modelfile read this)
    stops = set(end_of_turn_ids(tok))
    apply_contract(tok, chat=True, assistant_only_loss=True)  # the twin
    for probe, stop in _replies(tok):
        assert stop in stops, (probe, tok.convert_ids_to_tokens(sorted(stops)))


def test_llama3_1_builtin_tool_call_stops_on_eom_id_everywhere(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.export.modelfile import modelfile_text

    tok = family_tokenizer("llama3_1")
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    text = tok.apply_chat_template(BUILTIN[0][:2], tokenize=False, **BUILTIN[1])
    assert text.endswith('<|python_tag|>add_numbers.call(probe_arg_7f3="probe_value_4a1")<|eom_id|>')
    assert eom in end_of_turn_ids(tok)  # chat, generate, eval, GRPO's sampler (alignkit_stop_ids)
    apply_contract(tok, chat=True, assistant_only_loss=True)
    assert eom in tok.alignkit_stop_ids
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    save_tokenizer(tok, tmp_path, model)  # the saved run / merged folder
    assert eom in json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    modelfile, _ = modelfile_text(tmp_path, tmp_path / "m.gguf")
    assert "<|eom_id|>" in re.findall(r'^PARAMETER stop "(.*)"$', modelfile, flags=re.M)
    from alignkit.data.chat_families import stop_tokens  # what the GGUF export checks llama.cpp's vocabulary for

    assert stop_tokens("llama3_1") == ("<|eot_id|>", "<|eom_id|>")

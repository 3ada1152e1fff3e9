"""The stop tokens are those that end the reply generation writes, never a marker that closes a history turn or a
message inside the reply (defect rev17d-1: gpt-oss's ``<|end|>`` closes its analysis channel and past final
messages; as a stop it cut every reasoning reply after its thinking, in chat/generate/eval, the merge's
generation_config, GRPO sampling and the Ollama Modelfile)."""

import os

import pytest

from alignkit.data.chat_families import FAMILIES
from alignkit.data.templates import end_of_turn_ids
from alignkit.models import apply_contract
from alignkit.testing.families import SPECS, family_tokenizer


def test_gptoss_stops_on_return_and_call_not_on_the_analysis_end():
    tok = family_tokenizer("gptoss")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    # gpt-oss's own generation_config: <|return|>, <|call|> (and <|endoftext|>); <|end|> is not a stop
    assert tok.convert_ids_to_tokens(tok.alignkit_stop_ids) == ["<|return|>", "<|call|>"]
    assert tok.alignkit_stop_ids == end_of_turn_ids(family_tokenizer("gptoss"))  # as a saved run loads it
    # a reasoning reply as the trained model writes it after the generation prompt '<|start|>assistant'
    reply = "<|channel|>analysis<|message|>Two and two.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    first_stop = next(i for i, t in enumerate(ids) if t in tok.alignkit_stop_ids)
    assert first_stop == len(ids) - 1  # generation runs through the final channel, not cut after the thinking


@pytest.mark.parametrize("family", sorted(SPECS))
def test_every_stop_ends_the_last_reply_or_a_call(family):
    """Each family's stop ids: eos, the token after the last assistant reply, and a tool call's own stop; the
    family's end-of-turn is among them, and no stop token occurs inside the rendered last reply."""
    tok = family_tokenizer(family)
    apply_contract(tok, chat=True, assistant_only_loss=True)
    stops = tok.alignkit_stop_ids
    assert tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn) in stops
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "It is 4."}], tokenize=False)
    reply = tok(full[len(os.path.commonprefix([prompt, full])) :], add_special_tokens=False)["input_ids"]
    cut = next(i for i, t in enumerate(reply) if t in stops)
    assert "It is 4." in tok.decode(reply[: cut + 1])

"""Replies of reasoning families as alignkit chat / generate / eval give them (defect rev17d-2): the reply's content,
read by the family's response parser, not the decoded text with the thinking in front of it. Before, Qwen3's
'<think>...</think>' stayed in every reply (eval's exact scored a right answer wrong) and gpt-oss's analysis
channel ran into the answer ('analysisAdd.assistantfinalIt is 4.'), also in a chat's history."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from alignkit.export.evaluate import score
from alignkit.export.generate import generate_replies
from alignkit.models import apply_contract
from alignkit.testing.families import family_tokenizer


class Force(LogitsProcessor):
    """Makes a model write ``ids`` after the prompt, one token a step (what a trained model would write)."""

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.start
        scores = torch.full_like(scores, -float("inf"))
        scores[:, self.ids[min(k, len(self.ids) - 1)]] = 0.0
        return scores


WRITTEN = {
    "qwen3": "<think>\nAdd two and two.\n</think>\n\nIt is 4.<|im_end|>",
    "gptoss": "<|channel|>analysis<|message|>Add two and two.<|end|><|start|>assistant<|channel|>final<|message|>"
    "It is 4.<|return|>",
}


@pytest.mark.parametrize("family", sorted(WRITTEN))
def test_a_reasoning_reply_is_its_answer_in_generate_and_eval(family):
    tok = family_tokenizer(family)
    apply_contract(tok, chat=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    start = len(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    force = LogitsProcessorList([Force(start, tok(WRITTEN[family], add_special_tokens=False)["input_ids"])])
    replies = generate_replies(model, tok, [chat], max_new_tokens=64, logits_processor=force)
    assert replies == ["It is 4."]
    _, summary = score(replies, ["It is 4."], "exact")  # alignkit eval scores these replies
    assert summary["exact"] == 1.0


def test_a_reply_the_parser_cannot_read_is_shown_as_written():
    """A gpt-oss reply cut before any channel (a barely trained model) is not emptied by the parser."""
    from alignkit.export.generate import reply_text

    tok = family_tokenizer("gptoss")
    apply_contract(tok, chat=True)
    prefix = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
    ids = tok("to 23 to 23", add_special_tokens=False)["input_ids"]
    assert reply_text(tok, ids, prefix, tok.alignkit_stop_ids) == tok.decode(ids, skip_special_tokens=True) != ""

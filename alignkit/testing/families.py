"""Tiny offline tokenizers that carry a chat family's special tokens and its stock template (no download).

``family_tokenizer("qwen3")`` is a byte-level BPE tokenizer trained on alignkit's built-in corpus (as tiny:llama's),
with Qwen3's special tokens, bos/eos as the family's instruct checkpoints set them, and the stock template trl (or
alignkit) stores byte-identically. Tests of every family run on these in well under a second each.
"""

from __future__ import annotations

import functools

# family -> (special tokens, bos, eos, pad); the first token list entries are special, in the families' own spelling.
_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_LLAMA3 = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>", "<|finetune_right_pad_id|>",
]  # fmt: skip
_QWEN = [*_CHATML, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
_GEMMA = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_PHI3 = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_DEEPSEEK = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<pad>",
]  # fmt: skip
_GPTOSS = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
           "<|constrain|>", "<|startoftext|>"]  # fmt: skip
_PHI4 = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_85|>"]
_MISTRAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]

SPECS: dict[str, tuple[list[str], str | None, str, str | None]] = {
    "llama3": (_LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "llama3_1": (_LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "llama3_2": (_LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "qwen2_5": (_QWEN, None, "<|im_end|>", "<|endoftext|>"),
    "qwen3": (_QWEN, None, "<|im_end|>", "<|endoftext|>"),
    "gemma": (_GEMMA, "<bos>", "<eos>", "<pad>"),
    "gemma3": (_GEMMA, "<bos>", "<eos>", "<pad>"),
    "phi3": (_PHI3, "<s>", "<|endoftext|>", "<|endoftext|>"),
    "phi3_5": (_PHI3, "<s>", "<|endoftext|>", "<|endoftext|>"),
    "deepseek_r1_distill": (_DEEPSEEK, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>"),
    "gptoss": (_GPTOSS, "<|startoftext|>", "<|return|>", "<|endoftext|>"),
    "mistral": (_MISTRAL, "<s>", "</s>", None),
    "phi4": (_PHI4, "<|endoftext|>", "<|im_end|>", "<|dummy_85|>"),
    "smollm2": (_CHATML, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
}


@functools.cache
def _backend(specials: tuple[str, ...]):
    from alignkit.testing.tiny import _bpe_tokenizer

    return _bpe_tokenizer(list(specials)).to_str()


def family_tokenizer(family: str, with_template: bool = True):
    """A tiny tokenizer with ``family``'s special tokens and, with ``with_template``, its stock chat template
    (without: a base model's tokenizer, no template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from alignkit.data.chat_families import stock_template

    specials, bos, eos, pad = SPECS[family]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend(tuple(specials))),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
    )
    tok.model_max_length = 1024
    if with_template:
        tok.chat_template = stock_template(family)
    return tok

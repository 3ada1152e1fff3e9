"""Text (not chat) is tokenized for training and scoring as trl tokenizes it: with the tokenizer's own special tokens.

A family whose tokenizer starts every sequence with bos (Llama 3, Gemma, Mistral; here tiny:gemma3's ``<bos>``) then
trains and is scored on the sequences it sees at inference. The reference is trl's own preprocessing (its trainers'
``_prepare_dataset``), not a copy of it."""

from types import SimpleNamespace

import pytest
from datasets import Dataset

from alignkit.testing.tiny import tiny_tokenizer

DOCS = ["the cat sat on the mat.", "two plus two makes four.", "a third short document here."]


@pytest.fixture(scope="module")
def gemma_tokenizer():
    tokenizer = tiny_tokenizer("gemma3")
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the premise: it prepends bos
    return tokenizer


def test_cpt_blocks_hold_each_document_as_trl_tokenizes_text(gemma_tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from alignkit.data.packing import pack_text_blocks

    text = Dataset.from_list([{"text": d} for d in DOCS])
    args = SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", report_to=[], bf16=False)
    trl_docs = SFTTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=gemma_tokenizer, chat_template=None, completion_only_loss=False),
        text,
        gemma_tokenizer,
        args,
        False,
        None,
        "train",
    )["input_ids"]
    stream = [token for doc in trl_docs for token in doc]
    assert stream[0] == gemma_tokenizer.bos_token_id and stream.count(gemma_tokenizer.bos_token_id) == len(DOCS)
    blocks = pack_text_blocks(text, gemma_tokenizer, 4)["input_ids"]
    assert [token for block in blocks for token in block] == stream[: len(stream) // 4 * 4]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_reward_model_scores_pairs_tokenized_as_trl_trained_it(kind, gemma_tokenizer, tmp_path):
    from trl import RewardConfig, RewardTrainer

    from alignkit.export.reward_model import pair_ids

    tokenizer = gemma_tokenizer if kind == "text" else tiny_tokenizer("llama")  # tiny:llama has a chat template
    prompt, chosen, rejected = "What is 2 + 2?", " 2 + 2 = 4.", " I do not know."
    if kind == "chat":
        prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = ([{"role": "assistant", "content": c.strip()}] for c in (chosen, rejected))
    pairs = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    args = RewardConfig(output_dir=str(tmp_path), max_length=None, report_to=[], bf16=False)
    trained = RewardTrainer._prepare_dataset(None, pairs, tokenizer, args, "train")[0]
    assert pair_ids(tokenizer, prompt, chosen) == trained["chosen_ids"]
    assert pair_ids(tokenizer, prompt, rejected) == trained["rejected_ids"]

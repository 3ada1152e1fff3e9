"""seq2seq with ``predict_with_generate`` and no ``generation_max_length`` (issue 37, case 5): predictions may grow to
``max_target_length`` (not transformers' implicit 20), and the eval reports how many were cut (``generations_cut``).
"""

from __future__ import annotations

import numpy as np
from conftest import run_recipe, write_jsonl

from alignkit.tasks.seq2seq import cut_generations
from alignkit.train import runner

NUMBERS = "zero one two three four five six seven eight nine".split()


def rows(n: int) -> list[dict]:
    """Digit strings -> number words, 15 to 30 digits: targets of 17 to 32 tokens with tiny:bart's tokenizer."""
    out = []
    for i in range(n):
        digits = [(i * 7 + k * 3) % 10 for k in range(15 + i % 16)]
        out.append({"source": " ".join(map(str, digits)), "target": " ".join(NUMBERS[d] for d in digits)})
    return out


def test_predictions_may_grow_as_long_as_the_targets_need_and_cuts_are_counted(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "s2s.jsonl", rows(24))
    seen: dict = {}
    train = runner.Run.train

    def keep(self, trainer, **kwargs):
        seen["trainer"] = trainer
        return train(self, trainer, **kwargs)

    monkeypatch.setattr(runner.Run, "train", keep)
    argv = ["--task", "seq2seq", "--model_name_or_path", "tiny:bart", "--datasets", str(data), "--test_size", "8",
            "--max_length", "32", "--max_target_length", "40", "--predict_with_generate", "true",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_steps", "1",
            "--load_in_4bit", "false", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    metrics = run_recipe("task", argv)
    trainer = seen["trainer"]
    tokenizer = trainer.processing_class
    targets = [len(tokenizer(text_target=r["target"])["input_ids"]) for r in rows(24)]
    assert min(targets) >= 17 and max(targets) >= 30  # longer than 20 tokens: the implicit limit cut them
    assert trainer.args.generation_max_length == 41  # max_target_length + the decoder start token
    saved = (tmp_path / "out" / "alignkit_config.yaml").read_text()  # what ran, as a resume compares it
    assert "generation_max_length: 41" in saved

    out = trainer.predict(trainer.eval_dataset)
    predictions = out.predictions
    eos = tokenizer.eos_token_id
    for row in predictions:  # each stopped on eos, or ran to the full target length: none cut at 20
        ids = [t for t in row.tolist() if t not in (-100, tokenizer.pad_token_id)]
        assert eos in ids or len(ids) == 41, ids
    assert metrics["eval_generations_cut"] == cut_generations(predictions, eos)

    # what transformers' implicit limit did: every prediction of a 20-token budget that did not stop is cut short
    short = trainer.predict(trainer.eval_dataset, max_length=20).predictions
    assert short.shape[1] <= 20 < max(targets)
    assert cut_generations(np.asarray([[5, 6, eos, 1], [5, 6, 7, 8]]), eos) == 1

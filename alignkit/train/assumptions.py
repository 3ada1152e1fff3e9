"""What each trl trainer assumes of the rows it was handed, checked on the rows it prepared, before step 1.

Run by :meth:`alignkit.train.runner.Run.train` after the trainer is built (it has tokenized the data):

- KTO: every KL pair (trl's +1 rotation per block of ``per_device_train_batch_size`` rows) is mismatched
  (:func:`check_kl_pairs`; the order is made so by :func:`alignkit.data.pairing.kl_order`).
- DPO, KTO, ORPO, SimPO, reward: every trained reply ends on the chat template's end-of-turn exactly once
  (:func:`doubled_stop_rows`). trl's experimental ORPO/CPO trainers append eos unless the reply's *last token* is
  eos, so a ChatML reply rendered as ``...<|im_end|>\\n`` trains ``<|im_end|>\\n<|im_end|>`` (huggingface/trl#4481):
  :func:`drop_appended_eos` removes that appended eos (and the whitespace before it) first.
- GRPO: sampling stops on the end-of-turn (:func:`set_stop_ids`, before the trainer is built) and the share of
  completions that did is logged as ``completions/stopped_ratio`` (:class:`StopShare`; warns once if it stays 0).

The stop tokens are what the tokenizer contract proved by rendering (``tokenizer.alignkit_stop_ids``,
:func:`alignkit.data.templates.end_of_turn_ids`).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from alignkit.data.pairing import kl_shares_prompt
from alignkit.errors import PreflightError

logger = logging.getLogger("alignkit")

# The tokenized reply columns of each trainer's prepared rows, and whether they hold labels (-100: not trained).
_REPLY_COLUMNS = (
    (("chosen_labels", "rejected_labels"), True),  # trl.experimental ORPO / CPO (SimPO)
    (("chosen_ids", "rejected_ids"), False),  # DPO (the reply after the prompt), reward (the whole sequence)
    (("completion_ids",), False),  # KTO
)


def stop_ids(tokenizer) -> list[int]:
    """The end-of-turn ids the tokenizer contract proved (eos first), or ``[eos]`` for a tokenizer without it."""
    ids = getattr(tokenizer, "alignkit_stop_ids", None)
    if ids:
        return list(ids)
    return [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []


def set_stop_ids(model, tokenizer) -> list[int]:
    """Make ``model.generation_config.eos_token_id`` the end-of-turn ids (what trl's GRPO sampler and its
    ``clipped_ratio`` stop on; merge, chat and generate stop on the same). Returns them."""
    ids = stop_ids(tokenizer)
    config = getattr(model, "generation_config", None)
    if config is not None and ids:
        current = config.eos_token_id
        current = [] if current is None else [current] if isinstance(current, int) else list(current)
        config.eos_token_id = [*ids, *(i for i in current if i not in ids)]
        if tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
    return ids


def _trained(row: dict, columns: tuple[str, ...], labels: bool):
    for column in columns:
        ids = row[column]
        yield [t for t in ids if t != -100] if labels else list(ids)


def _doubled(ids: list[int], stops: set[int], blank: set[int]) -> bool:
    """The tokens end on two stop tokens with only whitespace between them (``<|im_end|>\\n<|im_end|>``)."""
    seen = 0
    for token in reversed(ids):
        if token in stops:
            seen += 1
            if seen == 2:
                return True
        elif token not in blank or not seen:
            return False
    return False


def _blank_ids(tokenizer, rows_ids) -> set[int]:
    """Ids among ``rows_ids`` that decode to whitespace only."""
    seen = {t for ids in rows_ids for t in ids[-4:]}
    return {t for t in seen if t >= 0 and not tokenizer.decode([t]).strip()}


def doubled_stop_rows(data, tokenizer) -> int:
    """How many rows of a prepared preference split train a reply that ends on two end-of-turn tokens."""
    stops = set(stop_ids(tokenizer))
    for columns, labels in _REPLY_COLUMNS:
        if stops and set(columns) <= set(data.column_names):
            replies = [r for row in data.select_columns(list(columns)) for r in _trained(row, columns, labels)]
            blank = _blank_ids(tokenizer, replies) - stops
            per_row = len(columns)
            return sum(
                any(_doubled(r, stops, blank) for r in replies[i : i + per_row])
                for i in range(0, len(replies), per_row)
            )
    return 0


def drop_appended_eos(data, tokenizer):
    """ORPO / CPO rows: where trl appended eos to a reply that already ended on an end-of-turn (plus whitespace),
    drop the appended eos and that whitespace from the reply's input ids, attention mask and labels."""
    stops, eos = set(stop_ids(tokenizer)), tokenizer.eos_token_id
    if eos is None or "chosen_labels" not in data.column_names:
        return data
    replies = [row[c] for row in data.select_columns(["chosen_labels", "rejected_labels"]) for c in row]
    blank = _blank_ids(tokenizer, replies) - stops

    def trim(row):
        for side in ("chosen", "rejected"):
            labels = row[f"{side}_labels"]
            if labels and labels[-1] == eos and _doubled(labels, stops, blank):
                cut = len(labels) - 1
                while labels[cut - 1] in blank:
                    cut -= 1
                for key in ("input_ids", "attention_mask", "labels"):
                    row[f"{side}_{key}"] = row[f"{side}_{key}"][:cut]
        return row

    return data.map(trim, desc="one end-of-turn per reply")


def check_kl_pairs(trainer) -> None:
    """KTO: PreflightError if any KL pair (trl's rotation of the prepared rows) has its row's own prompt."""
    if not getattr(trainer, "calculate_KL", False):
        return
    block = trainer.args.per_device_train_batch_size
    for split, data in (("train", trainer.train_dataset), ("test", trainer.eval_dataset)):
        if data is None or not hasattr(data, "__len__") or "prompt_ids" not in data.column_names:
            continue
        bad = kl_shares_prompt(list(data["prompt_ids"]), block)
        if bad:
            raise PreflightError(
                f"KTO {split} split: {len(bad)} of {len(data)} KL pairs (trl pairs each row with the previous row's "
                f"completion in its batch of {block}) have the row's own prompt, first at row {bad[0] + 1}, so the KL "
                "baseline would be estimated on matched pairs. Fix: give each prompt fewer rows than there are other "
                "prompts (a prompt with most of the rows leaves no other prompt to pair with), or change "
                "per_device_train_batch_size so that no batch holds a single row."
            )


def check_one_stop(trainer, stage: str) -> None:
    """Preference stages: the appended-eos fix (ORPO/SimPO), then PreflightError if any row still trains two
    end-of-turn tokens at the end of a reply."""
    tokenizer = trainer.processing_class
    for split in ("train_dataset", "eval_dataset"):
        data = getattr(trainer, split)
        if data is None or not hasattr(data, "__len__") or not hasattr(data, "column_names"):
            continue
        if stage in ("orpo", "simpo"):
            data = drop_appended_eos(data, tokenizer)
            setattr(trainer, split, data)
        doubled = doubled_stop_rows(data, tokenizer)
        if doubled:
            raise PreflightError(
                f"{stage}: {doubled} of {len(data)} {split.split('_')[0]} rows train a reply that ends on two "
                "end-of-turn tokens, a second one the model never produces at inference. Fix: end each reply on the "
                "chat template's end-of-turn once (drop a stop token written into the data)."
            )


class StopShare(TrainerCallback):
    """GRPO: log ``completions/stopped_ratio`` (the share of completions that ended on a stop token, 1 -
    trl's ``clipped_ratio``) next to trl's completion metrics, and warn once at the end of training if it stayed
    0: every completion ran to ``max_completion_length``, so the rewards scored text past the reply."""

    def __init__(self, max_completion_length: int | None):
        self.max_completion_length, self.best = max_completion_length, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for prefix in ("", "eval_"):
            clipped = (logs or {}).get(f"{prefix}completions/clipped_ratio")
            if clipped is not None:
                logs[f"{prefix}completions/stopped_ratio"] = 1.0 - clipped
                if state.log_history and state.log_history[-1].get(f"{prefix}completions/clipped_ratio") == clipped:
                    state.log_history[-1][f"{prefix}completions/stopped_ratio"] = 1.0 - clipped
                self.best = max(self.best or 0.0, 1.0 - clipped)

    def on_train_end(self, args, state, control, **kwargs):
        if self.best == 0.0:
            logger.warning(
                "GRPO: completions/stopped_ratio stayed 0: no completion ended on a stop token within "
                "max_completion_length %s, so the loss and the rewards saw text past the reply. Fix: raise "
                "max_completion_length, or check the chat template's end-of-turn (the tokenizer contract's stop ids).",
                self.max_completion_length,
            )


def check_trainer_assumptions(trainer, stage: str) -> None:
    """Every check of this module that applies to ``stage``'s trainer (see the module docstring)."""
    if stage in ("dpo", "kto", "orpo", "simpo", "reward"):
        check_one_stop(trainer, stage)
    if stage == "kto":
        check_kl_pairs(trainer)
    if stage in ("grpo", "rloo"):
        trainer.callback_handler.callbacks.insert(0, StopShare(getattr(trainer.args, "max_completion_length", None)))

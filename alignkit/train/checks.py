"""Checks made after the trainer is built and before the first training step: the hand-off, that the model fits the
head and lengths, assistant-only labels, the Hub token, stop tokens within max_length, and disk for the checkpoints;
each failure is one PreflightError naming the path or key and the fix. The other preflight checks live with what they
check and run earlier in every recipe: the output folder and resume (alignkit.train.output_folder,
alignkit.train.resume), config keys and combinations (alignkit.config), every data row (alignkit.data.schemas,
alignkit.tasks), the tokenizer contract (alignkit.models.tokenizer), weights format and LoRA target modules
(alignkit.models.loader), Hub repo write access when push_to_hub is set (alignkit.export.hub.preflight_push).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from alignkit.errors import DataError, PreflightError

logger = logging.getLogger(__name__)


# Adapter settings that a 'continue' hand-off cannot apply: they give the adapter's weights their shapes and scale
# (r, target modules, DoRA's magnitudes, alpha and rsLoRA's scaling). lora_dropout is not one of them: it holds no
# weights, so the continued adapter takes the recipe's value when the recipe sets one (alignkit.models.loader; trl's
# preference trainers zero every dropout anyway with their default disable_dropout: true).
_ADAPTER_KEYS = {
    "lora_r": "r", "lora_alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora",
    "lora_target_modules": "target_modules",
}  # fmt: skip


def check_handoff(recipe, source) -> None:
    """With ``adapter_handoff: continue`` an earlier stage's adapter keeps training with its own shapes and scale:
    an adapter setting the recipe sets to another value (:data:`_ADAPTER_KEYS`) cannot apply, and is refused rather
    than silently ignored, naming the recipe's value and the adapter's ``adapter_config.json``. Keys the recipe does
    not set are inherited from the adapter. (That the adapter's head is this stage's is :func:`check_model_fits`'s,
    which runs first.)"""
    if source.adapter_dir is None or recipe.model.adapter_handoff != "continue" or not recipe.adapter.use_peft:
        return
    config_file = Path(source.adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    clashes = []
    for key, peft_key in _ADAPTER_KEYS.items():
        if key not in recipe.explicit or peft_key not in config:
            continue
        want, have = getattr(recipe.adapter, key), config[peft_key]
        if key == "lora_target_modules" and not isinstance(want, str):
            want, have = sorted(want), sorted(have) if isinstance(have, list) else have
        if want != have:
            clashes.append(f"{key} {want!r} in the recipe, {peft_key} {have!r} in {config_file}")
    if clashes:
        raise PreflightError(
            f"adapter_handoff continue: {source.adapter_dir}'s adapter keeps training with its own shapes and scale, so "
            f"{'; '.join(clashes)} cannot both hold. Fix: drop those keys from the recipe (they are inherited from the "
            "adapter), or set adapter_handoff: merge to merge it and train a new adapter with them."
        )


LENGTH_KEYS = ("block_size", "max_length", "max_seq_length", "max_target_length", "generation_max_length")


def check_model_fits(recipe, source, head: str = "causal_lm") -> None:
    """Before the tokenizer and data: the model's config fits the stage (a causal-LM stage needs a decoder, an
    earlier stage's adapter continues only with its head: models.loader.check_head_fits), and so do the sequence
    lengths the recipe sets (``block_size``, ``max_length``, ``max_target_length``, ``generation_max_length``) fit
    its positions (``max_position_embeddings`` / ``n_positions``): beyond them learned position embeddings index out
    of range and RoPE models train on positions they never saw. A model whose RoPE is scaled (``rope_type`` other
    than ``default``: linear, dynamic, yarn, ...) extends its context on purpose, and its lengths are not checked.
    Only lengths the recipe sets are checked: the upstream defaults are cut to the data."""
    from alignkit.models.loader import check_head_fits, load_config

    config = load_config(recipe.model, source)
    check_head_fits(recipe.model, config, head, source)
    set_here = [k for k in LENGTH_KEYS if k in recipe.explicit]
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(limit, int) or rope.get("rope_type", "default") != "default":
        return
    for key in set_here:
        value = next((getattr(g, key) for g in recipe.groups if g is not None and hasattr(g, key)), None)
        if isinstance(value, int) and value > limit:
            raise PreflightError(
                f"{key}: {value} tokens is more than '{recipe.model.model_name_or_path}' has positions for "
                f"(max_position_embeddings {limit}). Fix: set {key} to at most {limit}, or extend the model's context "
                "on purpose (a RoPE model: config_overrides with rope_parameters of rope_type linear/dynamic/yarn)."
            )


def check_assistant_only_loss(splits) -> None:
    """``assistant_only_loss`` masks by the chat template's assistant turns, so it needs chat rows; trl 1.16 raises
    a ValueError at trainer set-up for text prompt/completion rows (which train on the completion only anyway)."""
    from alignkit.errors import ConfigError

    for split, data in splits.items():
        if "messages" in data.column_names or not len(data):
            continue
        if isinstance(data[0].get("prompt"), str):
            raise ConfigError(
                f"assistant_only_loss: true needs chat rows ('messages', or prompt/completion as message lists); the "
                f"{split} split has text prompt/completion rows, which train on the completion only already. Fix: "
                "set assistant_only_loss: false for this data."
            )


def protect_hub_token(train_args) -> None:
    """Keep a hub_token out of everything the run writes. transformers pickles its arguments into its saves, and W&B
    records the command line in its run metadata. The Hub client reads HF_TOKEN from the environment, so the token
    moves there, out of the arguments, and is blanked in sys.argv."""
    token = getattr(train_args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        train_args.hub_token = None
        sys.argv[:] = [arg.replace(token, "<hub_token>") for arg in sys.argv]


def full_lengths(tokenizer, rows) -> list[int]:
    """Each row's length in tokens before any truncation, as the trainer renders it: a chat row through the chat
    template (``messages``; ``prompt`` + the reply), a text row as prompt + reply + eos; preference rows the longer
    of prompt + chosen and prompt + rejected. ``rows``: a split in a stage's columns (before the trainer)."""

    def count(prompt, reply) -> int:
        if isinstance(prompt, list) or isinstance(reply, list):
            messages = (prompt if isinstance(prompt, list) else []) + (reply if isinstance(reply, list) else [])
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return len(tokenizer((prompt or "") + (reply or ""))["input_ids"]) + 1

    names = rows.column_names
    out = []
    for row in rows.select_columns(
        [c for c in ("messages", "prompt", "completion", "chosen", "rejected") if c in names]
    ):
        if "messages" in row:
            out.append(count(row["messages"], None))
        elif "chosen" in row:
            out.append(max(count(row["prompt"], row["chosen"]), count(row["prompt"], row["rejected"])))
        else:
            out.append(count(row.get("prompt"), row.get("completion")))
    return out


def fitting_length(lengths: list[int], max_fraction: float, multiple: int = 8) -> dict:
    """The smallest ``max_length`` (rounded up to ``multiple`` tokens) that cuts at most ``max_fraction`` of rows
    of these ``lengths`` (tokens), the share it cuts, and the distribution's p95 / p99 / max."""
    import math

    ordered = sorted(lengths)
    n = len(ordered)
    if not n:
        return {}
    allowed = math.floor(max_fraction * n)  # rows that may stay longer than the answer
    fits = ordered[n - 1 - allowed] if allowed < n else 0
    fits = -(-fits // multiple) * multiple

    def pct(q):
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return {"fits": fits, "cut": sum(x > fits for x in ordered) / n, "p95": pct(0.95), "p99": pct(0.99),
            "max": ordered[-1]}  # fmt: skip


def check_stop_tokens(
    trainer, split: str, data, max_fraction: float, dropped: int = 0, rows=None, named: list | None = None
) -> int:
    """Count the rows of a tokenized SFT split whose trained tokens lost a stop token (eos, end-of-turn) to
    truncation: fewer stop tokens among the labels than trained spans (assistant turns, or the completion); for DPO
    rows, prompt + the longer response beyond max_length, for KTO rows prompt + completion (trl's collators keep the
    start). ``dropped``: rows the trainer already dropped for the same reason (their trained part, or a DPO/KTO
    row's whole prompt, beyond max_length), counted with them; ``named``: ``(file, row)`` of the rows in the data
    whose prompt fills max_length (:func:`alignkit.data.preview.prompts_filling`), named beside that count. Returns
    the count. Packed data is not checked.

    The train split is refused above ``max_fraction`` of its rows, with the smallest max_length that keeps the
    limit (:func:`fitting_length` over ``rows``, the split before the trainer tokenized it). An eval split is never
    refused (nothing trains on it): its cut rows are logged, as rows scored without their ends."""
    import numpy as np

    tokenizer = trainer.processing_class
    stops = getattr(tokenizer, "alignkit_stop_ids", None)
    columns = data.column_names or []
    max_length = getattr(trainer.args, "max_length", None)
    if not stops or getattr(trainer.args, "packing", False):
        return 0
    stops, cut = np.asarray(stops), 0
    total = len(data) + dropped
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        # DPO: trl's collator cuts prompt + response to max_length from the end (keep_start): the response's eos goes
        if max_length is None or getattr(trainer.args, "truncation_mode", "keep_start") != "keep_start":
            return 0
        for prompt, chosen, rejected in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]):
            cut += len(prompt) + max(len(chosen), len(rejected)) > max_length
    elif {"prompt_ids", "completion_ids"} <= set(columns):
        # KTO: trl's collator cuts prompt + completion to max_length from the end (KTO has no other mode)
        if max_length is None:
            return 0
        for prompt, completion in zip(data["prompt_ids"], data["completion_ids"]):
            cut += len(prompt) + len(completion) > max_length
    elif "labels" in columns:
        for labels in data["labels"]:
            labels = np.asarray(labels)
            trained = labels != -100
            spans = int(trained[0]) + int(np.count_nonzero(trained[1:] & ~trained[:-1])) if len(labels) else 0
            if spans and np.count_nonzero(np.isin(labels[trained], stops)) < spans:
                cut += 1
    elif not dropped:
        return 0
    if not (cut or dropped):
        return 0
    share = (cut + dropped) / total
    stop = tokenizer.convert_ids_to_tokens(stops[0].item())
    where = ""
    if dropped and named:  # by file and row, as the data checks name rows
        shown = ", ".join(f"{file} row {row}" for file, row in named[:5])
        where = f"; prompts of max_length tokens or more in the data: {shown}" + (
            f" and {len(named) - 5} more" if len(named) > 5 else ""
        )
    if split != "train":  # scored, never trained: a cut row's loss leaves out its end, and that is all
        logger.warning(
            "max_length %s cuts the stop token (%r) off %d of the %d %s rows%s (%.0f%%): they are scored without "
            "their ends (nothing trains on them)", max_length, stop, cut, total, split,
            f" and leaves {dropped} more out of the eval{where}" if dropped else "", 100 * share,
        )  # fmt: skip
        return cut + dropped
    what = (
        f"max_length {max_length} cuts the stop token ({stop!r}) off {cut} of {total} {split} rows"
        + (f" and leaves nothing to train in {dropped} more (dropped: a prompt or row longer than max_length{where})"
           if dropped else "")
        + f" ({share:.0%}): trained so, the model learns not to stop"
    )  # fmt: skip
    if share > max_fraction:
        fit = fitting_length(full_lengths(tokenizer, rows), max_fraction) if rows is not None and len(rows) else {}
        hint = (
            f"set max_length: {fit['fits']} (cuts {fit['cut']:.1%} of these rows; their lengths in tokens: p95 "
            f"{fit['p95']}, p99 {fit['p99']}, max {fit['max']}), "
            if fit
            else "raise max_length (the longest rows need more tokens), "
        )
        raise DataError(
            f"{split} split", None, what,
            f"{hint}shorten those rows, or set max_truncated_fraction above {share:.2f} to train on them anyway",
        )  # fmt: skip
    logger.warning("%s (max_truncated_fraction %g allows it)", what, max_fraction)
    return cut + dropped


def _checkpoint_bytes(model) -> int:
    # trainable weights + two Adam moments, as saved in every checkpoint
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _planned_checkpoints(args) -> int:
    if args.save_strategy != "steps" or args.max_steps <= 0:
        return 1  # per epoch or best only, or a length in epochs: at least one
    every = args.save_steps * args.max_steps if args.save_steps < 1 else args.save_steps
    planned = max(1, int(args.max_steps // every))
    return min(planned, args.save_total_limit) if args.save_total_limit else planned


def check_trainer(
    trainer, run_args, rows_before: dict[str, int] | None = None, splits: dict | None = None,
    named: list | None = None,
) -> None:  # fmt: skip
    """What is known only once the trainer has tokenized the data and wrapped the model. ``rows_before``: each
    split's rows before the trainer tokenized them; the rows it dropped (trl drops a row whose trained part lies
    wholly beyond max_length, e.g. a huge prompt) count as truncated. ``splits``: those rows, to measure their
    lengths when max_length is refused. ``named``: ``(file, row)`` of the rows whose prompt fills max_length (DPO,
    KTO), named beside the dropped count."""
    args = trainer.args
    for split, data in (("train", trainer.train_dataset), ("test", trainer.eval_dataset)):
        if data is None or not hasattr(data, "__len__"):  # streamed data has no length
            continue
        if len(data) == 0:
            max_length = getattr(args, "max_length", None)
            raise DataError(
                f"{split} split", None,
                f"no rows left after tokenization (rows whose trained part falls beyond max_length {max_length} are "
                "dropped)", "raise max_length, or shorten the prompts" + (", or set test_size: 0" if split == "test" else ""),
            )  # fmt: skip
        before = (rows_before or {}).get(split)
        dropped = max(0, before - len(data)) if isinstance(before, int) else 0
        check_stop_tokens(
            trainer, split, data, run_args.max_truncated_fraction, dropped, (splits or {}).get(split), named
        )
    if args.save_strategy == "no":
        return
    needed_gb = _checkpoint_bytes(trainer.model) * _planned_checkpoints(args) / 2**30
    free_gb = shutil.disk_usage(args.output_dir).free / 2**30
    if free_gb < needed_gb + run_args.min_free_disk_gb:
        raise PreflightError(
            f"output_dir {args.output_dir}: the planned checkpoints need about {needed_gb:.1f} GiB, only {free_gb:.1f} "
            f"GiB is free (min_free_disk_gb={run_args.min_free_disk_gb} kept spare). Fix: set save_total_limit, "
            "raise save_steps, free disk space or choose another output_dir."
        )

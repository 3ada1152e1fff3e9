"""What the trainers assume about row order, pairing and held-out rows, made true before they see the data.

- **A held-out prompt never trains.** ``test_size`` holds out whole prompts (every row of a prompt goes to one side:
  KTO's unpaired siblings, several pairs on one prompt), and an eval split given as its own source may not share a
  prompt with training (:func:`check_held_out_prompts`). Which part of a row is its prompt: :func:`prompt_key`.
- **KTO's KL pairs are mismatched.** trl 1.16's KTOTrainer estimates the KL baseline z0 from (prompt, completion)
  pairs built by rotating the completions by +1 inside each consecutive block of ``per_device_train_batch_size``
  rows (sequential sampling): row j gets row j-1's completion, the block's first row the last one's. Unpaired
  preference pairs laid out as chosen, rejected, chosen, ... give every rejected row its own chosen reply (the
  matched pair z0 must not see; huggingface/trl#1911). :func:`kl_order` lays rows out so that neighbours never share
  a prompt; alignkit.train.assumptions checks the trainer's own prepared rows before step 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random

from alignkit.errors import DataError

logger = logging.getLogger(__name__)


def prompt_key(row: dict) -> str | None:
    """The prompt of a row as one comparable string: the ``prompt`` column (text or messages), or for a chat row
    (``messages``) every turn before its last assistant reply; None for rows without a prompt (raw text, task
    rows)."""
    if "prompt" in row and row["prompt"] is not None:
        return json.dumps(row["prompt"], sort_keys=True)
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        return json.dumps(messages[:-1], sort_keys=True)
    return None


def _keys(dataset) -> list[str | None]:
    columns = [c for c in ("prompt", "messages") if c in dataset.column_names]
    if not columns:
        return [None] * len(dataset)
    return [prompt_key(row) for row in dataset.select_columns(columns)]


def held_out_split(pool, size, seed: int) -> dict:
    """``{'train', 'test'}`` of ``pool`` with ``size`` rows (an int) or share (a float) held out, whole prompts at a
    time. When every prompt is unique this is exactly ``pool.train_test_split(test_size=size, seed=seed)``; else
    prompts are drawn in a seeded order until the held-out rows reach the asked number (a prompt's rows never
    straddle the two splits, so the held-out count may exceed it by the rows of the last prompt drawn)."""
    keys = _keys(pool)
    if None in keys or len(set(keys)) == len(keys):
        return pool.train_test_split(test_size=size, seed=seed)
    wanted = size if isinstance(size, int) else math.ceil(size * len(pool))
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = list(groups)
    random.Random(seed).shuffle(order)
    test: list[int] = []
    for key in order:
        if len(test) >= wanted:
            break
        test += groups[key]
    if len(test) >= len(pool):
        raise DataError(
            "recipe", None, f"test_size {size} holds out every prompt (the data has {len(groups)} distinct prompts)",
            "lower test_size, or give the held-out rows as a source of their own",
        )  # fmt: skip
    held = set(test)
    logger.info(
        "test_size: %d rows of %d prompts held out whole (rows sharing a prompt stay on one side)", len(test),
        len({keys[i] for i in test}),
    )  # fmt: skip
    return {"train": pool.select([i for i in range(len(pool)) if i not in held]), "test": pool.select(sorted(held))}


def check_held_out_prompts(train, test, label: str = "eval split") -> None:
    """DataError naming the first eval row whose prompt is also a training row's prompt: the eval metrics would
    score a prompt the model trained on (for KTO built from pairs: the other reply of a training pair)."""
    if train is None or test is None or not hasattr(test, "__len__") or not hasattr(train, "__len__"):
        return
    trained = {}
    for i, key in enumerate(_keys(train)):
        if key is not None:
            trained.setdefault(key, i)
    for i, key in enumerate(_keys(test)):
        if key is not None and key in trained:
            raise DataError(
                label, i + 1, f"its prompt ({key[:60]}...) is also the prompt of training row {trained[key] + 1}: the "
                "evaluation would score a prompt the model trained on",
                "keep each prompt in one split (drop it from one file), or use test_size, which holds out prompts whole",
            )  # fmt: skip


def row_key(row: dict) -> str:
    """A row's whole content as one comparable string (its hash stands for it): task rows (CoNLL tokens, SQuAD
    question and context, text) have no prompt to compare."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


def held_out_report(train, test, labels: list[str]) -> dict:
    """What the run record says about its eval split: where it came from (``sources``: the held-out sources, or
    ``test_size``), its rows, and ``also_in_train``: how many eval rows are identical to a training row (hashed
    whole; a prompt shared with training is refused earlier by :func:`check_held_out_prompts`). Identical rows are
    logged: a published test file may repeat a short training sentence (CoNLL headlines), which is then scored on
    text the model saw."""
    if test is None or not hasattr(test, "__len__") or not hasattr(train, "__len__"):
        return {"sources": labels} if labels else {}
    trained = {row_key(row) for row in train}
    same = sum(row_key(row) in trained for row in test)
    if same:
        logger.warning(
            "%d of the %d eval rows (%s) are identical to training rows: they score text the model trained on",
            same, len(test), ", ".join(labels) or "test_size",
        )  # fmt: skip
    return {"sources": labels or ["test_size"], "rows": len(test), "also_in_train": same}


def kl_order(dataset, block: int, seed: int = 0):
    """KTO rows reordered so that no two neighbours share a prompt, whatever the batch size: prompts take turns,
    one row each per round (round-robin over the prompts, in a seeded order), and unpaired pairs alternate which
    reply comes first (a block then holds desirable and undesirable rows alike). With trl's +1 rotation each row's
    KL completion is then another prompt's reply. ``block``: ``per_device_train_batch_size``; a last block of one
    row would be its own KL pair, so that row is dropped (logged). Returns ``dataset`` itself when nothing
    changes."""
    keys = _keys(dataset)
    rows = list(range(len(dataset)))
    if None not in keys and len(set(keys)) != len(keys):
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        order = list(groups)
        random.Random(seed).shuffle(order)
        for n, key in enumerate(order):  # alternate which of a prompt's rows leads: labels mix within every round
            if n % 2:
                groups[key] = groups[key][1:] + groups[key][:1]
        rows, depth = [], max(len(g) for g in groups.values())
        for r in range(depth):
            rows += [groups[key][r] for key in order if r < len(groups[key])]
        logger.info("KTO: rows ordered so that no KL pair (trl's +1 rotation per batch) shares its prompt")
    if block > 1 and len(rows) > 1 and len(rows) % block == 1:
        logger.warning(
            "KTO: %d rows leave a last batch of one row, whose KL pair would be its own reply: that row is dropped",
            len(rows),
        )
        rows = rows[:-1]
    return dataset if rows == list(range(len(dataset))) else dataset.select(rows)


def kl_shares_prompt(prompt_ids: list, block: int) -> list[int]:
    """Rows (0-based) whose KL pair under trl's rotation (the previous row of the same consecutive block of
    ``block`` rows, the block's first row taking its last) has the row's own prompt; a one-row block pairs the row
    with itself. ``prompt_ids``: each row's tokenized prompt, in training order."""
    bad = []
    for start in range(0, len(prompt_ids), block):
        size = min(block, len(prompt_ids) - start)
        for j in range(size):
            source = start + (j - 1) % size
            if prompt_ids[source] == prompt_ids[start + j]:
                bad.append(start + j)
    return bad

"""GRPO's rewards, named in the recipe's ``reward_funcs`` (:class:`alignkit.config.RewardFunctionArguments`).

Each is a callable as trl 1.16's GRPOTrainer calls reward functions: ``f(prompts, completions, completion_ids,
**columns) -> list[float | None]``, one value per completion (``columns``: the data row's other columns, e.g.
``answer``). trl sums them with ``reward_weights`` and logs each as ``rewards/<name>/mean`` and ``/std``.

- ``format``: 1.0 if the completion matches ``reward_pattern`` (a regex), else 0.0.
- ``exact``: 1.0 if the pattern's first group equals the row's ``reference_column`` (as text, stripped), else 0.0.
- ``numeric``: 1.0 if the pattern's first group is a number within ``numeric_tolerance`` of the reference, else 0.0.
- a folder written by the reward stage: its score (:class:`alignkit.export.reward_model.RewardModel`).
- ``package.module:function``: your function, imported only because the recipe names it.

Every reward is called once on the first training rows before any model loads, so a function that cannot be
imported, raises, or returns the wrong number of values fails with its name and the fix (exit 2).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path

from alignkit.errors import ConfigError, DataError

BUILT_IN = ("format", "exact", "numeric")


def completion_text(completion) -> str:
    """A completion as text: trl passes a string, or for chat prompts a list of messages (the reply)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return completion if isinstance(completion, str) else ""


class PatternReward:
    """``format`` / ``exact`` / ``numeric`` (see the module docstring)."""

    def __init__(self, kind: str, pattern: str, reference_column: str, tolerance: float):
        self.kind, self.reference_column, self.tolerance = kind, reference_column, tolerance
        self.pattern = re.compile(pattern)
        self.__name__ = kind  # trl names the reward's metrics after it

    def _answer(self, completion) -> str | None:
        match = self.pattern.search(completion_text(completion))
        if match is None:
            return None
        return (match.group(1) if self.pattern.groups else match.group(0)).strip()

    def _match(self, answer: str | None, reference) -> float:
        if answer is None:
            return 0.0
        if self.kind == "exact":
            return float(answer == str(reference).strip())
        try:
            return float(abs(float(answer) - float(reference)) <= self.tolerance)
        except (TypeError, ValueError):
            return 0.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if self.kind == "format":
            return [float(self.pattern.search(completion_text(c)) is not None) for c in completions]
        references = columns[self.reference_column]
        return [self._match(self._answer(c), r) for c, r in zip(completions, references)]


class ModelReward:
    """A trained reward model's score as a GRPO reward."""

    def __init__(self, path: str):
        from alignkit.export.reward_model import RewardModel

        self.scorer = RewardModel(path)
        self.__name__ = f"reward_model:{Path(path).name}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.scorer.score(list(prompts), list(completions))


def import_reward(spec: str, index: int) -> Callable:
    """``package.module:function`` -> the function; ConfigError naming the entry if it cannot be imported."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: any import error is theirs to fix
        raise ConfigError(
            f"reward_funcs[{index}]: '{spec}' could not be imported ({type(exc).__name__}: {exc}). Fix: give "
            "'package.module:function' of a module on PYTHONPATH (or a built-in: format, exact, numeric)."
        ) from None
    func = getattr(module, name, None)
    if not callable(func):
        raise ConfigError(
            f"reward_funcs[{index}]: module '{module_name}' has no function '{name}'. Fix: name a function it defines."
        )
    return func


def _make(spec: str, index: int, args) -> Callable:
    if spec in BUILT_IN:
        return PatternReward(spec, args.reward_pattern, args.reference_column, args.numeric_tolerance)
    if Path(spec).is_dir():
        return ModelReward(spec)
    if ":" in spec and not spec.startswith((".", "/")):
        return import_reward(spec, index)
    from alignkit.errors import suggest

    raise ConfigError(
        f"reward_funcs[{index}]: '{spec}' is not a built-in reward, a reward model folder or module:function."
        f"{suggest(spec, BUILT_IN)} Fix: use one of {list(BUILT_IN)}, a folder written by the reward stage, or "
        "'package.module:function'."
    )


def check_reward(func: Callable, name: str, rows) -> None:
    """Call ``func`` on the first rows (each prompt with its reference, or a placeholder, as the completion) and
    check it returns one number (or None) per completion."""
    columns = {c: list(rows[c]) for c in rows.column_names if c != "prompt"}
    prompts = list(rows["prompt"])
    completions = [
        [{"role": "assistant", "content": "ANSWER: 0"}] if isinstance(p, list) else " ANSWER: 0" for p in prompts
    ]
    try:
        values = func(prompts=prompts, completions=completions, completion_ids=[[0]] * len(prompts), **columns)
    except Exception as exc:  # noqa: BLE001 - the user's function: report what it raised
        raise ConfigError(
            f"reward_funcs: '{name}' raised {type(exc).__name__}: {exc} when called on the first {len(prompts)} rows. "
            "Fix: it is called as f(prompts, completions, completion_ids, **columns) with the data's other columns "
            "as lists; accept **kwargs."
        ) from None
    if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise ConfigError(
            f"reward_funcs: '{name}' returned {got} for {len(prompts)} completions. Fix: return a list with one "
            "float (or None) per completion."
        )
    bad = [v for v in values if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v))]
    if bad:
        raise ConfigError(
            f"reward_funcs: '{name}' returned {bad[0]!r}, not a finite number. Fix: return floats (None skips one)."
        )


def build_reward_functions(args, train, tokenizer=None) -> list[Callable]:
    """The recipe's rewards, each checked on the first rows of ``train`` (a datasets.Dataset in GRPO's columns)."""
    if not args.reward_funcs:
        raise ConfigError("reward_funcs: empty. Fix: name at least one reward, e.g. reward_funcs: [format, exact].")
    if (
        any(spec in ("exact", "numeric") for spec in args.reward_funcs)
        and args.reference_column not in train.column_names
    ):
        raise DataError(
            "datasets", None,
            f"the rewards exact/numeric compare with the column '{args.reference_column}', which the data does not "
            f"have (it has {train.column_names})",
            "add that column to every row, or set reference_column: to the column with the reference answers",
        )  # fmt: skip
    try:
        re.compile(args.reward_pattern)
    except re.error as exc:
        raise ConfigError(f"reward_pattern: not a valid regex ({exc}). Fix: correct the pattern.") from None
    funcs = [_make(spec, i, args) for i, spec in enumerate(args.reward_funcs)]
    probe = train.select(range(min(2, len(train))))
    for spec, func in zip(args.reward_funcs, funcs):
        check_reward(func, spec, probe)
    return funcs

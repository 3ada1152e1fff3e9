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

During training each reward runs under a contract (:class:`CheckedReward`): it may return a list, tuple or 1-D
numpy array/tensor of Python or numpy numbers (as trl accepts); ``None`` skips a completion (trl's way); NaN or inf
is refused by default (a silent NaN reward trains on nothing), or with ``nonfinite_rewards: skip`` treated as None;
a wrong count names the expected one; a function that raises stops the run with one line naming it, the completion
it failed on and the exception (:class:`alignkit.errors.RewardFunctionError`), after the run loop saves a checkpoint.

Counted in the logs (:class:`RewardCounts`), per function and per logging interval, beside trl's
``rewards/<name>/mean``: ``rewards/<name>/skipped`` (completions it returned None for, non-finite values mapped to
None included) and ``rewards/<name>/nonfinite`` (NaN/inf values it returned; 0 unless ``nonfinite_rewards: skip``).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from alignkit.errors import ConfigError, DataError, RewardFunctionError

BUILT_IN = ("format", "exact", "numeric")


def completion_text(completion) -> str:
    """A completion as text: trl passes a string, or for chat prompts a list of messages: the reply, or in tool-use
    GRPO the whole rollout (assistant turns with tool calls, ``tool`` results, the final reply), of which only the
    model's own turns count (a tool result is not the model's answer)."""
    if isinstance(completion, list):
        return "".join(
            m.get("content") or ""
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant" and isinstance(m.get("content"), str)
        )
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


def _number(value) -> float | None:
    """A reward value as trl takes it: None, or a real number (Python, numpy or a 0-d tensor); else TypeError."""
    if value is None:
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalar, 0-d array or tensor
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} ({type(value).__name__}) is not a number")
    return float(value)


def reward_values(values, expected: int, name: str, nonfinite: str = "refuse") -> list[float | None]:
    """``values`` as a list of floats or None, checked: one per completion, finite (``nonfinite="skip"``: NaN/inf
    become None). Raises ConfigError."""
    if hasattr(values, "tolist") and getattr(values, "ndim", 1) == 1:
        values = values.tolist()  # a numpy array or tensor of rewards
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"reward_funcs: '{name}' returned a {type(values).__name__}, not one value per completion. "
                          f"Fix: return a list of {expected} floats (None skips one).")  # fmt: skip
    if len(values) != expected:
        raise ConfigError(f"reward_funcs: '{name}' returned {len(values)} values for {expected} completions (one per "
                          f"completion, every prompt's group included). Fix: return {expected} values, one per "
                          "completion, in the order given.")  # fmt: skip
    try:
        out = [_number(v) for v in values]
    except TypeError as exc:
        raise ConfigError(f"reward_funcs: '{name}' returned {exc}. Fix: return floats (None skips one).") from None
    bad = next((v for v in out if v is not None and not math.isfinite(v)), None)
    if bad is not None and nonfinite == "skip":
        return [v if v is None or math.isfinite(v) else None for v in out]
    if bad is not None:
        raise ConfigError(f"reward_funcs: '{name}' returned {bad}, not a finite number. Fix: return a number for "
                          "every completion, or None to skip one (e.g. an unparseable completion); or set "
                          "nonfinite_rewards: skip to treat NaN/inf as None (counted in the logs).")  # fmt: skip
    return out


class CheckedReward:
    """A reward function under the contract (module docstring): what trl calls during training. ``nonfinite``:
    ``"refuse"`` or ``"skip"`` (the recipe's ``nonfinite_rewards``). Counts since it was made: ``skipped``
    (completions scored None, non-finite ones mapped to None included) and ``nonfinite`` (NaN/inf values)."""

    def __init__(self, func: Callable, name: str, nonfinite: str = "refuse", observe: Callable | None = None):
        self.func, self.name, self.nonfinite, self.observe = func, name, nonfinite, observe
        self.skipped = self.nonfinite_count = 0
        self.__name__ = getattr(func, "__name__", name)  # trl names the reward's metrics after it

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        try:
            values = self.func(prompts=prompts, completions=completions, **columns)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's function: name what it raised, where
            raise self._failed(prompts, completions, columns, exc) from None
        try:
            out = reward_values(values, len(completions), self.name, self.nonfinite)
        except ConfigError as exc:
            raise RewardFunctionError(str(exc)) from None
        skipped = sum(v is None for v in out)
        self.nonfinite_count += skipped - sum(v is None for v in _as_list(values))
        self.skipped += skipped
        if self.observe is not None:  # e.g. alignkit.train.tools.log_tool_use, through trl's log_metric
            self.observe(completions, **columns)
        return out

    def _failed(self, prompts, completions, columns, exc: Exception) -> RewardFunctionError:
        """The first completion the function raises on alone (else the batch's first), in one line."""
        culprit, error = completions[0], exc
        for i, completion in enumerate(completions):
            one = {
                k: v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in columns.items()
            }
            try:
                self.func(prompts=prompts[i : i + 1], completions=[completion], **one)
            except Exception as single:  # noqa: BLE001
                culprit, error = completion, single
                break
        text = " ".join(completion_text(culprit).split())
        text = text if len(text) <= 80 else text[:77] + "..."
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return RewardFunctionError(
            f"reward_funcs: '{self.name}' raised {detail} on the completion {text!r}; the run stopped and saved a "
            "checkpoint. Fix: make it return a number (or None to skip) for every completion, e.g. 0.0 when the "
            "expected pattern is missing; then resume (resume_from_checkpoint: true)."
        )


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") and getattr(values, "ndim", 1) == 1 else list(values)


class RewardCounts(TrainerCallback):
    """Adds ``rewards/<name>/skipped`` and ``rewards/<name>/nonfinite`` (counts since the last log) to each training
    log that has trl's reward metrics, for every :class:`CheckedReward`. Put it first among the trainer's callbacks
    (:meth:`install`) so that the reporters (console, W&B, TensorBoard) see the counts too."""

    def __init__(self, rewards: list):
        self.rewards = [r for r in rewards if isinstance(r, CheckedReward)]
        self.seen = {id(r): (0, 0) for r in self.rewards}

    def install(self, trainer) -> None:
        trainer.callback_handler.callbacks.insert(0, self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "reward" not in logs:  # eval logs and the end-of-train summary: no rewards there
            return
        counts = {}
        for reward in self.rewards:
            before_skipped, before_nonfinite = self.seen[id(reward)]
            self.seen[id(reward)] = (reward.skipped, reward.nonfinite_count)
            counts[f"rewards/{reward.__name__}/skipped"] = reward.skipped - before_skipped
            counts[f"rewards/{reward.__name__}/nonfinite"] = reward.nonfinite_count - before_nonfinite
        logs.update(counts)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counts)  # the trainer appended its copy of ``logs`` before the callbacks


def import_user_module(spec: str, where: str, hint: str = ""):
    """The module of a user's ``package.module:function`` entry (``where``: the recipe key naming it, e.g.
    ``tools[0]``); ConfigError naming the entry and the fix if it cannot be imported (a module that calls
    ``sys.exit`` on import is reported as such). ``hint``: what else the key accepts, appended to the fix."""
    module_name = spec.partition(":")[0]
    try:
        return importlib.import_module(module_name)
    except SystemExit as exc:
        raise ConfigError(
            f"{where}: importing '{module_name}' called sys.exit({exc.code!r}). Fix: do not exit at import time "
            '(move script code under `if __name__ == "__main__":`).'
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module: any import error is theirs to fix
        raise ConfigError(
            f"{where}: '{spec}' could not be imported ({type(exc).__name__}: {exc}). Fix: give "
            f"'package.module:function' of a module on PYTHONPATH{hint}."
        ) from None


def import_reward(spec: str, index: int) -> Callable:
    """``package.module:function`` -> the function; ConfigError naming the entry if it cannot be imported."""
    module = import_user_module(spec, f"reward_funcs[{index}]", " (or a built-in: format, exact, numeric)")
    module_name, _, name = spec.partition(":")
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


def check_reward(func: Callable, name: str, rows, nonfinite: str = "refuse") -> None:
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
    except SystemExit as exc:
        raise ConfigError(
            f"reward_funcs: '{name}' called sys.exit({exc.code!r}). Fix: return values, never exit."
        ) from None
    reward_values(values, len(prompts), name, nonfinite)


def build_reward_functions(args, train, tokenizer=None, observe: Callable | None = None) -> list[Callable]:
    """The recipe's rewards, each checked on the first rows of ``train`` (a datasets.Dataset in GRPO's columns).
    ``observe(completions, **columns)``: called after the first reward on every batch (columns include trl's
    ``log_metric``), e.g. to log the share of rollouts that used a tool."""
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
        check_reward(func, spec, probe, args.nonfinite_rewards)
    return [
        CheckedReward(func, spec, args.nonfinite_rewards, observe if i == 0 else None)
        for i, (func, spec) in enumerate(zip(funcs, args.reward_funcs))
    ]

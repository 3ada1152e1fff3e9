"""What ``alignkit data preview`` adds to the data layer's checks: where a recipe that continues a stage not yet
trained starts (the base model of the shipped recipe that writes it), and each split's length distribution with the
truncation verdict the run will reach (the run's own measures: :func:`alignkit.train.checks.full_lengths`,
:func:`alignkit.train.checks.fitting_length`)."""

from __future__ import annotations

from pathlib import Path

import yaml

# keys of the producing recipe that decide how the continued model renders and tokenizes rows
_RENDERING_KEYS = ("chat_template", "tokenizer_name_or_path", "chat_format")


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def untrained_start(model_name: str | None, config: str | None) -> tuple[list[str], str] | None:
    """``(overrides, note)`` when ``model_name`` is an output folder not written yet and a recipe beside ``config``
    (the same folder) writes it (its ``output_dir``): the overrides start the preview from that recipe's own start,
    followed back to a model that exists (demo: dpo -> sft -> cpt -> SmolLM2), with the rendering keys
    (``chat_template``) of the nearest recipe that sets them, as the continued output's tokenizer will carry them.
    None when the model exists, or no recipe there writes it (then the run's own error stands)."""
    if not model_name or not config or Path(model_name).exists() or ":" in model_name:
        return None
    recipes = {}
    for path in sorted(Path(config).parent.glob("*.y*ml")):
        out = _yaml(path).get("output_dir")
        if isinstance(out, str):
            recipes.setdefault(out.rstrip("/"), path)
    chain, name, rendering = [], model_name.rstrip("/"), {}
    while name in recipes and not Path(name).exists() and len(chain) < 10:
        producer = recipes[name]
        values = _yaml(producer)
        chain.append(f"{producer} writes {name}")
        for key in _RENDERING_KEYS:
            if key in values and key not in rendering:
                rendering[key] = values[key]
        name = str(values.get("model_name_or_path") or "")
    if not chain or not name:
        return None
    overrides = ["--model_name_or_path", name]
    for key, value in rendering.items():
        overrides += [f"--{key}", value if isinstance(value, str) else yaml.safe_dump(value).strip()]
    note = (f"== model: {model_name} is not trained yet ({'; '.join(chain)}): previewed on {name}, where that chain "
            f"starts" + (f", with {', '.join(f'{k}: {v}' for k, v in rendering.items())}" if rendering else ""))  # fmt: skip
    return overrides, note


def task_row_lengths(tokenizer, rows) -> list[int]:
    """Each task row's input length in tokens, untruncated: the words of a ``tokens`` list joined as predict()
    joins them, a QA question with its context (a pair), a text (pair), a seq2seq source."""
    names = rows.column_names
    out = []
    for row in rows:
        if "tokens" in names:
            out.append(len(tokenizer(" ".join(row["tokens"]))["input_ids"]))
        elif "question" in names and "context" in names:
            out.append(len(tokenizer(row["question"], row["context"])["input_ids"]))
        else:
            texts = [row[c] for c in ("text", "source", "text_pair") if c in names and isinstance(row[c], str)]
            out.append(len(tokenizer(*texts[:2])["input_ids"]) if texts else 0)
    return out


def length_line(lengths: list[int], max_length: int, split: str, max_fraction: float, windows: bool = False) -> str:
    """'   lengths in tokens: p50 41, p95 88, p99 120, max 131; max_length 128 cuts 2 of 200 rows (1.0%) ...': the
    distribution and what the run will do about it (a train split above ``max_fraction``: refused, with the
    max_length that fits; an eval split: never refused). ``windows``: QA splits a long context into windows
    instead of cutting it."""
    from alignkit.train.checks import fitting_length

    if not lengths:
        return ""
    fit = fitting_length(lengths, max_fraction)
    ordered = sorted(lengths)
    p50 = ordered[(len(ordered) - 1) // 2]
    cut = sum(x > max_length for x in lengths)
    line = f"   lengths in tokens: p50 {p50}, p95 {fit['p95']}, p99 {fit['p99']}, max {fit['max']}; "
    if windows:
        return line + f"max_length {max_length}: {cut} of {len(lengths)} rows span several windows"
    line += f"max_length {max_length} cuts {cut} of {len(lengths)} rows ({cut / len(lengths):.1%})"
    if not cut:
        return line
    if split != "train":
        return line + " (an eval split: scored without their ends, never refused)"
    if cut / len(lengths) > max_fraction:
        return line + (f": the run refuses this (max_truncated_fraction {max_fraction:g}). Fix: max_length: "
                       f"{fit['fits']} (cuts {fit['cut']:.1%})")  # fmt: skip
    return line + f" (max_truncated_fraction {max_fraction:g} allows it)"


PROMPT_STAGES = ("grpo", "rloo", "online_dpo")  # the policy completes prompt rows: only prompts are in the data


def prompt_lengths(tokenizer, rows) -> list[int]:
    """Each prompt row's length in tokens as the on-policy trainers tokenize it before generating: a chat prompt
    through the template with the generation prompt (and the row's ``tools``), a text prompt as it is."""
    from alignkit.data.tools import row_tools

    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(
                prompt, tools=row_tools(row), add_generation_prompt=True, tokenize=False
            )
            out.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            out.append(len(tokenizer(prompt or "")["input_ids"]))
    return out


def prompt_length_line(lengths: list[int], stage: str, train_args, split: str, max_fraction: float) -> str:
    """'   prompt lengths in tokens: p50 41, p95 88, p99 120, max 131; ...' for GRPO/RLOO/online DPO prompt rows, with
    what the run does about long prompts. trl 1.16's GRPO and RLOO keep every prompt whole (they have no
    max_prompt_length): the longest sequence is the longest prompt plus ``max_completion_length``. Online DPO cuts a
    prompt from the left where prompt + completion exceeds ``max_length``: prompts longer than ``max_length -
    max_new_tokens`` may lose their start; above ``max_fraction`` of them the line names the smallest max_length that
    keeps that share (an eval split: scored so, never refused; the run refuses neither)."""
    from alignkit.train.checks import fitting_length

    if not lengths:
        return ""
    fit = fitting_length(lengths, max_fraction)
    ordered = sorted(lengths)
    p50 = ordered[(len(ordered) - 1) // 2]
    line = f"   prompt lengths in tokens: p50 {p50}, p95 {fit['p95']}, p99 {fit['p99']}, max {fit['max']}; "
    if stage != "online_dpo":
        completion = getattr(train_args, "max_completion_length", None)
        longest = f" + max_completion_length {completion} = {fit['max'] + completion} tokens" if completion else ""
        return line + (f"{stage} keeps every prompt whole (trl has no max_prompt_length): the longest sequence is "
                       f"{fit['max']}{longest}")  # fmt: skip
    max_length, new = train_args.max_length, train_args.max_new_tokens
    room = max_length - new
    cut = sum(x > room for x in lengths)
    line += (f"max_length {max_length} - max_new_tokens {new} leaves {room} for a prompt: {cut} of {len(lengths)} "
             f"prompts may lose their start ({cut / len(lengths):.1%})")  # fmt: skip
    if not cut:
        return line
    if split != "train":
        return line + " (an eval split)"
    if cut / len(lengths) > max_fraction:
        return line + (f"; above max_truncated_fraction {max_fraction:g}: max_length: {fit['fits'] + new} keeps "
                       f"all but {fit['cut']:.1%} whole")  # fmt: skip
    return line

"""The one recipe body of the preference stages (DPO, KTO, ORPO, SimPO): a chat tokenizer, the stage's rows
checked by its schema, a causal LM on the shared loader, the stage's trl trainer, the run loop.

The methods with a reference (``Stage.reference``: DPO, KTO) score it from the one backbone: with an adapter, trl
keeps the starting adapter's frozen copy; with full fine-tuning, the starting model is scored once before training
(``precompute_ref_log_probs``) instead of loading a second copy.
"""

from __future__ import annotations

from alignkit.data.bad_rows import LISTED
from alignkit.train.runner import Run


def preference_main(stage, argv=None):
    """Parse ``argv`` for ``stage`` (a row of :data:`alignkit.stages.STAGES`), train, and return the final metrics."""
    recipe = stage.parse(argv)
    if stage.reference and not recipe.adapter.use_peft:
        recipe.train.precompute_ref_log_probs = True
    with Run(recipe, stage=stage.name) as run:
        run.load_tokenizer(chat=True)
        dropped: list[tuple[str, int]] = []  # rows trl will drop (their prompt fills max_length), by file and row
        data = run.load_data(stage.data_schema, row_check=_prompts_filling(stage, recipe, run, dropped))
        if dropped and isinstance(report := getattr(data, "alignkit_report", None), dict):
            named = list(dict.fromkeys(dropped))  # a pair unpaired for KTO is one row of its file
            report["prompt_fills_max_length"] = [{"file": f, "row": r} for f, r in named[:LISTED]]
            report["prompt_fills_max_length_rows"] = len(named)
        if stage.name == "kto":  # trl pairs each row with its neighbour's completion for the KL term
            from alignkit.data.pairing import kl_order

            for split in data:
                data[split] = kl_order(data[split], recipe.train.per_device_train_batch_size, recipe.train.seed)
        if stage.name in ("orpo", "simpo"):  # trl.experimental renders their prompts without the row's tools
            from alignkit.data.tools import render_tool_pairs

            data = {split: render_tool_pairs(rows, run.tokenizer) for split, rows in data.items()}
        run.load_model()
        return run.train(run.build_trainer(stage.trainer_class, data))


def _prompts_filling(stage, recipe, run, found: list):
    """DPO and KTO: a check of each source's rows that adds to ``found`` the ``(file, row)`` of every row whose prompt
    alone fills ``max_length`` (:func:`alignkit.data.preview.prompts_filling`): trl drops those rows, and the
    truncation count (:func:`alignkit.train.checks.check_stop_tokens`) names them. None for the other stages, or when
    trl drops nothing (no max_length, or ``truncation_mode: keep_end``)."""
    max_length = getattr(recipe.train, "max_length", None)
    if stage.name not in ("dpo", "kto") or not max_length:
        return None
    if getattr(recipe.train, "truncation_mode", "keep_start") != "keep_start":
        return None
    from alignkit.data.preview import prompts_filling

    def check(rows, label, places):
        found.extend(prompts_filling(run.tokenizer, rows, places, label, max_length))

    return check

"""The one recipe body of the preference stages (DPO, KTO, ORPO, SimPO): a chat tokenizer, the stage's rows
checked by its schema, a causal LM on the shared loader, the stage's trl trainer, the run loop.

The methods with a reference (``Stage.reference``: DPO, KTO) score it from the one backbone: with an adapter, trl
keeps the starting adapter's frozen copy; with full fine-tuning, the starting model is scored once before training
(``precompute_ref_log_probs``) instead of loading a second copy.
"""

from __future__ import annotations

from alignkit.train.runner import Run


def preference_main(stage, argv=None):
    """Parse ``argv`` for ``stage`` (a row of :data:`alignkit.stages.STAGES`), train, and return the final metrics."""
    recipe = stage.parse(argv)
    if stage.reference and not recipe.adapter.use_peft:
        recipe.train.precompute_ref_log_probs = True
    with Run(recipe, stage=stage.name) as run:
        run.load_tokenizer(chat=True)
        data = run.load_data(stage.data_schema)
        if stage.name == "kto":  # trl pairs each row with its neighbour's completion for the KL term
            from alignkit.data.pairing import kl_order

            for split in data:
                data[split] = kl_order(data[split], recipe.train.per_device_train_batch_size, recipe.train.seed)
        if stage.name in ("orpo", "simpo"):  # trl.experimental renders their prompts without the row's tools
            from alignkit.data.tools import render_tool_pairs

            data = {split: render_tool_pairs(rows, run.tokenizer) for split, rows in data.items()}
        run.load_model()
        return run.train(run.build_trainer(stage.trainer_class, data))

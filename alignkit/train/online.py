"""The recipe bodies of the on-policy stages, whose policy samples its own completions of the prompts.

- :func:`reward_main` (GRPO, RLOO, online DPO): a chat tokenizer, prompt rows checked by the stage's schema, the
  reward functions (and GRPO's tools, :mod:`alignkit.train.tools`) built and checked on the first rows **before the
  model loads**, a causal LM on the shared loader, the stage's trl trainer with ``reward_funcs`` (and ``tools``), the
  run loop.
- :func:`distill_main` (distill): the same, with a teacher instead of rewards: its tokenizer is checked against the
  student's before any weights load (:mod:`alignkit.models.teacher`), then it loads frozen beside the student.
"""

from __future__ import annotations

from alignkit.train.runner import Run


def reward_main(stage, argv=None):
    """Parse ``argv`` for ``stage`` (a row of :data:`alignkit.stages.STAGES` whose trainer takes ``reward_funcs``),
    train, and return the final metrics. A reward or a tool that fails its checks is a ConfigError/DataError before
    any model is loaded. Tools (GRPO's ``tools``, :mod:`alignkit.train.tools`) go to trl's ``GRPOTrainer(tools=...)``
    under a time limit, and the share of rollouts that used one is logged as ``tools/used_ratio``."""
    from alignkit.config import RewardFunctionArguments, ToolArguments
    from alignkit.train import tools as tool_use
    from alignkit.train.rewards import build_reward_functions

    recipe = stage.parse(argv)
    tool_args = next((g for g in recipe.extra if isinstance(g, ToolArguments)), None)  # GRPO's; RLOO has none
    with Run(recipe, stage=stage.name) as run:
        tokenizer = run.load_tokenizer(chat=True)
        tools = tool_use.load_tools(tool_args) if tool_args is not None else {}
        schemas = {name: schema for name, (_, schema) in tools.items()}
        fix = None if tool_args is not None else f"{stage.name} runs no tools: drop the rows' tools (or use grpo)"
        data = run.load_data(  # rows may declare only the recipe's tools (trl renders the prompts with those)
            stage.data_schema, row_check=lambda rows, label, places: tool_use.check_row_tools(rows, label, places, schemas, fix)
        )  # fmt: skip
        extra = {}
        if tools:
            tool_use.check_template(tokenizer, list(tools))
            extra["tools"] = [tool_use.timed_tool(func, tool_args.tool_timeout) for func, _ in tools.values()]
        rewards = build_reward_functions(
            recipe.group(RewardFunctionArguments), data["train"], tokenizer,
            observe=tool_use.log_tool_use if tools else None,
        )  # fmt: skip
        run.load_model()
        trainer = run.build_trainer(stage.trainer_class, data, reward_funcs=rewards, **extra)
        if tools:
            trainer.add_callback(tool_use.ToolUseMean())  # train_tools/used_ratio in the final metrics
        return run.train(trainer)


def distill_main(stage, argv=None):
    """Parse ``argv`` for the distill ``stage``, train the student against the recipe's
    ``teacher_model_name_or_path`` and return the final metrics. A teacher with another vocabulary, or not a causal
    LM, is a ConfigError before any weights load."""
    from alignkit.models.teacher import check_same_vocabulary, check_teacher, load_teacher

    recipe = stage.parse(argv)
    name = recipe.train.teacher_model_name_or_path
    with Run(recipe, stage=stage.name) as run:
        check_teacher(name, run.load_tokenizer(chat=True))
        data = run.load_data(stage.data_schema)
        teacher = load_teacher(name)
        check_same_vocabulary(teacher, run.load_model(), name)
        return run.train(run.build_trainer(stage.trainer_class, data, teacher_model=teacher))

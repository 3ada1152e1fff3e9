"""Cross-field checks, grouped by concern. Each failure says what to change."""

from __future__ import annotations

from alignkit import runtime
from alignkit.errors import ConfigError


def check_model_source(recipe) -> None:
    m = recipe.model
    if not m.model_name_or_path:
        raise ConfigError(
            "model_name_or_path: required. Fix: set it to a model directory, Hub id, .gguf file or 'tiny:llama'."
        )
    if m.from_scratch and recipe.adapter.use_peft:
        raise ConfigError(
            "from_scratch with use_peft: a randomly initialised model needs full training. Fix: set use_peft: false."
        )
    if m.from_scratch and recipe.quant.load_in_4bit:
        raise ConfigError(
            "from_scratch with load_in_4bit: random weights cannot be trained in 4-bit. Fix: set load_in_4bit: false."
        )


def check_quantization(recipe) -> None:
    q, a = recipe.quant, recipe.adapter
    if q.load_in_4bit and not a.use_peft:
        raise ConfigError(
            "load_in_4bit with use_peft: false: 4-bit weights cannot be trained directly. Fix: set use_peft: true (QLoRA) "
            "or load_in_4bit: false."
        )
    storages = ("uint8", "float32", "bfloat16", "float16")
    if q.bnb_4bit_quant_storage not in (None, *storages):
        raise ConfigError(f"bnb_4bit_quant_storage: '{q.bnb_4bit_quant_storage}' is not one of {storages}.")
    sharding = runtime.parameter_sharding(recipe.train) if q.load_in_4bit else None
    compute = runtime.auto_dtype_name(q.bnb_4bit_compute_dtype)
    if sharding and runtime.quant_storage_name(q.bnb_4bit_quant_storage, compute, recipe.train) != compute:
        raise ConfigError(
            f"load_in_4bit under {sharding} with bnb_4bit_quant_storage {q.bnb_4bit_quant_storage}: {sharding} flattens "
            f"and splits all parameters together, so the packed 4-bit weights must be stored in the compute dtype "
            f"({compute}) like the rest. Fix: set bnb_4bit_quant_storage: {compute}, or leave it unset (alignkit then "
            "picks the compute dtype)."
        )


def check_training(recipe) -> None:
    t = recipe.train
    if t is None:
        return
    if getattr(t, "bf16", False) and getattr(t, "fp16", False):
        raise ConfigError("bf16 and fp16 are both true. Fix: pick one.")
    strategy = str(getattr(t, "eval_strategy", "no")).rsplit(".", 1)[-1].lower()
    has_eval = recipe.data.test_size > 0 or any(s.test_split or s.role == "eval" for s in recipe.data.datasets)
    if strategy != "no" and not has_eval:
        raise ConfigError(
            f"eval_strategy {strategy}: there is no evaluation data (test_size is 0 and no dataset names a "
            "test_split or role: eval). Fix: add the held-out file as a source with role: eval, or set test_size (e.g. "
            "0.1) or a dataset's test_split, or eval_strategy: no."
        )


def check_distributed(recipe) -> None:
    """Combinations that only break once several ranks run, caught before any rank loads a model."""
    t = recipe.train
    if t is None:
        return
    if getattr(t, "auto_find_batch_size", False) and runtime.parameter_sharding(t) == "ZeRO-3":
        raise ConfigError(
            "auto_find_batch_size under ZeRO-3: DeepSpeed cannot rebuild its engine with a smaller batch. Fix: set "
            "auto_find_batch_size: false and choose per_device_train_batch_size yourself."
        )
    ddp = runtime.uses_data_parallel(t)
    reentrant = (getattr(t, "gradient_checkpointing_kwargs", None) or {}).get("use_reentrant", False)
    if (
        ddp
        and t.gradient_checkpointing
        and reentrant
        and recipe.adapter.use_peft
        and t.ddp_find_unused_parameters is not False
    ):
        raise ConfigError(
            "gradient_checkpointing with use_reentrant: true under DDP with an adapter: the first backward fails with "
            "'Expected to mark a variable ready only once'. Fix: set gradient_checkpointing_kwargs: {use_reentrant: "
            "false} (the default), or ddp_find_unused_parameters: false."
        )


def check_alignment_methods(recipe) -> None:
    """What trl's KTO, GRPO and RLOO trainers would refuse only once the model is loaded."""
    from alignkit.config.trainers import GRPOConfig, KTOConfig, RewardFunctionArguments, RLOOConfig

    t = recipe.train
    if isinstance(t, KTOConfig) and t.loss_type == "kto" and t.per_device_train_batch_size < 2:
        raise ConfigError(
            f"per_device_train_batch_size {t.per_device_train_batch_size} with KTO: its KL estimate pairs each "
            "completion with another row's prompt in the same batch. Fix: set per_device_train_batch_size: 2 or "
            "more (or loss_type: apo_zero_unpaired, which has no KL term)."
        )
    rewards = next((g for g in recipe.extra if isinstance(g, RewardFunctionArguments)), None)
    online = _is(t, "OnlineDPOConfig")
    if (isinstance(t, (GRPOConfig, RLOOConfig)) or online) and rewards is not None and t.reward_weights is not None:
        if len(t.reward_weights) != len(rewards.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(t.reward_weights)} weights for {len(rewards.reward_funcs)} reward_funcs "
                f"{rewards.reward_funcs}. Fix: give one weight per reward, in the same order, or drop reward_weights."
            )


def _is(train, name: str) -> bool:
    """``train`` is alignkit's config class ``name`` (by name: the experimental ones are imported only when used)."""
    return any(c.__name__ == name and c.__module__.startswith("alignkit.") for c in type(train).__mro__)


def check_online_stages(recipe) -> None:
    """Online DPO and distillation: what trl 1.16's OnlineDPOTrainer and DistillationTrainer would refuse, or get
    wrong, only once the models are loaded."""
    t, data = recipe.train, recipe.data
    if _is(t, "OnlineDPOConfig"):
        strategy = str(getattr(t, "eval_strategy", "no")).rsplit(".", 1)[-1].lower()
        held = [s.path for s in data.datasets if s.test_split or s.role == "eval"]
        if data.test_size > 0 or held or strategy != "no" or t.eval_on_start:
            if data.test_size > 0:
                what = f"test_size {data.test_size:g}"
            elif held:
                what = f"datasets[{held[0]}] holds out rows (test_split or role: eval)"
            else:
                what = f"eval_strategy {strategy}" if strategy != "no" else "eval_on_start"
            raise ConfigError(
                f"{what}: trl 1.16's OnlineDPOTrainer has no evaluation loop (its prompt-only rows reach the model's "
                "forward and fail). Fix: set test_size: 0, eval_strategy: no and no test_split/role: eval; score the "
                "output on held-out prompts with `alignkit eval OUTPUT_DIR --data held_out.jsonl` instead."
            )
    if _is(t, "DistillConfig"):
        if not t.teacher_model_name_or_path:
            raise ConfigError(
                "teacher_model_name_or_path: required by distill. Fix: name the teacher: a merged alignkit run "
                "(alignkit merge RUN --output DIR), a model folder, or a model name (tiny:llama, smollm2:...) that "
                "uses the student's tokenizer."
            )
        if t.teacher_model_init_kwargs:
            raise ConfigError(
                "teacher_model_init_kwargs: alignkit loads the teacher itself (full precision, frozen, safetensors "
                "only), so trl would refuse these. Fix: remove teacher_model_init_kwargs."
            )
        targets = recipe.adapter.lora_target_modules
        if recipe.adapter.use_peft and "lm_head" in (targets if isinstance(targets, list) else [targets]):
            raise ConfigError(
                "lora_target_modules includes lm_head: trl's distillation loss reads lm_head.weight directly, so a "
                "LoRA on the head would never train. Fix: remove lm_head from lora_target_modules (to train the head, "
                "list it in lora_modules_to_save)."
            )


# trl 1.16 GRPOTrainer._compute_loss: which loss_type reads which key. The clipped-ratio family takes epsilon,
# epsilon_high and delta; cispo clips the (detached) ratio at epsilon_high alone; sapo's soft gate reads its two
# temperatures and vespo's Gamma weighting its four k/lambda keys; a key the chosen loss does not read is ignored
# without a word, so setting it is refused here.
GRPO_LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "epsilon": ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"),
    "epsilon_high": ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"),
    "delta": ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"),
    "sapo_temperature_pos": ("sapo",),
    "sapo_temperature_neg": ("sapo",),
    "vespo_k_pos": ("vespo",),
    "vespo_lambda_pos": ("vespo",),
    "vespo_k_neg": ("vespo",),
    "vespo_lambda_neg": ("vespo",),
}
# importance_sampling_level: sequence (GSPO, arXiv:2507.18071) is a per-sequence objective only where the loss averages
# per sequence (grpo, sapo) or is built on it (luspo); the token-summing losses would weight each sequence by its
# length (trl only warns), and vespo computes its own sequence weights from token ratios (trl only warns).
GSPO_LOSSES = ("grpo", "sapo", "luspo")


def check_grpo_variants(recipe) -> None:
    """GRPO's loss variants (trl's ``loss_type``, ``importance_sampling_level``): the combinations trl 1.16 ignores
    silently, only warns about, or refuses once the model is loaded. Raises ConfigError naming the key and the fix."""
    import dataclasses

    import trl

    from alignkit.config.trainers import GRPOConfig

    t = recipe.train
    if not isinstance(t, GRPOConfig):
        return
    loss, level = t.loss_type, t.importance_sampling_level
    if loss == "luspo" and level != "sequence":
        raise ConfigError(
            "loss_type luspo with importance_sampling_level token: LUSPO is GSPO's sequence-level loss scaled by "
            "length; with token-level ratios it is neither. Fix: set importance_sampling_level: sequence."
        )
    if level == "sequence" and loss not in GSPO_LOSSES:
        raise ConfigError(
            f"importance_sampling_level sequence (GSPO) with loss_type {loss}: "
            + (
                "vespo computes its own sequence-level weights from the token ratios. "
                if loss == "vespo"
                else f"{loss} sums per-token terms, so each sequence's ratio is weighted by its length instead of "
                "optimising the per-sequence objective. "
            )
            + f"Fix: set loss_type: grpo (GSPO as in its paper), or one of {list(GSPO_LOSSES)}; or "
            "importance_sampling_level: token."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    for key, losses in GRPO_LOSS_KEYS.items():
        if loss not in losses and getattr(t, key) != defaults[key]:
            raise ConfigError(
                f"{key}: {getattr(t, key)!r} with loss_type {loss}: the {loss} loss does not read {key}, so it would "
                f"be ignored. Fix: remove {key}, or set loss_type to one that uses it ({', '.join(losses)})."
            )
    cap = t.epsilon if t.epsilon_high is None else t.epsilon_high
    if loss == "cispo" and cap < 1:
        raise ConfigError(
            f"loss_type cispo with epsilon_high {t.epsilon_high} (so its cap is {cap}): CISPO caps each token's "
            "importance ratio at epsilon_high, and a cap below 1 scales down even the on-policy tokens (ratio 1). "
            "Fix: set epsilon_high: 5.0 (the ScaleRL paper's value) or any value >= 1."
        )
    if loss == "dr_grpo" and not t.max_completion_length:
        raise ConfigError(
            "loss_type dr_grpo with max_completion_length null: Dr. GRPO divides the summed token losses by "
            "batch size x max_completion_length. Fix: set max_completion_length (e.g. 256)."
        )
    modes = ("token_truncate", "token_mask")
    if loss == "vespo" and t.use_vllm and t.vllm_importance_sampling_correction:
        if t.vllm_importance_sampling_mode not in modes:
            raise ConfigError(
                f"loss_type vespo with vllm_importance_sampling_mode {t.vllm_importance_sampling_mode}: VESPO folds "
                f"the vLLM correction into its token ratios. Fix: set vllm_importance_sampling_mode to one of "
                f"{list(modes)}, or vllm_importance_sampling_correction: false."
            )


def check_streaming(recipe) -> None:
    """A streamed source (``streaming: true``) feeds only CPT, whose blocks are packed on the fly, and a stream has
    no length, so the trainer needs max_steps."""
    from alignkit.config.trainers import CPTConfig

    streamed = [s.path for s in recipe.data.datasets if s.streaming]
    if not streamed or recipe.train is None:
        return
    if not isinstance(recipe.train, CPTConfig):
        stage = type(recipe.train).__name__.removesuffix("Config").lower()
        raise ConfigError(
            f"datasets[{streamed[0]}].streaming: only the cpt stage streams its data (it tokenizes and packs text on "
            f"the fly); {stage} data is loaded first, into memory-mapped Arrow files that need disk, not RAM. Fix: "
            "remove streaming: true from this source."
        )
    if recipe.train.max_steps is None or recipe.train.max_steps <= 0:
        raise ConfigError(
            f"datasets[{streamed[0]}].streaming with max_steps {recipe.train.max_steps}: a stream has no length, so "
            "the trainer cannot count steps by epochs. Fix: set max_steps (e.g. max_steps: 1000), the number of "
            "optimizer steps to train; a stream that ends before then is read again from its start."
        )


CHECKS = (
    check_model_source,
    check_quantization,
    check_training,
    check_distributed,
    check_streaming,
    check_alignment_methods,
    check_grpo_variants,
    check_online_stages,
)


def validate(recipe) -> None:
    for check in CHECKS:
        check(recipe)

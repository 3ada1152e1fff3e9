"""trl's 'ref' adapter dropped when it adds nothing, so the reference pass runs the base model.

trl 1.16's DPO, KTO, GRPO and RLOO trainers, given a ``PeftModel`` and no ``ref_model``, add a frozen copy of the
adapter being trained under the name ``ref`` (``add_adapter("ref", ...)``, then ``copy_`` of every ``.default.``
parameter) and run each step's reference pass with only it active (``use_adapter(model, "ref")``); without a ``ref``
adapter they disable the adapters for that pass instead (``use_adapter(model, None)``: the base model). When the run
starts a new LoRA adapter (a DPO recipe on a base or instruct model; ``adapter_handoff: merge`` or ``reference``),
peft starts every ``lora_B`` at zero, so the copy adds exactly nothing, ``result + (dropout(x) A^T) B^T s = result +
0``, yet every step's reference pass computes its two GEMMs per layer (and walks the model to activate it), in every
precision, and the copy holds one adapter's memory.

:func:`drop_zero_ref_adapter` deletes such a copy before training (``PeftModel.delete_adapter``), so trl takes its own
adapters-disabled path: the same reference log-probs bit for bit (a float plus zero is itself; only the sign of a zero
sum could differ, which no log-prob reads). It applies only where that holds exactly: a plain LoRA ``ref`` config (no
DoRA, LoRA bias, ``modules_to_save``, trainable tokens or target parameters), every LoRA pair of the copy with one
factor all zero and the other finite, and its dropout drawing no random numbers (p = 0: trl's ``disable_dropout``,
DPO's and KTO's default; with lora_dropout > 0 in GRPO/RLOO the copy's dropout draws from torch's generator in each
reference pass, and without it every later draw, the sampling and the policy's dropout masks, would differ). A
continued adapter (``adapter_handoff: continue``: its ``lora_B`` trained) is kept, as trl made it. Checkpoints and
the output folder then hold no ``ref/`` adapter subfolder.

trl's adapters-disabled path enters peft's ``disable_adapter()`` once per step, which builds peft's whole model status
(~75 ms on SmolLM2-135M) to read one flag: that model's ``disable_adapter`` becomes :func:`disable_lora_adapter`,
peft's code path with the flag read directly. Proven on the DPO recipe: tests/speedups/test_zero_ref_adapter.py.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

REF = "ref"  # the adapter name trl 1.16 gives its frozen reference copy


def zero_ref_adapter(model) -> bool:
    """True when ``model`` (a ``PeftModel``) holds trl's ``ref`` adapter and that adapter adds exactly zero to every
    layer it is on (see the module docstring for the conditions)."""
    from peft import LoraConfig

    config = getattr(model, "peft_config", {}).get(REF)
    if type(config) is not LoraConfig or config.use_dora or config.lora_bias or config.modules_to_save:
        return False
    if getattr(config, "trainable_token_indices", None) or getattr(config, "target_parameters", None):
        return False
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if f".{REF}." not in f"{name}.":
            continue
        for factor in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            if f".{factor}.{REF}" in name:
                pairs.setdefault(name.replace(f".{factor}.{REF}", f".{{}}.{REF}"), {})[factor[-1]] = param
                break
        else:
            return False  # a 'ref' parameter that is not a LoRA factor
    if not pairs:
        return False
    for module in model.modules():  # a dropout with p > 0 draws random numbers in a training-mode reference pass
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or REF not in dropouts:
            continue
        dropout = dropouts[REF]
        if type(dropout) is not torch.nn.Identity and not (type(dropout) is torch.nn.Dropout and dropout.p == 0):
            return False
    with torch.no_grad():
        for factors in pairs.values():
            if set(factors) != {"A", "B"}:
                return False
            a, b = factors["A"], factors["B"]
            if not ((not b.any() and torch.isfinite(a).all()) or (not a.any() and torch.isfinite(b).all())):
                return False
    return True


def drop_zero_ref_adapter(trainer) -> bool:
    """Delete trl's ``ref`` adapter from ``trainer``'s model when :func:`zero_ref_adapter` holds and the trainer has
    no separate ``ref_model``; the active adapter stays the trained one. Returns True when it deleted it."""
    if getattr(trainer, "ref_model", True) is not None:
        return False
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not zero_ref_adapter(model):
        return False
    active = model.active_adapter
    model.delete_adapter(REF)
    if model.active_adapter != active:  # peft keeps the remaining adapter active; say so if that ever changes
        raise RuntimeError(f"peft changed the active adapter from {active!r} to {model.active_adapter!r}")
    model.disable_adapter = functools.partial(disable_lora_adapter, model)  # this model only
    return True


IRREGULAR = (
    "The model contains some adapter layers that are enabled and others that are disabled. This is most likely "
    "unintentional. After exiting the disable_adapter context, all adapters will be enabled"
)  # peft 0.21's warning, word for word


def modules_in_order(root: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(root.modules())``: every module under ``root`` once, in the same order (depth first, parent before
    children, a shared module where it first appears), from one iterative walk. ``Module.modules()`` is a chain of
    recursive generators, a frame per level for every module: ~2.3 ms per walk of SmolLM2-135M's 2,499 modules with
    LoRA, against ~0.9 ms here; trl's reference pass walked the model three times per step."""
    seen: set[int] = set()
    out: list[torch.nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return out


def _peft_toggles(tuner) -> bool:
    """True while ``tuner``'s class takes peft 0.21's own ``disable_adapter_layers`` / ``enable_adapter_layers`` /
    ``_enable_adapter_layers`` (those of ``BaseTuner``, which :func:`disable_lora_adapter` follows step by step)."""
    from peft.tuners.tuners_utils import BaseTuner

    names = ("disable_adapter_layers", "enable_adapter_layers", "_enable_adapter_layers")
    return all(getattr(type(tuner), n) is getattr(BaseTuner, n) for n in names)


@contextlib.contextmanager
def disable_lora_adapter(model):
    """peft 0.21's ``PeftModel.disable_adapter`` for a LoRA model, without its ``get_model_status()`` and with one
    walk of the model instead of three. peft reads one fact from that status (whether every adapter layer is enabled,
    none, or some: "irregular"), but builds the whole report to get it (every layer's repr, parameters, devices, the
    trainable-parameter count: ~75 ms per call on SmolLM2-135M, once per step in trl's reference pass), then walks
    the whole model again to disable the layers and once more to enable them. Here that fact comes from the layers'
    ``disable_adapters`` flags, the same ones peft's status reads; the layers peft's ``BaseTuner._enable_adapter_layers``
    toggles (``BaseTunerLayer`` and ``AuxiliaryTrainingWrapper`` modules, in ``modules()`` order) are found once
    (:func:`modules_in_order`), and each gets peft's own ``enable_adapters(False)`` then ``enable_adapters(True)``
    calls, after ``disable_adapter_layers``'s bias warning, with the same ``_adapters_disabled`` flag, in the same
    order. A tuner class that overrides those methods gets peft's calls themselves. Set on the one model whose 'ref'
    copy :func:`drop_zero_ref_adapter` deleted (trl's reference pass then enters this once per step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    tuner = model.base_model
    was_disabled = model._adapters_disabled
    layers = [m for m in modules_in_order(tuner.model) if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    flags = {not m.disable_adapters for m in layers if isinstance(m, BaseTunerLayer)}
    enabled = flags.pop() if len(flags) == 1 else "irregular"
    if enabled == "irregular":
        warnings.warn(IRREGULAR, stacklevel=3)
    own = _peft_toggles(tuner)
    try:
        if own:
            for name in tuner.active_adapters:  # BaseTuner.disable_adapter_layers's warning, word for word
                bias = getattr(tuner.peft_config[name], "bias", "none")
                if bias != "none":
                    warnings.warn(
                        f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                        "same output as the base model would without adaption.",
                        stacklevel=3,
                    )
            for layer in layers:
                layer.enable_adapters(False)
        else:
            tuner.disable_adapter_layers()
        model._adapters_disabled = True
        yield
    finally:
        if enabled is not False:
            if own:
                for layer in layers:
                    layer.enable_adapters(True)
            else:
                tuner.enable_adapter_layers()
        model._adapters_disabled = was_disabled

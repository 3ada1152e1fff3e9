"""DPO with one prompt forward per preference pair: chosen and rejected share the prompt's hidden states.

trl 1.16's ``DPOTrainer`` runs each pair as two right-padded rows, ``prompt + chosen`` and ``prompt + rejected``: the
prompt goes through the model twice (policy forward, backward, and the reference forward) and every row is padded to
the longest one. Here a batch of ``B`` pairs becomes one padding-free sequence ``[p_1 c_1 r_1 p_2 c_2 r_2 ...]``:
``c_i`` attends causally to ``p_i`` and itself, ``r_i`` to ``p_i`` and itself (never to ``c_i``), positions of
``r_i`` continue from the end of ``p_i``. A prompt's hidden states do not depend on what follows it (causal
attention), so the per-token log-probabilities are those of the two-row forward: exact, up to float rounding
(tests/speedups/test_shared_prompt.py: log-probs and LoRA gradients equal the plain forward's to 1e-5). Work per pair
falls from ``2 * max_len`` tokens to ``P + C + R``. The LM head scores only the completion positions (the first token
of ``r_i`` is predicted from ``p_i``'s last hidden state, as in the two-row forward).

The result is scattered back into trl's ``(2B, L - 1)`` per-token layout, so every DPO loss type, weighting and metric
of trl runs unchanged. Batches that do not have this shape (prompts of a pair differ, completions not contiguous after
the prompt, left padding, vision inputs, MoE router losses) take trl's forward unchanged.

One difference in randomness, not in expectation: LoRA dropout draws one mask for the shared prompt tokens, where the
two-row forward draws one per copy.

Source: the attention layout is "prefix sharing" (Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing", arXiv:2410.20305); trl's fused LM head (``trl.trainer.utils.add_fused_lm_head``) supplies the
temperature, logit scale and softcapping used here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from dataclasses import dataclass

import torch

from alignkit.speedups.attention import PAIR_LAYOUT

_ACTIVE = contextvars.ContextVar("alignkit_shared_prompt", default=False)
_MODEL_KWARGS = {"input_ids", "attention_mask", "use_cache"}
_FUSED_CLOSURE = {"temperature", "outputs", "final_logit_softcapping", "logit_scale", "cast_lm_head_to_fp32"}


@dataclass(frozen=True)
class PairBatch:
    """A DPO batch of ``B`` pairs laid out as one sequence. ``layout``: per pair (start, prompt, chosen, rejected)
    lengths in tokens; ``input_ids``/``position_ids``: (1, T) with T = sum of P + C + R; ``source``: (N,) index of the
    hidden state that predicts each completion token, ``targets``: (N,) those tokens; ``rows``/``cols``: where each of
    the N log-probs goes in trl's (2B, L - 1) layout."""

    layout: tuple[tuple[int, int, int, int], ...]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]


def pair_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> PairBatch | None:
    """The shared-prompt layout of a trl DPO batch (rows ``[chosen_1..B, rejected_1..B]``, right-padded, labels -100
    on prompt and padding), or None when the batch is not of that shape. Shapes: (2B, L) each."""
    if input_ids.ndim != 2 or labels.shape != input_ids.shape or input_ids.shape[0] % 2:
        return None
    n_rows, length = input_ids.shape
    pairs = n_rows // 2
    positions = torch.arange(length, device=input_ids.device)
    if attention_mask is None:
        lengths = torch.full((n_rows,), length, device=input_ids.device)
    else:
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if not bool((mask == (positions < lengths[:, None])).all()):  # not right padding
            return None
    labeled = labels != -100
    prompt = labeled.float().argmax(1)  # the first labeled position
    if bool((prompt < 1).any()) or not bool(torch.equal(prompt[:pairs], prompt[pairs:])):
        return None
    completion = (positions >= prompt[:, None]) & (positions < lengths[:, None])
    if not bool(torch.equal(labeled, completion)) or not bool(((labels == input_ids) | ~labeled).all()):
        return None
    same_prompt = (input_ids[:pairs] == input_ids[pairs:]) | (positions >= prompt[:pairs, None])
    if not bool(same_prompt.all()):
        return None

    ids, pos, source, targets, rows, cols, layout = [], [], [], [], [], [], []
    start = 0
    for i, (p, c_end, r_end) in enumerate(
        zip(prompt[:pairs].tolist(), lengths[:pairs].tolist(), lengths[pairs:].tolist())
    ):
        c, r = c_end - p, r_end - p
        ids += [input_ids[i, :c_end], input_ids[pairs + i, p:r_end]]
        pos += [torch.arange(c_end), torch.arange(p, r_end)]
        source += [torch.arange(start + p - 1, start + c_end - 1)]  # hidden t-1 predicts chosen token t
        rejected_source = torch.arange(start + c_end - 1, start + c_end + r - 1)
        rejected_source[0] = start + p - 1  # the first rejected token is predicted from the prompt's last position
        source += [rejected_source]
        targets += [input_ids[i, p:c_end], input_ids[pairs + i, p:r_end]]
        rows += [torch.full((c,), i), torch.full((r,), pairs + i)]
        cols += [torch.arange(p - 1, c_end - 1), torch.arange(p - 1, r_end - 1)]
        layout.append((start, p, c, r))
        start += p + c + r
    device = input_ids.device
    return PairBatch(
        layout=tuple(layout),
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None].to(device),
        source=torch.cat(source).to(device),
        targets=torch.cat(targets),
        rows=torch.cat(rows).to(device),
        cols=torch.cat(cols).to(device),
        shape=(n_rows, length - 1),
    )


def _fused_settings(forward) -> dict | None:
    """The settings trl's ``add_fused_lm_head`` closed over (temperature, logit scale, softcapping, outputs), read from
    the patched forward; None when ``forward`` is not trl's fused one (another trl version: nothing is changed)."""
    fn = getattr(forward, "__func__", None)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or fn.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))
    return {k: cells[k] for k in _FUSED_CLOSURE} if _FUSED_CLOSURE <= cells.keys() else None


def _shared_forward(model, batch: PairBatch, settings: dict):
    """The backbone once over the pair layout, the LM head on completion positions only; trl's output type."""
    from trl.trainer import utils as trl_utils

    hidden = model.base_model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **{PAIR_LAYOUT: batch.layout}
    ).last_hidden_state[0]
    lm_head = model.get_output_embeddings()
    hidden = hidden.to(lm_head.weight.device)[batch.source.to(lm_head.weight.device)]
    targets = batch.targets.to(lm_head.weight.device)
    autocast = contextlib.nullcontext()
    if settings["cast_lm_head_to_fp32"]:
        hidden = hidden.float()
        autocast = torch.autocast(hidden.device.type, enabled=False)
    with autocast, trl_utils.maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):  # ZeRO-3: the whole head
        per_token = trl_utils._ChunkedLogProbFunction.apply(
            hidden, lm_head.weight, lm_head.bias, targets, settings["temperature"],
            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, settings["final_logit_softcapping"], settings["logit_scale"],
            settings["outputs"],
        )  # fmt: skip
    index = (batch.rows.to(hidden.device), batch.cols.to(hidden.device))
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(batch.shape).index_put(index, x) for x in per_token
    )
    label_mask = torch.zeros(batch.shape, dtype=torch.bool, device=hidden.device).index_put_(
        index, torch.ones((), dtype=torch.bool, device=hidden.device)
    )
    return trl_utils.FusedCausalLMOutput(
        loss=-log_probs.sum() / max(len(batch.targets), 1),
        log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
        is_top1=is_top1, label_mask=label_mask, aux_loss=None,
    )  # fmt: skip


def share_prompts(trainer) -> bool:
    """Give ``trainer`` (a trl ``DPOTrainer`` whose model runs ``sdpa_per_document`` attention) one prompt forward per
    pair, in training, evaluation and the reference forward. Returns False, changing nothing, when the trainer, the
    model or trl's fused LM head are not of the supported kind."""
    import trl

    if not isinstance(trainer, trl.DPOTrainer) or getattr(trainer, "_is_vision_dataset", False):
        return False
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    from alignkit.speedups.attention import PER_DOCUMENT

    if getattr(base.config, "_attn_implementation", None) != PER_DOCUMENT or getattr(base, "_alignkit_shared", False):
        return False
    if getattr(base.config.get_text_config(), "output_router_logits", False):
        return False
    fused = base.forward
    settings = _fused_settings(fused)
    if settings is None:
        return False

    # wrap the function, not the bound method: the bound method's signature already lacks ``self``, and binding the
    # wrapper would drop its first parameter (``input_ids``) from what generate() and transformers inspect
    @functools.wraps(getattr(fused, "__func__", fused))
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        # PEFT's forward passes inputs_embeds, output_attentions, output_hidden_states and return_dict as None
        given = {k for k, v in kwargs.items() if v is not None}
        plain_inputs = "input_ids" in given and given <= _MODEL_KWARGS
        if fused_lm_head and _ACTIVE.get() and not args and labels is not None and plain_inputs:
            if (batch := pair_batch(kwargs["input_ids"], kwargs.get("attention_mask"), labels)) is not None:
                return _shared_forward(self, batch, settings)
        return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

    base.forward = types.MethodType(forward, base)
    base._alignkit_shared = True
    for name in ("_compute_loss", "compute_ref_log_probs"):
        setattr(trainer, name, _activating(getattr(trainer, name)))
    return True


def _activating(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return method(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return run

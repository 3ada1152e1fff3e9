"""Attention that does only the work it must, for padding-free (concatenated) and right-padded batches.

transformers gives a padding-free batch (rows concatenated into one sequence, ``position_ids`` restarting per row) a
block-diagonal ``(L, L)`` mask under ``sdpa``: attention then costs (sum of the row lengths)^2 and, on CPU, SDPA with an
explicit mask is its slow path. ``sdpa_per_document`` (registered here in transformers' ``AttentionInterface`` and
``AttentionMaskInterface``) runs ``torch.nn.functional.scaled_dot_product_attention`` once per document with
``is_causal=True`` and no mask (sum of squares, the fast causal kernel); a right-padded batch with no past keys runs
causal SDPA without the padding mask (a real token attends only to earlier positions, which are all real: the outputs
at real tokens, hence loss and gradients, are the masked ones; pad positions carry no loss). Everything else (left
padding, a KV cache, decoding) goes to transformers' own ``sdpa_attention_forward`` with its mask, unchanged.

Measured (benchmarks/README.md): per-document attention of 8 rows of 60-244 tokens (SmolLM2 shapes), forward and
backward on 2 CPU threads, 3.1x faster than the block-diagonal mask, outputs equal to 4e-7. Source: transformers 5.23
``integrations/sdpa_attention.py`` and ``masking_utils.sdpa_mask``; flash-attention's varlen kernels do the same on GPU.
"""

from __future__ import annotations

import importlib.util

PER_DOCUMENT = "sdpa_per_document"
PAIR_LAYOUT = (
    "alignkit_pair_layout"  # forward kwarg: preference pairs sharing one prompt (alignkit.speedups.shared_prompt)
)


def _document_bounds(position_ids, cu_seq_lens, batch: int, length: int) -> list[list[int]] | None:
    """Start offsets (plus the end) of each row's documents: from trl's ``cu_seq_lens_q`` (batch 1), else where the
    ``position_ids`` restart. None when every row is one document (nothing to split)."""
    if cu_seq_lens is not None and batch == 1:
        bounds = [int(x) for x in cu_seq_lens.tolist()]
        return [bounds] if len(bounds) > 2 and bounds[-1] == length else None
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    import torch

    pos = position_ids.expand(batch, -1)
    restarts = torch.ones_like(pos, dtype=torch.bool)
    restarts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(restarts[:, 1:].any()):
        return None
    return [[*row.nonzero().flatten().tolist(), length] for row in restarts]


def _fp32_under_cpu_bf16(query, key, value):
    """(query, key, value, context) for the SDPA calls: under CPU bf16 autocast, the three in fp32 and autocast off
    around the calls (the attention is then the fp32 path's, exactly); else as they are, with no context.

    Why: torch 2.13's CPU flash-attention kernel runs its bf16 backward ~2x slower than its fp32 one at these shapes
    (SmolLM2: head dim 64, 9/3 heads, documents of 60-244 tokens, 1 thread: forward + backward of a batch's documents
    97 vs 46 ms; the bf16 forward alone is faster, 3.0 vs 9.4 ms), so bf16 attention made a bf16 autocast step slower,
    not faster (benchmarks/README.md, "bf16 step profile"). The queries and keys arrive in fp32 anyway (RoPE multiplies
    the bf16 projections by fp32 cos/sin), the values are upcast from bf16, the output goes to o_proj, whose GEMM
    autocast runs in bf16 as before."""
    import contextlib

    import torch

    if (
        query.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ):
        return query.float(), key.float(), value.float(), torch.autocast("cpu", enabled=False)
    return query, key, value, contextlib.nullcontext()


def per_document_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """An ``AttentionInterface`` function. query: (batch, heads, L, head_dim); key/value: (batch, kv_heads, L,
    head_dim). Returns ((batch, L, heads, head_dim), None) like ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, _, length, _ = query.shape
    if kwargs.get(PAIR_LAYOUT) is not None and batch == 1:
        return shared_prompt_sdpa(query, key, value, kwargs[PAIR_LAYOUT], dropout, scaling), None
    causal = getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False
    plain = attention_mask is None and causal and length > 1 and key.shape[2] == length
    if not plain or kwargs.get("output_attentions") or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    bounds = _document_bounds(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), batch, length)
    query, key, value, precision = _fp32_under_cpu_bf16(query, key, value)
    with precision:
        return _per_document(query, key, value, bounds, dropout, scaling, gqa), None


def _per_document(query, key, value, bounds, dropout, scaling, gqa: bool):
    """Causal SDPA per document (``bounds``: per row, document starts plus the end; None: each row is one)."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if bounds is None:
        out = sdpa(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
    else:
        rows = []
        for b, starts in enumerate(bounds):
            # split, not one slice per document: a slice's backward writes its gradient into a zero-filled tensor of
            # the whole row and the documents' are added up (documents x row work); split's backward is one cat
            lengths = [e - s for s, e in zip(starts[:-1], starts[1:])]
            parts = (t[b : b + 1].split(lengths, dim=2) for t in (query, key, value))
            docs = [sdpa(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
                    for q, k, v in zip(*parts)]  # fmt: skip
            rows.append(torch.cat(docs, dim=2))
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


def shared_prompt_sdpa(query, key, value, layout, dropout: float = 0.0, scaling=None):
    """Attention over preference pairs laid out as ``[p c r]`` per pair (``layout``: (start, P, C, R) per pair, in
    one sequence): ``p c`` causal; ``r`` attends to ``p`` (all of it) and causally to itself, never to ``c``.
    query: (1, heads, T, head_dim); key/value: (1, kv_heads, T, head_dim). Returns (1, T, heads, head_dim)."""
    query, key, value, precision = _fp32_under_cpu_bf16(query, key, value)
    with precision:
        return _shared_prompt(query, key, value, layout, dropout, scaling)


BATCHED_PAIRS_MAX_MASK = 32 << 20  # mask elements (pairs x L x L) up to which the pairs run as one padded batch


def _shared_prompt(query, key, value, layout, dropout, scaling):
    """The pairs as one padded batch (one SDPA call, one gather in and one out: every layer of a DPO step had run
    ~680 small ops here, two SDPA calls and the slices and concatenations around them per pair) while its mask stays
    within BATCHED_PAIRS_MAX_MASK elements; else one pair at a time (:func:`_shared_prompt_per_pair`). The same
    attention either way: each query sees exactly the keys it sees there (padding is masked out of every real row)."""
    import torch

    plan = _pair_plan(tuple(layout), query.shape[2], query.device)
    if plan is None:
        return _shared_prompt_per_pair(query, key, value, layout, dropout, scaling)
    gather, scatter, mask, pairs, width = plan
    gqa = key.shape[1] != query.shape[1]

    def batched(t):  # (1, heads, T, d) -> (pairs, heads, width, d)
        heads, dim = t.shape[1], t.shape[3]
        return t[0].index_select(1, gather).view(heads, pairs, width, dim).transpose(0, 1)

    out = torch.nn.functional.scaled_dot_product_attention(
        batched(query), batched(key), batched(value), attn_mask=mask, dropout_p=dropout, scale=scaling,
        enable_gqa=gqa,
    )  # fmt: skip
    heads, dim = out.shape[1], out.shape[3]
    return out.transpose(1, 2).reshape(pairs * width, heads, dim).index_select(0, scatter).unsqueeze(0)


_PLAN: list = [None]  # (layout key, plan) of the last layout: every layer of a forward (and the reference) reuses it


def _pair_plan(layout, length: int, device):
    """(gather (pairs * width,), scatter (T,), mask (pairs, 1, width, width) bool, pairs, width) for ``layout``, or
    None when the mask would pass BATCHED_PAIRS_MAX_MASK. Pair i's tokens ``[p c r]`` fill row i from column 0
    (padding columns gather token 0 and are masked out as keys; as queries they see only column 0 and are dropped);
    the mask is causal except that r never sees c; ``scatter`` puts each of the T tokens back in its place."""
    import torch

    key, last = (layout, length, device), _PLAN[0]  # one read, one write: a (key, plan) pair, never half of one
    if last is not None and last[0] == key:
        return last[1]
    pairs, width = len(layout), max(p + c + r for _, p, c, r in layout)
    plan = None
    if pairs * width * width <= BATCHED_PAIRS_MAX_MASK and sum(p + c + r for _, p, c, r in layout) == length:
        gather = torch.zeros(pairs, width, dtype=torch.long)
        scatter = torch.empty(length, dtype=torch.long)
        mask = torch.zeros(pairs, 1, width, width, dtype=torch.bool)
        mask[:, 0, :, 0] = True  # every row sees at least one key (padding rows: column 0; real rows see it anyway)
        for i, (start, p, c, r) in enumerate(layout):
            n = p + c + r
            gather[i, :n] = torch.arange(start, start + n)
            scatter[start : start + n] = torch.arange(i * width, i * width + n)
            visible = torch.ones(n, n, dtype=torch.bool).tril()
            visible[p + c :, p : p + c] = False  # r attends to p and itself, never to c
            mask[i, 0, :n, :n] = visible
        plan = (gather.flatten().to(device), scatter.to(device), mask.to(device), pairs, width)
    _PLAN[0] = (key, plan)
    return plan


def _shared_prompt_per_pair(query, key, value, layout, dropout, scaling):
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = key.shape[1] != query.shape[1]
    parts = []
    for start, p, c, r in layout:
        mid, end = start + p + c, start + p + c + r
        parts.append(sdpa(query[:, :, start:mid], key[:, :, start:mid], value[:, :, start:mid],
                          dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa))  # fmt: skip
        if r:
            keys = torch.cat([key[:, :, start : start + p], key[:, :, mid:end]], dim=2)
            values = torch.cat([value[:, :, start : start + p], value[:, :, mid:end]], dim=2)
            visible = torch.ones(r, p + r, dtype=torch.bool, device=query.device)
            visible[:, p:] = torch.ones(r, r, dtype=torch.bool, device=query.device).tril()
            parts.append(sdpa(query[:, :, mid:end], keys, values, attn_mask=visible,
                              dropout_p=dropout, scale=scaling, enable_gqa=gqa))  # fmt: skip
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _right_padded(mask) -> bool:
    """True when every row of a (batch, L) 0/1 mask is ones then zeros (right padding, or none)."""
    mask = mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def per_document_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """An ``AttentionMaskInterface`` function: None (the attention runs causal, per document) for batches without
    padding or with right padding only and no past keys; transformers' ``sdpa_mask`` otherwise."""
    from transformers.masking_utils import sdpa_mask

    fresh = q_offset == 0 and kv_offset == 0 and q_length == kv_length
    if fresh and attention_mask is None:
        return None
    if fresh and attention_mask.ndim == 2 and attention_mask.shape[-1] == kv_length and _right_padded(attention_mask):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def _full_causal(config) -> bool:
    """Every layer plain causal attention: no sliding window, no bidirectional layers, no softcapping (the
    per-document path drops the mask, which is only right for a plain causal mask)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "use_bidirectional_attention", False):
        return False
    return all(t == "full_attention" for t in (getattr(text, "layer_types", None) or ["full_attention"]))


def register() -> str:
    """Register ``sdpa_per_document`` with transformers (idempotent). Returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_DOCUMENT, per_document_sdpa)
    AttentionMaskInterface.register(PER_DOCUMENT, per_document_mask)
    return PER_DOCUMENT


def flash_varlen_available() -> bool:
    """flash-attn importable and a CUDA device present: transformers' ``flash_attention_2`` then runs padding-free
    batches through ``flash_attn_varlen_func`` (cu_seq_lens from trl's collator)."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def use_fast_attention(model) -> str | None:
    """Switch ``model`` (a transformers model, or a PEFT model around one) from ``sdpa`` to the attention that skips
    cross-document and padding work: ``flash_attention_2`` on a GPU with flash-attn (bf16/fp16 weights), else
    ``sdpa_per_document``. Only models on transformers' ``sdpa`` that support switching (the AttentionInterface
    ones) change; returns the new implementation's name, or None when nothing changed."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return None
    if not type(base).__name__.endswith("ForCausalLM") or not _full_causal(config):
        return None
    if not base._can_set_attn_implementation():
        return None
    half = next(base.parameters()).dtype in (torch.bfloat16, torch.float16)
    name = "flash_attention_2" if flash_varlen_available() and half else register()
    try:
        base.set_attn_implementation(name)
    except (ImportError, ValueError):  # flash-attn present but unusable (GPU too old, wrong build): stay on SDPA's
        base.set_attn_implementation(name := register())
    return name

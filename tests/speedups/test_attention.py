"""Per-document attention (alignkit.speedups.attention): the same outputs and gradients as transformers' masked SDPA
for padding-free, right-padded and left-padded batches, and only on models where dropping the mask is exact."""

import pytest
import torch
from regression.margins import generation_prompt

from alignkit.config import ModelArguments
from alignkit.models.loader import load_base_model
from alignkit.speedups.attention import PER_DOCUMENT, use_fast_attention


@pytest.fixture(scope="module")
def tiny():
    return load_base_model(ModelArguments(model_name_or_path="tiny:llama"))


def _both(model, **inputs):
    """(logits, input-embedding gradient) under sdpa, then under sdpa_per_document."""
    results = []
    for name in ("sdpa", PER_DOCUMENT):
        if name == PER_DOCUMENT:
            assert use_fast_attention(model) == PER_DOCUMENT
        else:
            model.set_attn_implementation("sdpa")
        embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        # use_cache=False as in training: with a cache transformers does not look for packed rows at all
        logits = model(inputs_embeds=embeds, use_cache=False, **rest).logits
        keep = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        logits[keep].logsumexp(-1).sum().backward()
        results.append((logits.detach()[keep], embeds.grad[keep]))
    model.set_attn_implementation("sdpa")
    return results


def test_padding_free_rows_attend_only_within_themselves(tiny):
    ids = torch.randint(5, 200, (1, 40))
    position_ids = torch.cat([torch.arange(12), torch.arange(20), torch.arange(8)])[None]
    (ref, ref_grad), (mine, grad) = _both(tiny, input_ids=ids, position_ids=position_ids)
    assert torch.allclose(mine, ref, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-5)
    alone = tiny(input_ids=ids[:, 12:32]).logits[0]  # the middle row on its own
    assert torch.allclose(mine[12:32], alone, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_match_masked_sdpa(tiny, side):
    ids = torch.randint(5, 200, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    rows = (slice(15, None), slice(4, None)) if side == "right" else (slice(None, 9), slice(None, 20))
    mask[1, rows[0]], mask[2, rows[1]] = 0, 0
    (ref, ref_grad), (mine, grad) = _both(tiny, input_ids=ids, attention_mask=mask)
    assert torch.allclose(mine, ref, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-5)


def test_generation_is_unchanged(tiny):
    """Greedy generation through the KV cache gives the same logits at every step under per-document attention,
    and so the same tokens: on this fixed prompt the smallest top-2 logit margin is far above the 1e-5 tolerance
    under every ISA setting (``python -m tests.regression.margins attention_generate``)."""
    ids = generation_prompt()
    kwargs = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    want = tiny.generate(ids, **kwargs)
    use_fast_attention(tiny)
    try:
        got = tiny.generate(ids, **kwargs)
    finally:
        tiny.set_attn_implementation("sdpa")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got.logits, want.logits, strict=True))
    assert torch.equal(got.sequences, want.sequences)

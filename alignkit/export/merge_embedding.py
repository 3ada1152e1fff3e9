"""``alignkit merge`` for an embed-stage adapter: the merged backbone inside a plain ``SentenceTransformer`` folder
(modules.json, pooling, normalisation, tokenizer, safetensors), gated by an embedding-parity check: the folder,
loaded with plain ``SentenceTransformer(path)``, against base + adapter on fixed sentences.

The merge methods are alignkit.export.merge's (``dequantize`` for 4-bit-trained adapters, ``full_precision``)."""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.export.outputs import staged_output
from alignkit.models import load_base_model
from alignkit.runs import RunRecord
from alignkit.tasks.embedding import sentence_transformer

PARITY_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Where does Alice work?",
    "Alice lives in Paris and works for a company in London.",
    "What is 12 + 30? ANSWER: 42",
)


def embed(model, sentences=PARITY_SENTENCES) -> torch.Tensor:
    """``[len(sentences), dim]`` float32 embeddings on the CPU, as the model's modules compute them (normalised
    when the model normalises)."""
    model.eval()
    with torch.no_grad():
        return model.encode(list(sentences), convert_to_tensor=True, batch_size=len(sentences)).float().cpu()


def merge_embedding(
    adapter_dir: str | Path,
    output_dir: str | Path | None = None,
    method: str | None = None,
    max_diff: float | None = None,
    reference=None,
):
    """Merge an embed-stage adapter into its base; see the module docstring. ``max_diff``: the parity bound on
    max |embedding difference| (default: 1e-3 when both sides compute in float32, else 1e-1). ``reference``: the
    trained model still in memory (the embed recipe passes it), compared instead of base + adapter loaded again.
    Returns alignkit.export.merge's MergeResult (``parity.max_abs_diff``: over every embedding component)."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    from alignkit.config.args import QuantizationArguments
    from alignkit.export import parity as m

    adapter_dir = Path(adapter_dir)
    record = RunRecord.for_model(adapter_dir)
    model_args, quant_args = m.trained_args(adapter_dir, record.last)
    method, output_dir = m.check_merge_request(adapter_dir, output_dir, method, quant_args.load_in_4bit)
    with staged_output(output_dir) as tmp:  # locked; built beside it, swapped in whole
        source = m.trained_base(model_args)

        # The reference: the base exactly as the adapter was trained on it (4-bit if it was), plus the adapter.
        if reference is None:
            base = load_base_model(model_args, quant_args, "embedding", source)
            reference = sentence_transformer(PeftModel.from_pretrained(base, adapter_dir), adapter_dir)
        ref, ref_dtype = embed(reference), reference[0].auto_model.dtype
        del reference

        base = load_base_model(
            model_args, quant_args if method == "dequantize" else QuantizationArguments(), "embedding", source
        )
        if method == "dequantize":
            base = base.dequantize(dtype=base.dtype)
        merged = sentence_transformer(PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(), adapter_dir)
        merged.save_pretrained(str(tmp), create_model_card=False)
        del merged, base

        # Parity is checked on what was saved, loaded the way users will load it.
        reloaded = SentenceTransformer(str(tmp), device="cpu", local_files_only=True)
        exact = reloaded[0].auto_model.dtype == ref_dtype == torch.float32
        bound = max_diff if max_diff is not None else (m.EXACT_BOUND if exact else m.LOW_PRECISION_BOUND)
        parity = m.Parity(max_abs_diff=(embed(reloaded) - ref).abs().max().item(), loss_adapter=None, loss_merged=None,
                          bound=bound, what="embedding")  # fmt: skip
        print(f"merged {adapter_dir} -> {output_dir} (method {method}, a SentenceTransformer folder)\n"
              f"parity: max |embedding diff| = {parity.max_abs_diff:.3g} (bound {bound:g}, "
              f"{'ok' if parity.passed else 'ABOVE the bound'})")  # fmt: skip
        head = dict(record.last.head_config)
        m.write_merge_record(tmp, record, adapter_dir, output_dir, method, parity, model_args, "embedding", head)
        from alignkit.export.card import write_model_card

        write_model_card(tmp)
    return m.MergeResult(output_dir=output_dir, method=method, parity=parity)


def finish_embedding(output_dir: str | Path, model, merge: bool) -> dict[str, float]:
    """After an embed run: check that what was saved is the model that was trained, loaded the way users load it.

    ``merge`` (a LoRA run): :func:`merge_embedding` writes ``<output_dir>-merged`` with ``model`` as the parity
    reference. Full fine-tuning: ``output_dir`` itself is the SentenceTransformer folder; it is loaded with plain
    ``SentenceTransformer(path)`` and compared with ``model``. Either way the max |embedding difference| on
    :data:`PARITY_SENTENCES` is recorded (``saved_vs_trained_max_abs_diff`` in the run record's metrics) and
    returned."""
    import dataclasses

    from sentence_transformers import SentenceTransformer

    output_dir = Path(output_dir)
    if merge:
        diff = merge_embedding(output_dir, reference=model).parity.max_abs_diff
    elif (output_dir / "adapter_config.json").is_file():
        return {}  # an adapter kept unmerged (merge_after_training: false): `alignkit merge` checks it later
    else:
        reloaded = SentenceTransformer(str(output_dir), device="cpu", local_files_only=True)
        diff = (embed(reloaded) - embed(model)).abs().max().item()
    print(f"saved model vs the trained one: max |embedding diff| = {diff:.3g}")
    record = RunRecord.read(output_dir)
    metrics = {**record.metrics, "saved_vs_trained_max_abs_diff": diff}
    dataclasses.replace(record, metrics=metrics).write(output_dir)
    from alignkit.export.card import write_model_card

    write_model_card(output_dir)
    return {"saved_vs_trained_max_abs_diff": diff}

"""Sentence embeddings on sentence-transformers (Reimers & Gurevych 2019, arXiv:1908.10084): the backbone alignkit's
loader built (full, LoRA, or 4-bit + LoRA) wrapped into a ``SentenceTransformer``, its losses and its evaluators.

Data comes in three formats (the ``embed`` schema in alignkit.data.schemas tells them apart by their columns):

| format | columns | default loss |
|---|---|---|
| pairs | ``anchor``, ``positive`` | ``mnrl``: MultipleNegativesRankingLoss (in-batch negatives) |
| triplets | ``anchor``, ``positive``, ``negative`` | ``mnrl`` (the negative is one more candidate per row) |
| scored pairs | ``sentence1``, ``sentence2``, ``score`` in [0, 1] | ``cosent``: CoSENTLoss |

Held-out evaluation: pairs/triplets with sentence-transformers' ``InformationRetrievalEvaluator`` (each held-out
anchor is a query over a corpus of every positive and negative text of all splits; its own positive is the relevant
document: recall@1/10, MRR@10, NDCG@10), scored pairs with ``EmbeddingSimilarityEvaluator`` (Spearman of the cosine
similarity against ``score``).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError

PAIRS, TRIPLETS, SCORED = "pairs", "triplets", "scored pairs"
FORMAT_COLUMNS = {
    TRIPLETS: ("anchor", "positive", "negative"),
    PAIRS: ("anchor", "positive"),
    SCORED: ("sentence1", "sentence2", "score"),
}
EVALUATOR_NAME = "heldout"  # metric keys: eval_heldout_cosine_recall@1, before_heldout_cosine_mrr@10, ...


@dataclass(frozen=True)
class LossRow:
    """``cls``: the loss class in sentence_transformers.sentence_transformer.losses; ``formats``: the data it takes."""

    name: str
    cls: str
    formats: tuple[str, ...]
    summary: str


LOSSES: dict[str, LossRow] = {
    row.name: row
    for row in (
        LossRow("mnrl", "MultipleNegativesRankingLoss", (PAIRS, TRIPLETS),
                "in-batch negatives ranking (InfoNCE; Henderson et al. 2017, arXiv:1705.00652)"),
        LossRow("cached_mnrl", "CachedMultipleNegativesRankingLoss", (PAIRS, TRIPLETS),
                "mnrl with GradCache (Gao et al. 2021, arXiv:2101.06983): large batches in mini_batch_size memory"),
        LossRow("cosent", "CoSENTLoss", (SCORED,), "CoSENT ranking of pair cosines by their scores"),
        LossRow("cosine", "CosineSimilarityLoss", (SCORED,), "MSE between cosine and score"),
    )
}  # fmt: skip
DEFAULT_LOSS = {PAIRS: "mnrl", TRIPLETS: "mnrl", SCORED: "cosent"}


def data_format(columns) -> str:
    """The format a split's columns make (the first of triplets, pairs, scored pairs whose columns it holds)."""
    present = set(columns)
    for name, wanted in FORMAT_COLUMNS.items():
        if set(wanted) <= present:
            return name
    raise ConfigError(f"embed data: columns {sorted(present)} make none of {list(FORMAT_COLUMNS)}.")


def loss_row(args, fmt: str) -> LossRow:
    """The loss ``args.loss`` names ('auto': the format's default); ConfigError if it does not take ``fmt``."""
    name = DEFAULT_LOSS[fmt] if args.loss == "auto" else args.loss
    row = LOSSES[name]
    if fmt not in row.formats:
        fits = [n for n, r in LOSSES.items() if fmt in r.formats]
        raise ConfigError(
            f"loss: {name} ({row.cls}) trains on {' or '.join(row.formats)}, and the data is {fmt} "
            f"({'/'.join(FORMAT_COLUMNS[fmt])}). Fix: set loss to one of {fits} or auto."
        )
    return row


def check_loss(args, splits, train_args=None) -> str:
    """The data format of every split (one format for all: DataError naming the split otherwise), checked against
    the loss before the model loads; an in-batch-negatives loss (mnrl, cached_mnrl) at a batch of one row (no
    negatives: its loss is 0 and its gradient nothing, read later as diverged weights) is refused. Returns the
    format."""
    from alignkit.errors import DataError

    formats = {name: data_format(split.column_names) for name, split in splits.items()}
    fmt = formats["train"]
    for name, other in formats.items():
        if other != fmt:
            raise DataError(
                f"{name} split", None, f"is {other} while the train split is {fmt}",
                "give every source the same columns (pairs, triplets or scored pairs)",
            )  # fmt: skip
    name = loss_row(args, fmt).name
    batch = getattr(train_args, "per_device_train_batch_size", None)
    if name in ("mnrl", "cached_mnrl") and batch == 1 and fmt == PAIRS:  # triplets bring their own negative
        from alignkit.errors import ConfigError

        raise ConfigError(
            f"loss: {name} scores each anchor against the other rows of its batch (in-batch negatives), and "
            "per_device_train_batch_size is 1, so it has no negatives and nothing to learn. Fix: set "
            "per_device_train_batch_size to 2 or more (mnrl learns more from bigger batches: 32+), or use triplets "
            "with a negative column."
        )
    return fmt


def build_loss(model, args, fmt: str):
    """The sentence-transformers loss module for ``args.loss`` on ``model`` (see :data:`LOSSES`)."""
    from sentence_transformers.sentence_transformer import losses

    row = loss_row(args, fmt)
    kwargs = {"mini_batch_size": args.mini_batch_size} if row.name == "cached_mnrl" else {}
    return getattr(losses, row.cls)(model, **kwargs)


def describe(model, args, fmt: str) -> dict:
    """What the run record (head_config) and the model card say about the embedding model."""
    return {"format": fmt, "loss": loss_row(args, fmt).cls, "pooling": model.alignkit_pooling,
            "embedding_dimension": model.get_embedding_dimension(), "max_seq_length": model.max_seq_length}  # fmt: skip


def build_evaluator(splits, fmt: str, train_args):
    """A held-out evaluator over ``splits['test']`` (None without a test split); see the module docstring."""
    test = splits.get("test")
    if test is None:
        return None
    batch_size = train_args.per_device_eval_batch_size
    from sentence_transformers.sentence_transformer import evaluation

    if fmt == SCORED:
        return evaluation.EmbeddingSimilarityEvaluator(
            test["sentence1"], test["sentence2"], [float(s) for s in test["score"]],
            batch_size=batch_size, name=EVALUATOR_NAME, write_csv=False,
        )  # fmt: skip
    corpus: dict[str, str] = {}  # text -> id, every candidate of every split, in a fixed order
    for split in splits.values():
        for column in ("positive", "negative"):
            if column in split.column_names:
                for text in split[column]:
                    corpus.setdefault(text, f"d{len(corpus)}")
    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for anchor, positive in zip(test["anchor"], test["positive"]):
        qid = queries.setdefault(anchor, f"q{len(queries)}")
        relevant.setdefault(qid, set()).add(corpus[positive])
    return evaluation.InformationRetrievalEvaluator(
        {qid: text for text, qid in queries.items()}, {cid: text for text, cid in corpus.items()}, relevant,
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[1, 10], map_at_k=[10],
        batch_size=batch_size, name=EVALUATOR_NAME, write_csv=False,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- the model wrapper
def _transformer_module(backbone, path: str, max_seq_length: int | None):
    """sentence-transformers' own ``Transformer`` module (tokenizer from ``path``, its modality and forward logic)
    around ``backbone``, the model alignkit's loader built, instead of a second copy loaded from ``path``.

    The constructor is sentence-transformers' (``Transformer.__init__``); only its ``_load_model`` step is replaced,
    through a throw-away subclass that the object leaves right after construction, so what is trained and saved is a
    plain ``Transformer`` (modules.json then names sentence-transformers' class, which any install loads)."""
    from sentence_transformers.base.modules.transformer import Transformer

    class _Preloaded(Transformer):
        def _load_model(self, *args, **kwargs):
            return backbone

    module = _Preloaded(path, max_seq_length=max_seq_length)
    module.__class__ = Transformer
    return module


def st_folder(source) -> str:
    """The folder whose sentence-transformers config (modules, pooling) and tokenizer a run starts from: an earlier
    embed stage's adapter output, else the base model's folder."""
    for folder in (source.adapter_dir, source.base):
        if folder and (Path(folder) / "modules.json").is_file():
            return str(folder)
    return str(source.base)


def st_config(path: str | Path) -> dict:
    """The sentence-transformers files of a model folder: modules.json (the module list), sentence_bert_config.json
    (max_seq_length, do_lower_case), config_sentence_transformers.json (similarity_fn_name, prompts); {} if none."""
    path = Path(path)
    read = {}
    for key, name in (("modules", "modules.json"), ("sentence_bert", "sentence_bert_config.json"),
                      ("model", "config_sentence_transformers.json")):  # fmt: skip
        if (path / name).is_file():
            read[key] = json.loads((path / name).read_text())
    return read


def _after_transformer(path: Path, modules: list[dict], dim: int) -> tuple[list, str]:
    """The modules after the Transformer (pooling, normalisation, dense...) as the model folder lists them, each
    loaded by its sentence-transformers class; without a modules.json, mean pooling. Returns (modules, description)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    if not modules:
        return [Pooling(dim, pooling_mode="mean")], "mean pooling (the model has no sentence-transformers config)"
    loaded, names = [], []
    for entry in sorted(modules, key=lambda e: e["idx"])[1:]:
        module_name, _, class_name = entry["type"].rpartition(".")
        if not module_name.startswith("sentence_transformers."):
            raise ConfigError(
                f"{path}/modules.json: module {entry['type']} is not sentence-transformers' own, and alignkit runs no "
                "code a model folder names. Fix: use a model whose modules are sentence-transformers' (Pooling, "
                "Normalize, Dense), or remove modules.json to train with mean pooling."
            )
        cls = getattr(importlib.import_module(module_name), class_name)
        loaded.append(cls.load(str(path), subfolder=entry["path"]))
        config = getattr(loaded[-1], "get_config_dict", dict)()
        mode = next((k.replace("pooling_mode_", "") for k, v in config.items() if k.startswith("pooling_mode_") and v),
                    config.get("pooling_mode"))  # fmt: skip
        names.append(f"{class_name}({mode})" if mode else class_name)
    return loaded, " -> ".join(names) + " (the model's sentence-transformers config)"


def sentence_transformer(backbone, path: str | Path, max_seq_length: int | None = None):
    """A ``SentenceTransformer`` whose first module runs ``backbone`` (a transformers ``AutoModel``, or a PEFT model
    around one; full precision or 4-bit), with the tokenizer, pooling and normalisation the model folder ``path``
    gives in its sentence-transformers config (modules.json, 1_Pooling/config.json, ...), else mean pooling.

    ``max_seq_length``: tokens per text (longer texts are truncated); None: the folder's sentence_bert_config.json,
    else the tokenizer's limit. ``model.alignkit_pooling`` describes the modules after the Transformer (the card
    states it). Encoding: ``model.encode(texts) -> [len(texts), dim]`` float32 embeddings."""
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    config = st_config(path)
    if max_seq_length is None:
        max_seq_length = config.get("sentence_bert", {}).get("max_seq_length")
    first = _transformer_module(backbone, str(path), max_seq_length)
    rest, pooling = _after_transformer(path, config.get("modules", []), first.get_embedding_dimension())
    similarity = config.get("model", {}).get("similarity_fn_name") or "cosine"
    model = SentenceTransformer(
        modules=[first, *rest], device=str(next(backbone.parameters()).device), similarity_fn_name=similarity
    )
    model.alignkit_pooling = pooling
    # sentence-transformers' card asks the Hub whether the base model exists; alignkit writes its own card, offline
    model.model_card_data.local_files_only = True
    return model

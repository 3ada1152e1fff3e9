"""What the golden trajectories stand on must be the same on every machine and in every process: the tiny models'
tokenizers (built on first use, on each machine) and the defaults whose effect is random (dropout)."""

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.regression

# sha256 of each tiny tokenizer's vocabulary (token -> id, sorted). tiny:bert's was trained by tokenizers' WordPiece
# trainer before TINY_VERSION 2, which numbered the '##' pieces in hash-map order: every process built another one.
VOCAB_SHA256 = {
    "llama": "61693fdf66a832e990f7f1fb94058a407409a50e8bca37f8ec1875d1fdbd175c",
    "bert": "a2822cbbdadf338e499a4257b33c5a153df7376e328d22e4600b72f66a804384",
    "bart": "369e226603ccfb2d7eb24c543e58df72e91641617c571e227a81e4ef3995e80e",
}
_PRINT_VOCABS = """
import hashlib, json
from alignkit.testing.tiny import tiny_tokenizer
for kind in ("llama", "bert", "bart"):
    vocab = json.dumps(sorted(tiny_tokenizer(kind).get_vocab().items())).encode()
    print(kind, hashlib.sha256(vocab).hexdigest())
"""


def test_tiny_tokenizers_are_the_same_in_every_process():
    """Two fresh processes (each with its own hash seeds) build the same vocabularies, and the ones pinned here."""
    runs = []
    for _ in range(2):
        out = subprocess.check_output([sys.executable, "-c", _PRINT_VOCABS], text=True)
        runs.append(
            dict(line.split() for line in out.splitlines() if line.split()[:1] in (["llama"], ["bert"], ["bart"]))
        )
    assert runs[0] == runs[1], f"the tiny tokenizers differ between two builds: {runs}"
    assert runs[0] == VOCAB_SHA256, (
        f"the tiny tokenizers are not the pinned ones: {runs[0]}. A tokenizers upgrade that changes them changes every "
        "golden trajectory: bump TINY_VERSION in alignkit/testing/tiny.py, update VOCAB_SHA256 and regenerate golden.json."
    )


def test_dropout_defaults_reach_the_model():
    """The dropout defaults, checked without drawing a mask (the golden trajectories use them too, but a mask's
    random stream must not be what protects them): LoRA dropout 0.05 on every adapted layer, and the task heads keep
    the backbone's own dropout (tiny:bert: hidden and attention 0.1)."""
    from alignkit.config import AdapterArguments, ModelArguments
    from alignkit.models.loader import load_model

    model = load_model(ModelArguments(model_name_or_path="tiny:llama"), None, AdapterArguments())
    rates = {m.p for name, m in model.named_modules() if "lora_dropout" in name and hasattr(m, "p")}
    assert rates == {0.05}, f"LoRA dropout: {rates}"
    head = load_model(ModelArguments(model_name_or_path="tiny:bert"), None, AdapterArguments(), "seq_cls", num_labels=3)
    config = head.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.1)
    assert {m.p for m in head.modules() if isinstance(m, torch.nn.Dropout) and m.p != 0.05} == {0.1}

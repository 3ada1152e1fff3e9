"""Tiny random models (2 layers, hidden 64) with tokenizers trained offline on a built-in corpus.

``tiny:llama``, ``tiny:gemma3``, ``tiny:bert`` and ``tiny:bart`` in a recipe's ``model_name_or_path`` resolve here (a model-source
plug-in: ``[project.entry-points."alignkit.model_sources"]`` in pyproject.toml; the library never imports this
package). They are built
deterministically (fixed seed, fixed corpus) into ``$ALIGNKIT_CACHE/tiny/<kind>-v<N>`` on first use, so tests,
smoke recipes and regression trajectories never touch the network.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from alignkit.models.packaged import cache_dir

TINY_VERSION = 2  # 2: the BERT vocabulary is written out (v1's trained one differed per build)
TINY_KINDS = ("llama", "llama_base", "gemma3", "bert", "bart")

_WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are or not have has had which "
    "model data train test loss token text user assistant system answer question context paris london berlin "
    "alice bob carol dave emma frank grace henry works lives visited city company google acme river mountain "
    "good bad great terrible happy sad love hate movie film book story red green blue cat dog bird sum plus "
    "minus equals what who where when how why yes no one two three four five six seven eight nine ten"
).split()


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            words += [f"{a}", "+", f"{b}", "=", f"{a + b}", "ANSWER:", f"{a + b}"]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


def tiny_model_path(kind: str) -> Path:
    """Path of the built tiny model of ``kind``; builds it on first use."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model 'tiny:{kind}'. Fix: use one of {['tiny:' + k for k in TINY_KINDS]}.")
    target = cache_dir() / "tiny" / f"{kind}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    try:
        _build_in_clean_process(kind, tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a broken copy (an older alignkit built one under ZeRO-3)
        try:
            tmp.rename(target)  # atomic: concurrent ranks either win or find a complete copy
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_in_clean_process(kind: str, out_dir: Path) -> None:
    """Build in a fresh interpreter without the launcher's environment: a rank of a DeepSpeed ZeRO-3 launch would
    otherwise construct (and save) the model partitioned, and the caller's RNG and thread settings must not matter."""
    import subprocess
    import sys

    from alignkit.runtime import clean_env

    done = subprocess.run(
        [sys.executable, "-c", f"from alignkit.testing.tiny import build_tiny; build_tiny({kind!r}, {str(out_dir)!r})"],
        env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0 or not (out_dir / "config.json").is_file() or not (out_dir / "model.safetensors").is_file():
        raise RuntimeError(f"building tiny:{kind} failed:\n{done.stderr[-3000:]}")


def _bpe_tokenizer(special: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _llama_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from alignkit.data.templates import CHATML

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(special),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|endoftext|>"],
    )
    tok.chat_template = CHATML
    tok.model_max_length = 512
    return tok


def _base_llama_tokenizer():
    """A base (not instruction-tuned) Llama-2-style tokenizer: SentencePiece-style BPE (the '\u2581' word marker),
    <s>/</s>/<unk> only, <s> prepended, no pad and no chat template: none of ChatML's tokens."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = sorted(set(string.printable) - set(string.whitespace)) + ["\u2581", "\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.model_max_length = 512
    return tok


def _gemma3_tokenizer():
    """A base Gemma 3 tokenizer in miniature: Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2, <unk>,
    <start_of_turn>, <end_of_turn>), <bos> prepended, no chat template (google/gemma-3-270m ships none)."""
    from tokenizers import processors

    from alignkit.testing.families import family_tokenizer

    tok = family_tokenizer("gemma3", with_template=False)
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    tok.model_max_length = 512
    return tok


def _bart_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    from tokenizers import processors

    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>")), ("</s>", tok.convert_tokens_to_ids("</s>"))],
    )
    tok.model_max_length = 256
    return tok


def _bert_vocab() -> list[str]:
    """The tiny BERT's WordPiece vocabulary, written out rather than trained: tokenizers' WordPiece trainer numbers the
    '##' continuation pieces in the order it meets them while iterating a hash map, which differs from one process
    to the next, so every fresh build gave the same text other ids (and golden trajectories another model). Fixed
    here: the special tokens, every printable ASCII character, its '##' continuation for letters and digits, the
    corpus's words of up to 6 letters, and each longer word as two pieces (its first 4 letters and the '##' rest), so
    that sub-word label alignment is exercised; other words split into letters."""
    import string

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuations = ["##" + c for c in string.ascii_lowercase + string.digits]
    words = sorted({w for w in _WORDS if len(w) <= 6 and w not in chars})
    pieces = sorted({p for w in _WORDS if len(w) > 6 for p in (w[:4], "##" + w[4:])} - set(words))
    return special + chars + continuations + words + pieces


def _bert_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_bert_vocab())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.model_max_length = 512
    return fast


def tiny_tokenizer(kind: str):
    """The tokenizer of tiny model ``kind``, built (deterministically) without the model."""
    builders = {
        "llama": _llama_tokenizer, "llama_base": _base_llama_tokenizer, "gemma3": _gemma3_tokenizer,
        "bert": _bert_tokenizer, "bart": _bart_tokenizer,
    }  # fmt: skip
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {TINY_KINDS}")
    return builders[kind]()


GEMMA3_WINDOW = 8  # tiny:gemma3's sliding window (google/gemma-3-270m: 512), in tokens


def gemma3_model(tok=None):
    """Gemma 3's layout in miniature: 3 layers, the first two sliding-window (8 tokens) and the last full attention
    (the real 270M: 15 of 18 sliding, window 512), 1 KV head, head_dim 16, tied embeddings, query_pre_attn_scalar.
    ``tok``: the tokenizer whose vocabulary the embedding gets (default tiny:gemma3's; the GGUF export test gives a
    released model's, which llama.cpp's converter recognises). Returns (model, tokenizer), random weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tok if tok is not None else _gemma3_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=GEMMA3_WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Gemma3ForCausalLM(config), tok


def build_tiny(kind: str, out_dir: str | Path) -> Path:
    """Build a tiny random model + tokenizer of ``kind`` into ``out_dir`` (safetensors)."""
    import torch
    from transformers import AutoModel, BartConfig, BertConfig, LlamaConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if kind in ("llama", "llama_base"):
        tok = _llama_tokenizer() if kind == "llama" else _base_llama_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    elif kind == "gemma3":
        model, tok = gemma3_model()
    elif kind == "bert":
        tok = _bert_tokenizer()
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
        )
        from transformers import BertForMaskedLM

        model = BertForMaskedLM(config)
    elif kind == "bart":
        tok = _bart_tokenizer()
        config = BartConfig(
            vocab_size=len(tok),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
        )
        from transformers import BartForConditionalGeneration

        model = BartForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {TINY_KINDS}")
    del AutoModel
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    import sys

    for k in sys.argv[1:] or TINY_KINDS:
        print(k, tiny_model_path(k))


def tiny_llama_with_smollm2_tokenizer(out_dir: str | Path, max_position_embeddings: int = 512) -> Path:
    """A tiny random Llama body (2 layers, hidden 64) with the embedded SmolLM2's tokenizer, saved to ``out_dir``:
    for what needs a released model's tokenizer (llama.cpp's converter recognises SmolLM2's pre-tokenizer, not the
    synthetic tiny ones; the Qwen2.5 tool preamble needs more than their 512 positions). Seeded, so the same body
    every call. Needs ``alignkit fetch smollm2:SmolLM2-135M-Instruct`` (scripts/install.sh does it); never downloads."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignkit.models.packaged import packaged_path

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(packaged_path("smollm2:SmolLM2-135M-Instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

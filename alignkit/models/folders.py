"""Check a folder before anything loads from it: one checker per kind of folder (a model, an adapter run, and, in
alignkit.train.checkpoint_files, a checkpoint), each built from per-file checks that read only headers and
structure (safetensors header and data extent, JSON parse, a torch zip archive's directory and CRCs). A damaged or
missing file is one PreflightError naming the file and what to do, instead of a library's traceback (a
``SafetensorError: incomplete metadata``, a ``JSONDecodeError``, a tokenizer asking for sentencepiece).

Bytes changed inside a tensor's data keep its header and size valid, so the per-file checks do not find them; a
checkpoint's manifest (``alignkit_checkpoint.json``) records each file's sha256 as well as its size, and
:func:`check_manifest` compares both, so there they are found too.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

from alignkit.errors import PreflightError

# the JSON files a model or adapter folder may hold, checked when present
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", "adapter_config.json", "alignkit_run.json", "trainer_state.json",
              "model.safetensors.index.json", "modules.json")  # fmt: skip


# written into every checkpoint-N once its save finished (alignkit.train.callbacks.AtomicCheckpoints)
CHECKPOINT_MANIFEST = "alignkit_checkpoint.json"
_CHUNK = 1 << 20
# what only a resume reads from a checkpoint (a load of its weights does not)
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The manifest's own checksum: sha256 of its other keys as canonical JSON (stored under ``self_sha256``)."""
    rest = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def check_manifest(folder: Path, fix: str, skip: tuple[str, ...] = ()) -> dict:
    """A folder against its ``alignkit_checkpoint.json``: the manifest parses and matches its own checksum, and every
    file it lists is there with the size and sha256 it lists (a manifest written before hashes were recorded: sizes
    only), each also readable as its kind (:func:`check_file`). ``skip``: file names not checked (what a load does
    not read). Returns the manifest; PreflightError naming the first damaged file."""
    path = folder / CHECKPOINT_MANIFEST
    manifest = check_json(path, fix)
    listed, hashes = manifest.get("files"), manifest.get("sha256", {})
    if not isinstance(listed, dict) or not isinstance(hashes, dict):
        raise damaged(path, "damaged: it lists no files", fix)
    if "self_sha256" in manifest and manifest["self_sha256"] != manifest_digest(manifest):
        raise damaged(path, "damaged: its content does not match its own checksum", fix)
    for name, size in listed.items():
        if name in skip:
            continue
        file = folder / name
        if not file.is_file():
            raise damaged(file, "missing from the checkpoint (its manifest lists it)", fix)
        actual = file.stat().st_size
        if actual != size:
            raise damaged(file, f"damaged: {actual} bytes, but the checkpoint was saved with {size}", fix)
        check_file(file, fix)
        if name in hashes and file_sha256(file) != hashes[name]:
            raise damaged(file, "damaged: its bytes changed since the save (sha256 differs from the manifest's)", fix)
    return manifest


def damaged(path: Path, problem: str, fix: str) -> PreflightError:
    return PreflightError(f"{path}: {problem}. Fix: {fix}")


# JSON files whose top level is a list, not an object (sentence-transformers' module list)
JSON_LISTS = ("modules.json",)


def check_json(path: Path, fix: str) -> dict | list:
    """The parsed JSON in ``path``: an object (a list for the files in ``JSON_LISTS``); PreflightError if it is
    unreadable or of the other kind."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise damaged(path, f"damaged: not readable JSON ({str(exc)[:80]})", fix) from None
    want = list if path.name in JSON_LISTS else dict
    if not isinstance(data, want):
        raise damaged(path, f"damaged: not a JSON {'list' if want is list else 'object'}", fix)
    return data


def check_safetensors(path: Path, fix: str) -> dict:
    """The header of a safetensors file, after checking that it parses and that the tensors' data fills the file
    exactly (a truncated or padded file fails)."""
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise damaged(path, f"damaged: {size} bytes, shorter than a safetensors header", fix)
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise damaged(path, f"damaged: its header claims {n} bytes but the file has {size}", fix)
            header = json.loads(f.read(n))
    except OSError as exc:
        raise damaged(path, f"not readable ({exc.strerror})", fix) from None
    except (ValueError, UnicodeDecodeError):
        raise damaged(path, "damaged: its safetensors header is not readable", fix) from None
    if not isinstance(header, dict):
        raise damaged(path, "damaged: its safetensors header is not readable", fix)
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise damaged(path, "damaged: its safetensors header is not readable", fix) from None
    if 8 + n + end != size:
        raise damaged(path, f"damaged: {size} bytes, but its tensors need {8 + n + end} (truncated or cut short)", fix)
    return header


def check_torch_archive(path: Path, fix: str) -> None:
    """A ``torch.save`` file (optimizer.pt, scheduler.pt, rng_state.pth): a zip archive whose entries' CRCs match."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError) as exc:
        raise damaged(path, f"damaged: not a readable torch file ({str(exc)[:80]})", fix) from None
    if bad is not None:
        raise damaged(path, f"damaged: its entry {bad} fails its checksum", fix)


def check_file(path: Path, fix: str) -> None:
    """The check that fits ``path``'s kind (by name); other files only have to be readable."""
    name = path.name
    if name.endswith(".safetensors"):
        check_safetensors(path, fix)
    elif name.endswith(".json") or name in JSON_FILES:
        check_json(path, fix)
    elif name.endswith((".pt", ".pth", ".bin")):
        check_torch_archive(path, fix)


def _check_present(folder: Path, fix: str) -> None:
    for name in JSON_FILES:
        if (folder / name).is_file():
            check_json(folder / name, fix)


def _check_saved_checkpoint(folder: Path) -> None:
    """A checkpoint-N loaded as a model or adapter: the files a load reads against the sizes and sha256 its manifest
    recorded (optimizer, scheduler and RNG state are a resume's to check)."""
    if (folder / CHECKPOINT_MANIFEST).is_file():
        check_manifest(folder, "load another checkpoint of the run, or its output_dir", skip=TRAINING_STATE)


def check_model_folder(folder: str | Path, fix: str | None = None) -> Path:
    """A transformers model folder (a merged model, a full fine-tune): its files present (ConfigError from
    :func:`alignkit.models.sources.check_model_folder`), then config.json and the other JSON files parseable and its
    weights (one model.safetensors or the shards its index names) readable. Returns the folder."""
    folder = Path(folder)
    fix = fix or f"write {folder} again (rerun the merge or the run that made it)"
    if not folder.is_dir():
        raise PreflightError(f"{folder}: not a folder. Fix: give a run's output_dir or a model folder.")
    from alignkit.models.sources import check_model_folder as check_complete

    check_complete(folder, what="model", tokenizer=False)  # every file there (the one owner of that check)
    _check_saved_checkpoint(folder)
    _check_present(folder, fix)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(check_json(index, fix).get("weight_map", {}).values()))
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        if not (folder / shard).is_file():
            pickles = sorted(f.name for f in folder.iterdir() if f.name.endswith((".bin", ".pt", ".pth", ".ckpt")))
            if pickles and not any(f.name.endswith(".safetensors") for f in folder.iterdir()):
                raise PreflightError(
                    f"{folder}: holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded, "
                    "so alignkit does not load them. Fix: convert them to safetensors (load the model with "
                    "transformers and save_pretrained it: safetensors is the default)."
                )
            raise damaged(folder / shard, "missing (a half-written model folder)", fix)
        check_safetensors(folder / shard, fix)
    return folder


def check_adapter_folder(folder: str | Path, fix: str | None = None) -> Path:
    """A PEFT adapter folder (an alignkit adapter run): adapter_config.json and adapter_model.safetensors, readable,
    and the run record and tokenizer files when present. Returns the folder."""
    folder = Path(folder)
    fix = fix or f"resume the run that wrote {folder} from its last checkpoint, or train it again"
    _check_saved_checkpoint(folder)
    _check_present(folder, fix)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise damaged(weights, "missing, so the adapter cannot load", fix)
    check_safetensors(weights, fix)
    return folder


def check_trained_folder(path: str | Path) -> None:
    """Whatever ``load_trained``/merge/export read from a local folder: an adapter run or a model folder. A name that
    is not a local folder (a Hub id, a ``tiny:`` name) is left to the loader."""
    folder = Path(path)
    if not folder.is_dir():
        return
    if (folder / "adapter_config.json").is_file():
        check_adapter_folder(folder)
    else:
        check_model_folder(folder)

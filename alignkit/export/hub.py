"""Push adapter and merged outputs to the Hugging Face Hub (huggingface_hub's HfApi), with an exact file list.

``preflight_push`` runs before any work (training or merging): it finds the token, checks that the Hub accepts it,
creates the repo if needed and checks write access, so a run never trains for hours and then fails to push.
The token is never printed, logged or written; error messages that could quote it are scrubbed.
"""

from __future__ import annotations

import contextlib
import fnmatch
from pathlib import Path

from alignkit.errors import PreflightError
from alignkit.hub import hub_unreachable
from alignkit.models.folders import check_file

# What a pushed repo holds: card, weights, configs, tokenizer, chat template, alignkit's metadata and curves.
# Everything else stays local: checkpoints, pickled training_args.bin, merged_base/, a DPO reference adapter folder.
PUSH_PATTERNS = (
    "README.md", "*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
    "alignkit_run.json", "alignkit_config.yaml", "trainer_state.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",  # a SentenceTransformer folder
)  # fmt: skip
_TEXT_SUFFIXES = (".json", ".yaml", ".md", ".jinja", ".txt")


def _token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PreflightError(
            "push_to_hub: no Hugging Face token found. Fix: run `hf auth login`, or set the HF_TOKEN environment "
            "variable to a token with write access, or set push_to_hub: false."
        )
    return token


def _scrub(exc: Exception, token: str) -> str:
    return f"{type(exc).__name__}: {str(exc).replace(token, '***')}".strip()


def preflight_push(hub_model_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Check token and repo access before any work; create the repo if missing. Returns the full repo id."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    token = _token(token)
    hub_unreachable()  # an unreachable Hub turns the process offline: whoami then fails at once, not after retries
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except Exception as exc:
        detail = f"offline: {hub_unreachable()}" if isinstance(exc, OfflineModeIsEnabled) else _scrub(exc, token)
        raise PreflightError(
            f"push_to_hub: the Hub did not accept the token or could not be reached ({detail}). Fix: check "
            "network access and HF_HUB_OFFLINE, and that the token (`hf auth whoami`) is valid."
        ) from None
    repo_id = hub_model_id if "/" in hub_model_id else f"{user['name']}/{hub_model_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.auth_check(repo_id, write=True)
    except Exception as exc:
        raise PreflightError(
            f"push_to_hub: no write access to {repo_id} as {user['name']} ({_scrub(exc, token)}). Fix: use a token with "
            "write permission for that namespace, or change hub_model_id."
        ) from None
    return repo_id


def files_to_push(folder: str | Path) -> list[str]:
    """The exact top-level files of ``folder`` a push uploads; fails when the card, weights or config are missing."""
    folder = Path(folder)
    names = sorted(
        p.name for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in PUSH_PATTERNS)
    )
    names += _sentence_transformer_modules(folder)
    missing = [
        what
        for what, ok in (
            ("README.md (model card)", "README.md" in names),
            ("*.safetensors weights", any(n.endswith(".safetensors") for n in names)),
            ("config.json or adapter_config.json", "config.json" in names or "adapter_config.json" in names),
        )
        if not ok
    ]
    if missing:
        raise PreflightError(
            f"{folder}: nothing fit to push, missing {', '.join(missing)}. Fix: push a finished run or merged output."
        )
    return names


def _sentence_transformer_modules(folder: Path) -> list[str]:
    """The config files of the modules a SentenceTransformer folder's modules.json lists in subfolders (pooling,
    normalisation, dense): ``1_Pooling/config.json``, ..."""
    import json

    if not (folder / "modules.json").is_file():
        return []
    files = []
    for entry in json.loads((folder / "modules.json").read_text()):
        sub = folder / entry.get("path", "")
        if entry.get("path") and sub.is_dir():
            files += sorted(f"{entry['path']}/{p.name}" for p in sub.iterdir() if p.is_file() and p.suffix in
                            (".json", ".safetensors"))  # fmt: skip
    return files


# alignkit's and transformers' metadata: the files that record local paths (run folders, data files, the base model
# folder, the best checkpoint). Tokenizer files are never rewritten: a vocabulary may hold '/usr'-like tokens.
PORTABLE_FILES = (
    "README.md", "alignkit_run.json", "alignkit_config.yaml", "trainer_state.json", "adapter_config.json",
    "config.json", "generation_config.json",
)  # fmt: skip


@contextlib.contextmanager
def staged_for_push(folder: Path, files: list[str]):
    """A temporary folder holding what a push uploads: alignkit's and transformers' metadata files
    (:data:`PORTABLE_FILES`) with every absolute local path made portable (JSON: string values, by
    :func:`alignkit.export.portable.portable_text`; card and YAML: the text), everything else as links to the
    originals (no copy of the weights)."""
    import json
    import tempfile

    from alignkit.export.portable import portable_json, portable_text

    with tempfile.TemporaryDirectory(prefix="alignkit-push-") as tmp:
        staged = Path(tmp)
        for name in files:
            source = folder / name
            if name in PORTABLE_FILES and name.endswith(".json"):
                data = portable_json(json.loads(source.read_text(encoding="utf-8")))
                (staged / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            elif name in PORTABLE_FILES:
                (staged / name).write_text(portable_text(source.read_text(encoding="utf-8")), encoding="utf-8")
            else:
                (staged / name).parent.mkdir(parents=True, exist_ok=True)  # a module's subfolder (1_Pooling/)
                (staged / name).symlink_to(source.resolve())
        yield staged


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> list[str]:
    """Upload exactly :func:`files_to_push` of ``folder`` to ``repo_id`` (created if missing). Returns the file names."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    token = _token(token)
    files = files_to_push(folder)
    for name in files:  # a damaged file is named here, not uploaded
        check_file(folder / name, f"write {folder} again before pushing it")
    for name in files:  # defence in depth: a token pasted into a recipe or card must not leave this machine
        if name.endswith(_TEXT_SUFFIXES) and token in (folder / name).read_text(errors="ignore"):
            raise PreflightError(f"{folder / name}: contains the Hugging Face token; refusing to push. Fix: remove it.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with staged_for_push(folder, files) as staged:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staged),
            allow_patterns=files,
            commit_message=commit_message or f"alignkit: upload {folder.name}",
        )
    print(f"pushed {len(files)} files from {folder} to https://huggingface.co/{repo_id}")
    return files

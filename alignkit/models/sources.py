"""Where a model comes from: one table of source schemes, tried in order, each turning ``model_name_or_path`` into a
:class:`ModelSource` (the directory the weights load from, plus the adapter hand-off and lineage of an earlier
alignkit stage).

| scheme | example | resolves to |
|---|---|---|
| plug-in | ``tiny:llama`` | a directory from a registered plug-in (entry point group ``alignkit.model_sources``; alignkit's tiny test models register ``tiny``) |
| packaged | ``smollm2:SmolLM2-135M-Instruct`` | a model inside a PyPI wheel (alignkit.models.packaged) |
| gguf | ``model.Q4_1.gguf`` | the file converted once to safetensors |
| adapter output | ``outputs/sft`` | the adapter's base, with the adapter to hand off and its lineage |
| run output | ``outputs/dpo-merged`` | a plain model written by alignkit, with its lineage |
| local dir | ``/models/llama`` | itself (with ``gguf_file``: that file, converted once) |
| unreachable hub id | ``foo/model`` offline | refused at once when neither cached nor reachable (:func:`check_hub_name`) |
| hub id | ``HuggingFaceTB/SmolLM2-135M-Instruct`` | itself (transformers downloads it, if the Hub is reachable; from the cache, offline, if not: :mod:`alignkit.hub`) |

A name that is evidently local (``./x``, ``~/x``, ``a/b/c``, or ``outputs/x`` where ``outputs`` is a folder here) and
does not exist is refused at once ("missing path"), never sent to the Hub.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from alignkit.config.args import ModelArguments
from alignkit.errors import ConfigError
from alignkit.hub import hub_unreachable
from alignkit.models import packaged
from alignkit.runs import LineageEntry, RunRecord

PLUGIN_GROUP = "alignkit.model_sources"


@dataclass
class ModelSource:
    """Where the weights really come from, after resolving plug-ins, packaged and GGUF models and alignkit outputs."""

    base: str
    adapter_dir: str | None = None  # an alignkit/PEFT adapter to hand off from
    parent_run: RunRecord | None = None  # the run record of that adapter's (or plain model's) run
    # adapters merged into the full-precision base right after loading, in order (see the 'reference' hand-off)
    fold_adapters: list[str] = field(default_factory=list)
    lineage: list[LineageEntry] = field(default_factory=list)


@dataclass(frozen=True)
class Scheme:
    name: str
    example: str
    matches: Callable[[str, ModelArguments], bool]
    resolve: Callable[[str, ModelArguments], ModelSource]


def _plugins() -> dict[str, Callable[[str], str | Path]]:
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def _is_plugin(name: str, _) -> bool:
    return ":" in name and name.split(":", 1)[0] in _plugins()


def _plugin(name: str, _) -> ModelSource:
    prefix, rest = name.split(":", 1)
    try:
        return ModelSource(base=str(_plugins()[prefix].load()(rest)))
    except ValueError as exc:
        raise ConfigError(f"model_name_or_path: {exc}") from exc


def _is_gguf(name: str, model_args: ModelArguments) -> bool:
    return name.endswith(".gguf") or bool(model_args.gguf_file and Path(name).is_dir())


def _gguf(name: str, model_args: ModelArguments) -> ModelSource:
    path = Path(name) / model_args.gguf_file if model_args.gguf_file and Path(name).is_dir() else Path(name)
    return ModelSource(base=str(packaged.converted_gguf(path)))


def _is_adapter_output(name: str, _) -> bool:
    return (Path(name) / "adapter_config.json").is_file()


def _adapter_output(name: str, model_args: ModelArguments) -> ModelSource:
    path = Path(name)
    adapter_cfg = json.loads((path / "adapter_config.json").read_text())
    parent = RunRecord.for_model(path)
    base_args = dataclasses.replace(model_args, model_name_or_path=adapter_cfg["base_model_name_or_path"])
    lineage = list(parent.lineage) if parent else []
    # A run that started from an earlier run's merged (or full) folder trained its adapter on that folder, which
    # adapter_config.json names; records written before alignkit recorded it named that folder's own base instead.
    from_run_folder = len(lineage) >= 2 and lineage[-1].from_adapter is None
    if parent and parent.base_model_args.model_name_or_path and not from_run_folder:
        base_args.model_name_or_path = parent.base_model_args.model_name_or_path  # as the run named it (GGUF, tiny:)
        base_args.gguf_file = parent.base_model_args.gguf_file
    base = resolve_source(base_args)
    fold = list(base.fold_adapters)
    if lineage and lineage[-1].adapter_handoff == "reference":  # this adapter sits on top of its parent's
        under = resolve_source(dataclasses.replace(model_args, model_name_or_path=lineage[-1].from_adapter))
        fold = [*under.fold_adapters, under.adapter_dir]
    return ModelSource(base=base.base, adapter_dir=str(path), parent_run=parent, lineage=lineage, fold_adapters=fold)


def _run_output(name: str, _) -> ModelSource:
    parent = RunRecord.for_model(
        name
    )  # a merged/full alignkit output (or its checkpoint): a plain model with a lineage
    if not parent.usable:
        raise ConfigError(
            f"model_name_or_path: {name} holds a {parent.stage} run that did not finish (status: {parent.status}), so "
            "there is no model to start from. Fix: finish or rerun that stage, or resume it (resume_from_checkpoint: "
            "true), or start from one of its checkpoint-N folders."
        )
    check_model_folder(name, tokenizer=False)  # finished, but the copy may be incomplete
    return ModelSource(base=name, parent_run=parent, lineage=list(parent.lineage))


def _is_plain_file(name: str, model_args: ModelArguments) -> bool:
    return Path(name).is_file() and not name.endswith(".gguf")


def _plain_file(name: str, _) -> ModelSource:
    raise ConfigError(
        f"model_name_or_path: '{name}' is a file, not a model. Fix: point it at a model folder (with config.json), a "
        ".gguf file, an earlier stage's output_dir, a Hub id or a built-in name such as tiny:llama."
    )


def _local_root(name: str) -> str | None:
    """Why ``name`` is evidently a local path, not a Hub id: it starts with ./ ../ / or ~, has more parts than a Hub
    id's 'namespace/name', or its first part is a folder here (``outputs/`` in ``outputs/sft``). None otherwise."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return "it is a path"
    first = name.split("/", 1)[0]
    if "/" in name and Path(first).is_dir():
        return f"'{first}' is a folder here"
    return None


def _is_missing_path(name: str, _) -> bool:
    # said at once, with no network call: transformers would take it for a Hub id and retry the Hub for ~30 s
    return not Path(name).expanduser().exists() and _local_root(name) is not None


def missing_path_error(name: str, key: str = "model_name_or_path") -> ConfigError:
    """The ConfigError for a local-looking ``name`` that does not exist (see :func:`_local_root`)."""
    hub = ""
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        hub = (
            f" ('{name}' is read as a local path because {_local_root(name)}; for the Hub model of that name, run "
            "from a folder without it)"
        )
    return ConfigError(
        f"{key}: '{name}' does not exist. Fix: check the path, or point it at a model or an earlier stage's "
        "output_dir (run that stage first), a Hub id, or a built-in name such as tiny:llama or "
        f"smollm2:SmolLM2-135M-Instruct{hub}."
    )


def _missing(name: str, _) -> ModelSource:
    raise missing_path_error(name)


def _is_unknown_prefix(name: str, _) -> bool:
    prefix = name.split(":", 1)[0]
    return ":" in name and prefix.isidentifier() and not Path(name).exists()


def _unknown_prefix(name: str, _) -> ModelSource:
    known = sorted({*(p + ":" for p in _plugins()), *packaged.PREFIXES})
    raise ConfigError(
        f"model_name_or_path: '{name}' names no known model scheme. Fix: use one of the prefixes {known}, a local "
        "path or a Hub id."
    )


# What a model folder needs to load: its config, and safetensors weights (one file, or an index and its shards).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


def missing_model_files(folder: str | Path, tokenizer: bool = True, weights: bool = True) -> list[str]:
    """The files a model folder lacks to load (an interrupted download, a copy that stopped): ``config.json``, its
    weights (``model.safetensors``, or the shards its ``model.safetensors.index.json`` names), and with
    ``tokenizer`` a tokenizer file (one of :data:`TOKENIZER_FILES`); ``weights`` False: the config is enough
    (``from_scratch``). Empty when it has them all. Pickle weights
    (``pytorch_model.bin``) count as weights here; the loader decides whether they may load."""
    folder = Path(folder)
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    index = folder / "model.safetensors.index.json"
    if not weights:
        pass
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, OSError):
            shards = []
        missing += [f"{index.name} (unreadable)"] if not shards else [s for s in shards if not (folder / s).is_file()]
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model.safetensors (the weights)")
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES[:2])})")
    return missing


def check_model_folder(
    folder: str | Path, what: str = "model_name_or_path", tokenizer: bool = True, weights: bool = True
) -> None:
    """ConfigError, one line naming ``folder`` and the files it lacks (see :func:`missing_model_files`)."""
    missing = missing_model_files(folder, tokenizer, weights)
    if missing:
        state = "is empty" if Path(folder).is_dir() and not any(Path(folder).iterdir()) else "is incomplete"
        raise ConfigError(
            f"{what}: the model folder '{folder}' {state}: it lacks {', '.join(missing)} (an interrupted download "
            "or copy?). Fix: download or copy the model again into that folder, or point at a complete one."
        )


def is_cached_hub_model(name: str, revision: str | None = None) -> bool:
    """True when the Hub model ``name`` (at ``revision``) is in the local Hugging Face cache (its config.json, or
    a tokenizer's files, read offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(
            isinstance(try_to_load_from_cache(name, f, revision=revision), str)
            for f in ("config.json", "tokenizer_config.json")
        )
    except ValueError:  # not a valid repo id
        return False


def check_hub_name(name: str, key: str = "model_name_or_path", revision: str | None = None) -> None:
    """A name that is not a local path: a local-looking one that does not exist is refused at once
    (:func:`missing_path_error`); a Hub id neither cached nor reachable is refused at once, naming why the Hub cannot
    be reached. ConfigError; nothing is sent but one TCP connection attempt (none with ``HF_HUB_OFFLINE``)."""
    if Path(name).expanduser().exists():
        return
    if _local_root(name) is not None:
        raise missing_path_error(name, key)
    if not is_hub_id(name):
        return
    # asked for every Hub id, cached or not: an unreachable Hub turns the process offline (alignkit.hub), so a cached
    # one then loads from the cache at once instead of after huggingface_hub's retries
    if (why := hub_unreachable()) and not is_cached_hub_model(name, revision):
        raise ConfigError(
            f"{key}: '{name}' is not a folder here, so it would be a Hub id, and the Hub cannot be reached ({why}); it "
            "is not in the local Hugging Face cache either. Fix: check the name (a local folder? an earlier stage's "
            "output_dir?), or download it where the Hub is reachable (the cache, HF_HOME, is then used offline)."
        )


def _is_unreachable_hub_id(name: str, model_args: ModelArguments) -> bool:
    # every Hub id asks (see check_hub_name), so a cached one loads offline when the Hub does not answer
    return is_hub_id(name) and hub_unreachable() is not None and not is_cached_hub_model(name, model_args.revision)


def _unreachable_hub_id(name: str, model_args: ModelArguments) -> ModelSource:
    check_hub_name(name, revision=model_args.revision)
    return ModelSource(base=name)  # reached only if the Hub answered meanwhile


def _local_dir(name: str, model_args: ModelArguments) -> ModelSource:
    if Path(name).is_dir():  # a Hub id is not a folder here: transformers resolves it
        # (its tokenizer may come from elsewhere: an adapter's folder, tokenizer_name_or_path; load_tokenizer says)
        check_model_folder(name, tokenizer=False, weights=not model_args.from_scratch)
    return ModelSource(base=name)


SCHEMES: tuple[Scheme, ...] = (
    Scheme("plug-in", "tiny:llama", _is_plugin, _plugin),
    Scheme("packaged", "smollm2:SmolLM2-135M-Instruct", lambda n, _: packaged.is_packaged(n),
           lambda n, _: ModelSource(base=str(packaged.packaged_path(n)))),
    Scheme("unknown prefix", "nosuch:model", _is_unknown_prefix, _unknown_prefix),
    Scheme("missing path", "./no/such/dir", _is_missing_path, _missing),
    Scheme("plain file", "README.md", _is_plain_file, _plain_file),
    Scheme("gguf", "model.Q4_1.gguf", _is_gguf, _gguf),
    Scheme("adapter output", "outputs/sft", _is_adapter_output, _adapter_output),
    Scheme("run output", "outputs/dpo-merged", lambda n, _: RunRecord.for_model(n) is not None, _run_output),
    Scheme("unreachable hub id", "foo/model (offline)", _is_unreachable_hub_id, _unreachable_hub_id),
    Scheme("local dir or hub id", "HuggingFaceTB/SmolLM2-135M-Instruct", lambda n, _: True, _local_dir),
)  # fmt: skip


def resolve_source(model_args: ModelArguments) -> ModelSource:
    """The :class:`ModelSource` for ``model_args.model_name_or_path``: the first scheme of ``SCHEMES`` that matches.
    Raises ConfigError for a missing name, an unknown packaged or plug-in model and a path that does not exist."""
    name = model_args.model_name_or_path
    if not name:
        raise ConfigError(
            "model_name_or_path: required. Fix: set it to a model directory, Hub id, .gguf file or 'tiny:llama'."
        )
    scheme = next(s for s in SCHEMES if s.matches(name, model_args))
    return scheme.resolve(name, model_args)


def is_hub_id(name: str | None) -> bool:
    """A name the Hub would resolve ('namespace/name'), not a local path or one of alignkit's schemes."""
    return bool(name) and ":" not in name and name.count("/") == 1 and not Path(name).exists()

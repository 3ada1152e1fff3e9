"""What ships with alignkit for a first run without a checkout: the recipes, the accelerate configs, the SLURM script
and the sample data (package data of the wheel), ``alignkit recipes`` (list them), ``alignkit init <stage>`` (write a
commented recipe to edit) and ``alignkit <stage> --accelerate_config NAME --num_processes N`` (launch the stage
under accelerate with a shipped config).

In a clone the files are read where they live (``recipes/``, ``accelerate_configs/``, ``scripts/slurm/``); in an
installed wheel, from ``alignkit/recipes``, ``alignkit/accelerate_configs`` and ``alignkit/slurm`` (pyproject.toml's
package-dir). Nothing here imports torch or trl.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from alignkit.config.keyref import load_reference
from alignkit.errors import ConfigError, deepspeed_missing, suggest

PACKAGE = Path(__file__).resolve().parent
CLONE = PACKAGE.parent
# The template of `alignkit init <stage>`: the stage's tiny recipe (a seconds-long smoke run on CPU).
TEMPLATES = {"task": "tiny/task_cls.yaml"}
LAUNCH_FLAGS = ("accelerate_config", "num_processes")
# Keys that name an earlier run: the tiny recipes' ``outputs/tiny/<stage>`` becomes ``outputs/<stage>``, the
# output_dir of the recipe `alignkit init <stage>` writes (its default --out).
STARTS_FROM = ("model_name_or_path", "teacher_model_name_or_path")


def shipped(kind: str) -> Path:
    """The folder of shipped ``recipes``, ``accelerate_configs`` or ``slurm`` files: the clone's when alignkit runs
    from one, else the installed package's."""
    clone = {"recipes": CLONE / "recipes", "accelerate_configs": CLONE / "accelerate_configs",
             "slurm": CLONE / "scripts" / "slurm"}[kind]  # fmt: skip
    if (CLONE / "pyproject.toml").is_file() and clone.is_dir():
        return clone
    return PACKAGE / kind


def _shipped_path(folder: Path, path: str, prefix: str) -> Path:
    """A path the shipped files give relative to the clone's root (``recipes/tiny/data/sft.jsonl``), in ``folder``."""
    parts = Path(path).parts
    return folder.joinpath(*(parts[1:] if parts and parts[0] == prefix else parts))


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#!"):
            continue
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def list_recipes() -> str:
    """``alignkit recipes``: every shipped recipe, accelerate config and SLURM script, with its first comment line."""
    recipes, configs = shipped("recipes"), shipped("accelerate_configs")
    lines = [f"recipes ({recipes}; `alignkit init <stage>` writes an editable copy):"]
    for path in sorted(recipes.glob("*/*.yaml")):
        lines.append(f"  {path.relative_to(recipes).as_posix():<28} {_summary(path)[:88]}")
    lines += ["", f"accelerate configs ({configs}; alignkit <stage> --accelerate_config NAME --num_processes N):"]
    for path in sorted(configs.glob("*.yaml")):
        lines.append(f"  {path.stem:<28} {_summary(path)[:88]}")
    lines += ["", f"SLURM ({shipped('slurm')}):"]
    lines += [f"  {p.name:<28} {_summary(p)[:88]}" for p in sorted(shipped("slurm").glob("*.sbatch"))]
    return "\n".join(lines) + "\n"


def _help_comment(help_text: str, width: int = 72) -> str:
    """The help's first clause (up to the first ``.`` or ``;`` that ends a clause outside brackets: a
    ``(QA: per window)`` or ``e.g.`` does not cut it), shortened to ``width`` characters with ``...``."""
    depth, end = 0, len(help_text)
    for i, char in enumerate(help_text):
        depth += (char in "([{") - (char in ")]}")
        if (depth == 0 and char in ".;" and help_text[i + 1 : i + 2] in ("", " ")
                and not re.search(r"\b(e\.g|i\.e|etc|vs)$", help_text[:i])):  # fmt: skip
            end = i
            break
    first = help_text[:end].rstrip()
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


def write_recipe(stage: str, out: str | Path, model: str | None = None, data: str | None = None,
                 force: bool = False) -> list[Path]:  # fmt: skip
    """Write a commented recipe for ``stage`` to ``out`` (default ``<stage>.yaml``) from the stage's shipped tiny
    recipe: ``model`` replaces its model, ``data`` (a file) its data; without ``data`` the shipped sample data is
    copied to ``data/`` beside the recipe. Every key gets its help as a comment. Returns the files written; a file
    already there is refused (ConfigError) unless ``force``."""
    reference = load_reference()
    if stage not in reference:
        raise ConfigError(
            f"alignkit init: unknown stage '{stage}'.{suggest(stage, reference)} Fix: one of {list(reference)}."
        )
    recipes = shipped("recipes")
    template = recipes / TEMPLATES.get(stage, f"tiny/{stage}.yaml")
    out = Path(out)
    data_dir = out.parent / "data"
    helps = {r["key"]: r["help"] for r in reference[stage]}
    written: list[Path] = []
    copies: list[tuple[Path, Path]] = []
    if data is not None and not Path(data).is_file():
        raise ConfigError(f"alignkit init: --data {data}: no such file. Fix: give a .jsonl/.json/.csv/.parquet file.")
    lines = [
        f"# alignkit {stage} recipe, written by `alignkit init {stage}` from the shipped {template.relative_to(recipes).as_posix()}.",
        f"#   alignkit {stage} --config {out.name}            # run it (--key value overrides a key)",
        f"#   alignkit {stage} --help                         # the keys you may add, with defaults",
        "# Sized as a smoke run on CPU: on a GPU raise max_steps (or set num_train_epochs), batch size and max_length.",
    ]
    for line in template.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue  # the template's own notes talk about the clone's paths
        key = re.match(r"^(\w+):", line)
        if key and key.group(1) == "model_name_or_path" and model:
            line = f"model_name_or_path: {model}"
        elif key and key.group(1) == "output_dir":
            line = f"output_dir: outputs/{out.stem}"
        elif key and key.group(1) in STARTS_FROM:  # an earlier tiny run: where `alignkit init <that stage>` writes it
            line = re.sub(r"^(\w+:\s*)outputs/tiny/(\S+)", r"\1outputs/\2", line)
        path = re.match(r"^(\s*-\s*path:\s*)(\S+)(.*)$", line)
        if path:
            if data is not None:
                line = f"{path.group(1)}{data}{path.group(3)}"
            else:
                source = _shipped_path(recipes, path.group(2), "recipes")
                copies.append((source, data_dir / source.name))
                line = f"{path.group(1)}{(Path('data') / source.name).as_posix()}{path.group(3)}"
        if key and "#" not in line and helps.get(key.group(1)):
            line = f"{line:<40} # {_help_comment(helps[key.group(1)])}"
        lines.append(line)
    if re.search(rf"^({'|'.join(STARTS_FROM)}):\s*outputs/", "\n".join(lines), flags=re.M):
        lines.insert(
            4, "# It starts from an SFT output: run `alignkit init sft` and that recipe first, or pass --model."
        )
    # sample data already there as shipped (dpo and kto share dpo.jsonl) is kept, not refused
    copies = [(src, dst) for src, dst in copies if not (dst.is_file() and dst.read_bytes() == src.read_bytes())]
    for target in [out, *(dst for _, dst in copies)]:
        if target.exists() and not force:
            raise ConfigError(f"alignkit init: {target} exists. Fix: remove it, choose --out, or pass --force.")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    yaml.safe_load(text)  # what we write parses
    out.write_text(text, encoding="utf-8")
    written.append(out)
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    return written


def write_launch_config(
    stage: str, recipe_file: str | Path, gpus: int, gpu: str | None = None
) -> tuple[list[Path], str]:
    """``alignkit init <stage> --gpus N``: the accelerate config for N GPUs beside ``recipe_file``, chosen by the
    memory planner (alignkit.train.plan): data parallel (``ddp``) when the recipe's plan fits one GPU, else DeepSpeed
    ZeRO-3 (weights, gradients and optimizer state split over the N ranks; its JSON copied beside it). ``gpu``: the
    GPU to plan for (default: this machine's, else an A100-80GB). Returns (files written, a line saying why)."""
    from alignkit import runtime
    from alignkit.stages import STAGES
    from alignkit.train.plan import GiB, plan_recipe

    if gpus < 1:
        raise ConfigError(f"alignkit init: --gpus {gpus}: not a count. Fix: a whole number >= 1.")
    recipe_file = Path(recipe_file)
    recipe = STAGES[stage].parse(["--config", str(recipe_file)])
    gpu = gpu or (None if runtime.gpu_available() else "A100-80GB")
    plan = plan_recipe(recipe, stage, gpu=gpu, num_processes=gpus, accelerate_config="ddp")
    name = "ddp" if plan.fits or gpus == 1 else "zero3"
    why = f"the plan needs {plan.total / GiB:.1f} GiB per GPU of {plan.capacity / GiB:.1f} GiB ({plan.setup.device})"
    if name == "zero3":
        zero = plan_recipe(recipe, stage, gpu=gpu, num_processes=gpus, accelerate_config="zero3")
        why = f"{why} with data parallel; ZeRO-3 over {gpus}: {zero.total / GiB:.1f} GiB per GPU"
    configs = shipped("accelerate_configs")
    settings = yaml.safe_load((configs / f"{name}.yaml").read_text(encoding="utf-8"))
    settings["num_processes"] = gpus
    written = []
    ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file:
        json_out = recipe_file.parent / Path(ds_file).name
        shutil.copyfile(_shipped_path(configs, ds_file, "accelerate_configs"), json_out)
        settings["deepspeed_config"]["deepspeed_config_file"] = json_out.name  # beside the recipe, run from there
        written.append(json_out)
    out = recipe_file.parent / f"accelerate_{name}.yaml"
    header = (
        f"# accelerate config for {gpus} GPU(s), written by `alignkit init {stage} --gpus {gpus}`: {name}, as {why}.\n"
    )
    out.write_text(header + yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return [out, *written], f"{name}: {why}"


def launch_command(stage: str, argv: list[str]) -> list[str] | None:
    """``alignkit <stage> ... --accelerate_config NAME|FILE [--num_processes N]``: the ``accelerate launch`` command
    that runs the stage's recipe module under that config (a shipped one by name: ddp, zero2, zero3, zero3_offload,
    multinode_zero3), with the other arguments passed on; None when neither flag is given. A shipped DeepSpeed config
    names its JSON relative to the clone: a copy with the JSON's absolute path is written to a temporary folder."""
    flags: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"command line: --{name} needs a value. Fix: write --{name} VALUE.")
                value, i = argv[i + 1], i + 1
            flags[name] = value
        else:
            rest.append(argv[i])
        i += 1
    if not flags:
        return None
    configs = shipped("accelerate_configs")
    name = flags.get("accelerate_config", "ddp")
    config = Path(name) if Path(name).is_file() else configs / f"{name}.yaml"
    if not config.is_file():
        names = sorted(p.stem for p in configs.glob("*.yaml"))
        raise ConfigError(
            f"--accelerate_config {name}: neither a file nor a shipped config.{suggest(name, names)} Fix: one of "
            f"{names} (alignkit recipes lists them), or the path of an accelerate config file."
        )
    settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if str(settings.get("distributed_type", "")).upper() == "DEEPSPEED" or settings.get("deepspeed_config"):
        if missing := deepspeed_missing(f"--accelerate_config {name} (a DeepSpeed config)"):
            raise ConfigError(missing)  # else accelerate's launcher raises ImportError with a bare `pip3 install`
    ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not Path(ds_file).is_absolute():
        beside = config.resolve().parent / ds_file  # `alignkit init --gpus` writes the JSON beside its config
        own = config.resolve().parent != configs.resolve() and beside.is_file()
        # a shipped config names its JSON relative to the clone's root: resolve it in the shipped folder
        settings["deepspeed_config"]["deepspeed_config_file"] = str(
            beside if own else _shipped_path(configs, ds_file, "accelerate_configs")
        )
        config = Path(tempfile.mkdtemp(prefix="alignkit-accelerate-")) / config.name
        config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if "num_processes" in flags:
        if not flags["num_processes"].isdigit() or int(flags["num_processes"]) < 1:
            raise ConfigError(f"--num_processes {flags['num_processes']}: not a count. Fix: a whole number >= 1.")
        command += ["--num_processes", flags["num_processes"]]
    return [*command, "-m", f"alignkit.recipes.{stage}", *rest]

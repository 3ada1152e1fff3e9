"""One parser for every recipe: a YAML file gives defaults, ``--key value`` flags override them.

The YAML is flat (as in alignment-handbook): each key belongs to one of the typed dataclass groups a
recipe asks for, and a key that two groups share (``trust_remote_code`` in ``ModelArguments`` and in
trl's configs) is given to both. Unlike trl's parser, an unknown key is an error that names the key and
suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import ConfigError, suggest

# transformers 5.23's deprecated names and their new ones: a recipe or command line may give either; the value goes to
# the new key (so a command-line override of the old name beats the recipe's new one, and transformers never warns).
ALIASES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}

# Keys the parser itself owns (they are not fields of any group).
_PARSER_FLAGS = {"config", "print_config", "help", "help_all"}


def _field_types(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # some upstream configs use forward references we cannot resolve; fall back to raw annotations
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            hints.update(getattr(klass, "__annotations__", {}))
        return hints


def _is_str_type(tp) -> bool:
    """True when a CLI string must stay a string (``str`` or ``Optional[str]``)."""
    if tp is str or tp == "str":
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) == 1 and args[0] is str
    return False


def _convert_cli_value(raw: str, tp) -> Any:
    if _is_str_type(tp):
        return None if raw in ("null", "None") and tp is not str else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _scalar_types(tp) -> set:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(tp) if a is not type(None)}
    return {tp}


def _check_kind(key: str, value: Any, tp) -> None:
    """ConfigError naming ``key`` for a YAML value of the wrong kind that no later check would name: a number other
    than 0/1 or a list for a true/false key, a single number for a list key (any other kind: :func:`_check_value_kind`)."""
    if value is None:
        return
    wanted = _scalar_types(tp)
    if wanted == {bool} and not isinstance(value, bool) and not (isinstance(value, int) and value in (0, 1)):
        raise ConfigError(f"{key}: {value!r} is not a valid bool. Fix: set {key} to true or false.")
    if (tp is list or typing.get_origin(tp) is list) and not isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: {value!r} is not a list. Fix: write {key} as a list, e.g. {key}: [item, ...].")


# A right value of a text key without a default, for the message refusing a value of another kind.
_TEXT_EXAMPLES = {
    "chat_template": "chatml",
    "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tokenizer_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "teacher_model_name_or_path": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "reward_model_path": "outputs/reward",
    "attn_implementation": "sdpa",
    "resume_from_checkpoint": "outputs/sft/checkpoint-500",
    "run_name": "sft-lr2e-4",
    "hub_model_id": "your-name/your-model",
    "eos_token": "'<|im_end|>'",
    "pad_token": "'<|pad|>'",
    "metric_for_best_model": "eval_loss",
    "task": "classification",
}
_KIND_NAMES = {
    str: "text",
    bool: "true/false",
    int: "a whole number",
    float: "a number",
    list: "a list",
    dict: "a mapping",
}
_KIND_EXAMPLES = {bool: "true", int: "8", float: "0.1", list: "[a, b]", dict: "{name: value}"}


def _kinds(tp) -> tuple[type, ...] | None:
    """The Python kinds a YAML value of a key typed ``tp`` may have (an int where a float is wanted; an enum or a
    path: text), or None where the type says nothing checkable (Any, an upstream class a YAML value cannot be)."""
    import enum

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        found: list[type] = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            kinds = _kinds(arg)
            if kinds is None:
                return None
            found += [k for k in kinds if k not in found]
        return tuple(found)
    if origin is typing.Literal:
        return tuple(dict.fromkeys(type(v) for v in typing.get_args(tp) if v is not None))
    if tp in (list, tuple) or origin in (list, tuple):
        items = typing.get_args(tp)
        # a list of mappings or of anything (datasets: [...]) takes one mapping for a one-item list
        one_mapping = not items or any(a is Any or a is dict or typing.get_origin(a) is dict for a in items)
        return (list, dict) if one_mapping else (list,)
    if tp is dict or origin is dict:
        return (dict,)
    if tp is float:
        return (float, int)
    if tp in (str, bool, int):
        return (tp,)
    if isinstance(tp, type) and (issubclass(tp, (enum.Enum, Path))):
        return (str,)
    return None


def _check_value_kind(key: str, value: Any, tp, default: Any = None) -> None:
    """ConfigError naming ``key`` when a YAML value is of none of the kinds its type takes (``chat_template: 5``: a
    number for a text key, ``lora_r: [8]``, ``learning_rate: {a: 1}``), with a right value to write; else nothing."""
    kinds = _kinds(tp)
    if value is None or not kinds or isinstance(value, kinds):
        return
    if bool in kinds and isinstance(value, int) and value in (0, 1):
        return
    if isinstance(value, bool) and int in kinds:
        return  # true/false for a number: the range checks name it
    got = next((name for k, name in _KIND_NAMES.items() if isinstance(value, k) and k is not int), None)
    got = got or ("a number" if isinstance(value, (int, float)) else type(value).__name__)
    named = [k for k in kinds if not (k is int and float in kinds)]  # float's int is "a number" already
    wanted = " or ".join(dict.fromkeys(_KIND_NAMES.get(k, k.__name__) for k in named))
    what = "not text" if named == [str] else f"{got}, not {wanted}"
    if (
        default is not None
        and not isinstance(default, bool)
        and isinstance(default, kinds)
        and default not in ("", [], {})
    ):
        example = yaml.safe_dump(_plain(default), default_flow_style=True).removesuffix("\n...\n").strip()
    elif named[0] is str:
        example = _TEXT_EXAMPLES.get(key, "value")
    else:
        example = _KIND_EXAMPLES.get(named[0], "value")
    quoted = ""
    if str in kinds and not isinstance(value, (list, dict)):
        quoted = f" (quote text that YAML would read as another kind: {key}: '{value}')"
    raise ConfigError(f"{key}: {value!r} is {what}. Fix: set {key} to {wanted}, e.g. {key}: {example}{quoted}.")


def _coerce(key: str, value: Any, tp, default: Any = None) -> Any:
    """YAML reads '1e-3' as a string (YAML 1.1); turn strings into the field's number/bool type."""
    if isinstance(value, bool) and str in _scalar_types(tp) and bool not in _scalar_types(tp):
        return "yes" if value else "no"  # YAML 1.1 reads `save_strategy: no` as False; the field wants the word
    if isinstance(value, str) and typing.get_origin(tp) is list:  # one item where a list is wanted: --key item
        return [value]
    if not isinstance(value, str):
        _check_kind(key, value, tp)
        _check_value_kind(key, value, tp, default)
        if isinstance(value, int) and _scalar_types(tp) == {bool}:
            return bool(value)  # 0 / 1, as the strings "0" / "1" are read
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and float in _scalar_types(tp)
            and int not in _scalar_types(tp)
        ):
            return float(value)
        return value
    wanted = _scalar_types(tp)
    if str in wanted or not wanted & {int, float, bool}:
        return value
    for kind in (int, float):
        if kind in wanted:
            try:
                return kind(value)
            except ValueError:
                pass
    if bool in wanted and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    kinds = " or ".join(t.__name__ for t in wanted if isinstance(t, type))
    example = {"int": "8", "float": "2e-4", "bool": "true"}
    examples = ", ".join(example[t.__name__] for t in wanted if isinstance(t, type) and t.__name__ in example)
    raise ConfigError(
        f"{key}: '{value}' is not a valid {kinds}. Fix: set {key} to a value of type {kinds} (e.g. {examples})."
    )


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        self.key, self.first, self.second = key, first, second


MERGE_TAG = "tag:yaml.org,2002:merge"
# Top-level keys that only hold a block for anchors (``x-defaults: &defaults {...}``, as in docker-compose); they are
# dropped after the merge keys (``<<: *defaults``) are applied, so the strict-key check sees the merged recipe.
ANCHOR_PREFIX = "x-"


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently).
    YAML 1.1 merge keys (``<<: *anchor``, ``<<: [*a, *b]``) work as in yaml.safe_load: the mapping's own keys
    override merged ones; only its own keys are checked for duplicates."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class RecipeParser:
    """Parse ``--config recipe.yaml`` plus ``--key value`` overrides into typed dataclass instances."""

    def __init__(self, dataclass_types: tuple[type, ...] | list[type], elsewhere=None, name: str = "<stage>"):
        """``elsewhere(key)``: for a key this recipe does not know, the names of the other stages whose recipes take
        it (a list, or one name or None), so the error says where the key belongs. ``name``: the stage, for the usage line of ``--help``."""
        self.dataclass_types = tuple(dataclass_types)
        self.name = name
        self.elsewhere = elsewhere
        self.owners: dict[str, list[type]] = {}
        self.types: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}  # a field's default, as the example of a right value in a kind error
        for cls in self.dataclass_types:
            hints = _field_types(cls)
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                self.owners.setdefault(f.name, []).append(cls)
                self.types.setdefault(f.name, hints.get(f.name, f.type))
                self.defaults.setdefault(f.name, None if f.default is dataclasses.MISSING else f.default)

    @property
    def valid_keys(self) -> list[str]:
        return sorted(self.owners)

    def _check_key(self, key: str, where: str) -> None:
        """ConfigError for a key this recipe does not take: naming the other stage(s) whose recipe takes it
        (``--label_list`` to sft: the task recipe's), else the closest key of this recipe (a typo)."""
        if key in self.owners:
            return
        others = self.elsewhere(key) if self.elsewhere else []
        others = [others] if isinstance(others, str) else list(others or ())
        if others:
            recipes = f"the {others[0]} recipe" if len(others) == 1 else f"the {', '.join(others)} recipes"
            raise ConfigError(
                f"{where}: unknown key '{key}': it is a key of {recipes}, not of the {self.name} recipe. Fix: "
                f"remove it, or train with the stage that takes it (alignkit {' / '.join(others)} --config ...)."
            )
        raise ConfigError(
            f"{where}: unknown key '{key}'.{suggest(key, self.valid_keys)} Fix: correct the key, or run with --help "
            "to list the valid ones."
        )

    def load_yaml(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found. Fix: pass an existing YAML file to --config.")
        try:
            data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_StrictLoader) or {}
        except _DuplicateKey as exc:
            raise ConfigError(
                f"{path}: '{exc.key}' is set twice, on line {exc.first} and line {exc.second}. Fix: keep one of them."
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}). Fix: save the recipe as UTF-8.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc}). Fix: correct the YAML syntax.") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of key: value. Fix: use flat 'key: value' lines.")
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(ANCHOR_PREFIX))}
        data = self._flatten_groups(data, path)
        for key in data:
            self._check_key(key, str(path))
        return data

    def _flatten_groups(self, data: dict[str, Any], path: Path) -> dict[str, Any]:
        """A run's alignkit_config.yaml is grouped by section ({ModelArguments: {...}, SFTConfig: {...}}): accept it
        as a recipe, so a run can be repeated with ``--config <output_dir>/alignkit_config.yaml``."""
        groups = {cls.__name__ for cls in self.dataclass_types}
        if not data or not all(key in groups and isinstance(value, dict) for key, value in data.items()):
            return data
        flat: dict[str, Any] = {}
        for values in data.values():
            for key, value in values.items():
                if key in flat and flat[key] != value:
                    raise ConfigError(f"{path}: '{key}' is set twice, to {flat[key]!r} and {value!r}. Fix: keep one.")
                flat[key] = value
        return flat

    def parse_cli(self, argv: list[str]) -> tuple[str | None, dict[str, Any], bool, bool | str]:
        """Return (config path, overrides, print_config, help): help is False, True (--help, -h) or "all"
        (--help-all)."""
        config, overrides, print_config, want_help = None, {}, False, False
        i = 0
        while i < len(argv):
            token = argv[i]
            if token in ("-v", "--verbose"):  # alignkit.quiet reads it from sys.argv
                i += 1
                continue
            if token in ("-h", "--help-all", "--help_all"):
                want_help = "all" if token != "-h" else (want_help or True)
                i += 1
                continue
            if not token.startswith("--"):
                raise ConfigError(
                    f"command line: unexpected argument '{token}'. Fix: options take the form --key value."
                )
            key, eq, value = token[2:].partition("=")
            key = key.replace("-", "_")
            if key in ("print_config", "help") and not eq:
                print_config |= key == "print_config"
                want_help = want_help or key == "help"
                i += 1
                continue
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is None or nxt.startswith("--"):
                    if key in self.types and bool not in _scalar_types(self.types[key]):
                        raise ConfigError(
                            f"command line: --{key} needs a value. Fix: write --{key} VALUE (a bare flag means true, "
                            "for true/false keys only)."
                        )
                    value = "true"  # a bare --flag means true
                    i += 1
                else:
                    value = nxt
                    i += 2
            else:
                i += 1
            if key == "config":
                config = value
                continue
            self._check_key(key, "command line")
            overrides[key] = _convert_cli_value(value, self.types[key])
        return config, overrides, print_config, want_help

    def help_text(self, every_key: bool = False) -> str:
        """``--help`` (``every_key``: ``--help-all``), from the live dataclasses; ``alignkit <stage> --help`` prints the
        same text from the checked-in key reference without importing them (alignkit.config.keyref)."""
        from alignkit.config.keyref import key_rows, render_help

        return render_help(self.name, key_rows(self.dataclass_types, self.name), every_key=every_key)

    def build(self, values: dict[str, Any]) -> tuple:
        """Instantiate every group from a flat dict of values (already key-checked). The values the recipe sets are
        range-checked first (alignkit.config.ranges), so that upstream classes never see them."""
        from alignkit.config.ranges import check_combinations, check_values

        coerced = {k: _coerce(k, v, self.types[k], self.defaults.get(k)) for k, v in values.items()}
        check_values(coerced, self.owners)
        check_combinations(coerced, self.dataclass_types)
        instances = []
        for cls in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            kwargs = {k: _coerce(k, v, self.types[k]) for k, v in values.items() if k in names}
            try:
                instances.append(cls(**kwargs))
            except ConfigError:
                raise
            except (TypeError, ValueError) as exc:  # an upstream config's own check (transformers, trl)
                raise ConfigError(
                    f"{cls.__name__}: {str(exc).rstrip('.')}. Fix: correct the value it names (--help lists every key)."
                ) from exc
        return tuple(instances)

    def read(self, argv: list[str] | None = None) -> tuple[dict[str, Any], bool]:
        """The recipe's values (YAML, then the command line's overrides), every key checked; and whether
        ``--print_config`` was given. ``--help`` prints the keys and exits."""
        argv = sys.argv[1:] if argv is None else list(argv)
        if not argv:
            raise ConfigError(
                f"give --config RECIPE.yaml (alignkit {self.name} --config RECIPE.yaml [--key value ...]). Fix: "
                f"`alignkit recipes` lists the shipped recipes, `alignkit init {self.name}` writes one to edit, "
                f"`alignkit {self.name} --help` lists the keys."
            )
        config, overrides, print_config, want_help = self.parse_cli(argv)
        if want_help:
            print(self.help_text(every_key=want_help == "all"))
            raise SystemExit(0)
        values = self._alias(self.load_yaml(config), config) if config else {}
        values.update(self._alias(overrides, "command line"))
        return values, print_config

    def _alias(self, values: dict[str, Any], where: str | None) -> dict[str, Any]:
        """Move a deprecated name's value (:data:`ALIASES`) to its new key, where this recipe has the new key."""
        for old, new in ALIASES.items():
            if old in values and new in self.types:
                value = values.pop(old)
                if new in values and values[new] != value:
                    raise ConfigError(
                        f"{where}: '{old}' ({value!r}) and '{new}' ({values[new]!r}) disagree; '{old}' is "
                        f"transformers' deprecated name of '{new}'. Fix: keep '{new}' only."
                    )
                values[new] = value
        return values

    def finish(self, values: dict[str, Any], print_config: bool) -> tuple:
        """Build the groups from ``values``; with ``print_config``, print the resolved recipe and exit."""
        groups = self.build(values)
        if print_config:
            print(dump_config(groups))
            raise SystemExit(0)
        return groups

    def parse(self, argv: list[str] | None = None) -> tuple:
        return self.finish(*self.read(argv))


# Credentials, never written anywhere. Matched on whole names or suffixes: pad_token or tokenizer_name_or_path are not
# secrets and belong in the resolved config.
_SECRET_NAMES = {"token", "hub_token", "push_to_hub_token", "hf_token", "api_key", "password", "secret"}
_SECRET_SUFFIXES = ("_api_key", "_password", "_secret", "_auth_token", "_access_token")


def is_secret(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and type(value).__module__ != "builtins" and hasattr(type(value), "__members__"):
        return value.value  # enums
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolved_config(groups: tuple) -> dict[str, dict[str, Any]]:
    """The fully resolved config as ``{group name: {key: value}}``, with secrets removed."""
    out: dict[str, dict[str, Any]] = {}
    for group in groups:
        fields = {}
        for f in dataclasses.fields(group):
            if not f.init or is_secret(f.name):
                continue  # tokens are never written anywhere
            fields[f.name] = _plain(getattr(group, f.name))
        out[type(group).__name__] = fields
    return out


def dump_config(groups: tuple) -> str:
    return yaml.safe_dump(resolved_config(groups), sort_keys=False, default_flow_style=False)

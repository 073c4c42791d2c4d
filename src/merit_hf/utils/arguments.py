"""Arguments of the training jobs: dataclasses filled from a YAML file, flags, or both (flags win).

Every job is run the same way, whatever the hardware:

    accelerate launch -m merit_hf.training.<job> configs/<name>.yaml --learning_rate 1e-4

The YAML file holds every field of the job's dataclasses as top-level keys; a key that no dataclass has raises (a
typo would otherwise be ignored silently). Fields typed `dict | str` take a mapping in YAML and a JSON string on the
command line (`--ecg_config '{"mask_ratio": 0.5}'`), which is merged over the YAML mapping (so one key can be
changed without repeating the others); `as_mapping` turns either into a dict, and `config_from_argument` builds a
transformers config from it, refusing keys the config does not have.

A `list[...]` field given one YAML scalar (`report_to: none`) becomes a one-element list, and YAML list elements are
converted to the declared element type (PyYAML reads `1e-2` as a string). An `X | None` field takes `None`, `none` or
`null` on the command line as YAML's `null`.

The repository's `configs/` ship inside the package (`merit_hf/configs`), so a pip install runs the documented commands
outside a clone: a config that is not a file in the working directory, named bare (`tiny`, `tiny.yaml`) or by its
documented path (`configs/tiny.yaml`), is the packaged copy (`resolve_config_path`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import types
import typing
from argparse import ArgumentTypeError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

YAML_SUFFIXES = (".yaml", ".yml")
NONE_STRINGS = ("None", "none", "null")
# src/merit_hf/configs links to the repository's configs/ (one copy); a wheel holds the files themselves
PACKAGED_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DOCUMENTED_CONFIGS_DIR = Path("configs")  # where the README's commands name them: `configs/tiny.yaml`

logger = logging.getLogger(__name__)


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, help_hint: str = "--help lists them"
) -> tuple:
    """Parse `argv` (`[config.yaml] [--flag value ...]`) into one instance of each dataclass.

    The YAML file, when given first, sets the defaults; flags after it override single fields, and a JSON flag for a
    field that YAML gives as a mapping is merged into that mapping. `help_hint` ends the error about an unknown flag
    (a command that passes flags on names the command whose `--help` lists them).
    """
    argv = list(argv) if argv is not None else []
    packaged = packaged_config_names(dataclass_types)
    parser = HfArgumentParser(
        list(dataclass_types),
        prog=_program(),
        usage="%(prog)s [CONFIG] [--flag value ...]",
        description="CONFIG: a YAML file whose keys are the flags below (flags given after it win)"
        + (
            f", or a config packaged with merit_hf for this command, by name: {', '.join(packaged)}."
            if packaged
            else "; merit_hf packages no config for this command."
        ),
    )
    optional = {name for name, hint in _field_types(dataclass_types).items() if type(None) in typing.get_args(hint)}
    for action in parser._actions:
        if action.dest in optional and action.type is not None:
            action.type = _none_or(action.type)
    from_yaml: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):  # HfArgumentParser takes flags only, so a first word is the config
        from_yaml = read_yaml_arguments(resolve_config_path(argv.pop(0)), dataclass_types)
        parser.set_defaults(**from_yaml)
    known = {option for action in parser._actions for option in action.option_strings if option.startswith("--")}
    unknown = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--") and arg.split("=", 1)[0] not in known]
    if unknown:
        raise ValueError(
            "unknown flag(s): " + "; ".join(_unknown_flag_hint(flag, known) for flag in unknown) + f" ({help_hint})"
        )
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    for instance in parsed:
        for field in dataclasses.fields(instance):
            value = getattr(instance, field.name)
            if isinstance(from_yaml.get(field.name), dict) and isinstance(value, str):
                setattr(instance, field.name, {**from_yaml[field.name], **as_mapping(value, field.name)})
    return parsed


# transformers.TrainingArguments flags a Trainer user reaches for first, and what these scripts call the same setting
TRAINER_EQUIVALENTS = {
    "--num_train_epochs": "--max_steps",
    "--bf16": "--mixed_precision bf16",
    "--fp16": "--mixed_precision fp16",
    "--eval_strategy": "--eval_steps",
    "--evaluation_strategy": "--eval_steps",
    "--save_strategy": "--save_steps",
    "--no_cuda": "--use_cpu true",
}


def _unknown_flag_hint(flag: str, known: set[str]) -> str:
    equivalent = TRAINER_EQUIVALENTS.get(flag)
    if equivalent is not None and equivalent.split()[0] in known:
        return f"{flag} (a TrainingArguments flag; here: {equivalent})"
    closest = difflib.get_close_matches(flag, sorted(known), n=1)
    return f"{flag} (did you mean {closest[0]}?)" if closest else flag


def _program() -> str:
    """How the job was started, for its usage line: `python -m merit_hf.training.probe`, not `probe.py`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0] or "merit_hf").name


def resolve_config_path(config: str | os.PathLike) -> Path:
    """The YAML file a job's first argument names: `config` itself where that file exists (relative to the working
    directory, as always); otherwise, for a bare name (`tiny`, `tiny.yaml`) or the documented `configs/<name>.yaml`,
    the copy packaged with merit_hf, so that `python -m merit_hf.training.pretrain configs/tiny.yaml` also runs from a
    pip install outside a clone. Anything else missing raises, listing the packaged names."""
    path = Path(config)
    if path.is_file():
        return path
    name = path.name if path.suffix in YAML_SUFFIXES else f"{path.name}{YAML_SUFFIXES[0]}"
    packaged = PACKAGED_CONFIGS_DIR / name
    if path.parent in (Path("."), DOCUMENTED_CONFIGS_DIR) and packaged.is_file():
        logger.info("%s: not in %s, using merit_hf's packaged copy %s", config, Path.cwd(), packaged)
        return packaged
    names = packaged_config_names()
    closest = difflib.get_close_matches(Path(name).stem, names, n=1)
    hint = f"; did you mean {closest[0]!r}?" if closest else ""
    raise FileNotFoundError(
        f"{config}: config file not found (no such file in {Path.cwd()}, and merit_hf's packaged configs are "
        f"{names or 'missing from this install'}: name one as `tiny` or `configs/tiny.yaml`{hint})"
    )


def packaged_config_names(dataclass_types: Sequence[type] | None = None) -> list[str]:
    """The configs shipped in the package (`merit_hf/configs/*.yaml`), by the name `resolve_config_path` takes; with
    `dataclass_types`, only those whose every key is one of their fields (the configs that command accepts)."""
    paths = sorted(PACKAGED_CONFIGS_DIR.glob(f"*{YAML_SUFFIXES[0]}"))
    if dataclass_types is not None:
        known = {field.name for cls in dataclass_types for field in dataclasses.fields(cls)}
        paths = [path for path in paths if set(yaml.safe_load(path.read_text()) or {}) <= known]
    return [path.stem for path in paths]


def read_yaml_arguments(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The YAML file as a dict, after checking that every key is a field of one of `dataclass_types`; values of
    `list[...]` fields are lists of the declared element type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    known = {field.name for cls in dataclass_types for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown arguments {unknown}; known arguments are {sorted(known)}")
    for name, hint in _field_types(dataclass_types).items():
        element_type = _list_element_type(hint)
        if element_type is not None and name in values:
            items = values[name] if isinstance(values[name], (list, tuple)) else [values[name]]
            values[name] = [_convert_element(item, element_type, f"{path}: {name}") for item in items]
    return values


def _field_types(dataclass_types: Sequence[type]) -> dict[str, Any]:
    """`{field name: resolved type hint}` over all `dataclass_types` (annotations are strings under PEP 563)."""
    return {name: hint for cls in dataclass_types for name, hint in typing.get_type_hints(cls).items()}


def _list_element_type(hint: Any) -> type | None:
    """`X` for a `list[X]` (or `list[X] | None`) hint, else None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hints = [inner for inner in typing.get_args(hint) if inner is not type(None)]
        hint = hints[0] if len(hints) == 1 else None
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def _convert_element(value: Any, element_type: type, where: str) -> Any:
    """`value` as `element_type`, converting strings (YAML's `1e-2`) and ints for floats, never bools to numbers or
    floats to ints."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (
        isinstance(value, str)
        or type(value) is element_type
        or element_type is str
        or (element_type is float and is_number)
    ):
        try:
            return (string_to_bool if element_type is bool else element_type)(value)
        except (ArgumentTypeError, TypeError, ValueError):
            pass
    raise ValueError(f"{where}: expected a list of {element_type.__name__}, got element {value!r}")


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` that reads `None`/`none`/`null` as None and anything else with `parse`."""

    def parse_optional(text: str) -> Any:
        return None if text in NONE_STRINGS else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid <name> value: ..." errors
    return parse_optional


def as_mapping(value: dict | str | None, field: str) -> dict[str, Any]:
    """A `dict | str` argument as a dict: YAML gives a mapping, the command line a JSON string."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{field}: expected a JSON object, got {value!r} ({error})") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{field}: expected a JSON object, got {value!r}")
    return parsed


def config_from_argument(config_class: type, value: dict | str | None, field: str):
    """`config_class(**mapping)` for a `dict | str` argument, refusing keys that are not fields of the config.

    transformers configs keep unknown keyword arguments as attributes, so `{"mask_rato": 0.5}` would otherwise train
    with the default mask ratio and save a stray key. Known keys are the config's init fields (its own and
    `PreTrainedConfig`'s) plus the keys of its `to_dict()` (what a saved `config.json` holds).
    """
    mapping = as_mapping(value, field)
    known = sorted(
        {item.name for item in dataclasses.fields(config_class) if item.init} | set(config_class().to_dict())
    )
    for key in mapping:
        if key not in known:
            closest = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {closest[0]!r}?" if closest else f"; fields are {known}"
            raise ValueError(f"--{field}: {key!r} is not a field of {config_class.__name__}{hint}")
    return config_class(**mapping)


def arguments_to_dict(*arguments) -> dict[str, Any]:
    """All fields of the given dataclass instances in one flat dict (for trackers and the saved run config)."""
    merged: dict[str, Any] = {}
    for instance in arguments:
        merged.update(dataclasses.asdict(instance))
    return merged


__all__ = [
    "arguments_to_dict",
    "as_mapping",
    "config_from_argument",
    "packaged_config_names",
    "parse_arguments",
    "read_yaml_arguments",
    "resolve_config_path",
]

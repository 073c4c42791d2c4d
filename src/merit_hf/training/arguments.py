"""Arguments of the training jobs: dataclasses filled from a YAML file, flags, or both (flags win).

Every job is run the same way, whatever the hardware:

    accelerate launch -m merit_hf.training.<job> configs/<name>.yaml --learning_rate 1e-4

The YAML file holds every field of the job's dataclasses as top-level keys; a key that no dataclass has raises (a
typo would otherwise be ignored silently). Fields typed `dict | str` take a mapping in YAML and a JSON string on the
command line (`--ecg_config '{"mask_ratio": 0.5}'`), which is merged over the YAML mapping (so one key can be
changed without repeating the others); `as_mapping` turns either into a dict.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

YAML_SUFFIXES = (".yaml", ".yml")


def parse_arguments(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse `argv` (`[config.yaml] [--flag value ...]`) into one instance of each dataclass.

    The YAML file, when given first, sets the defaults; flags after it override single fields, and a JSON flag for a
    field that YAML gives as a mapping is merged into that mapping.
    """
    argv = list(argv) if argv is not None else []
    parser = HfArgumentParser(list(dataclass_types))
    from_yaml: dict[str, Any] = {}
    if argv and argv[0].endswith(YAML_SUFFIXES):
        from_yaml = read_yaml_arguments(argv.pop(0), dataclass_types)
        parser.set_defaults(**from_yaml)
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    for instance in parsed:
        for field in dataclasses.fields(instance):
            value = getattr(instance, field.name)
            if isinstance(from_yaml.get(field.name), dict) and isinstance(value, str):
                setattr(instance, field.name, {**from_yaml[field.name], **as_mapping(value, field.name)})
    return parsed


def read_yaml_arguments(path: str | Path, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The YAML file as a dict, after checking that every key is a field of one of `dataclass_types`."""
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
    return values


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


def arguments_to_dict(*arguments) -> dict[str, Any]:
    """All fields of the given dataclass instances in one flat dict (for trackers and the saved run config)."""
    merged: dict[str, Any] = {}
    for instance in arguments:
        merged.update(dataclasses.asdict(instance))
    return merged


__all__ = ["arguments_to_dict", "as_mapping", "parse_arguments", "read_yaml_arguments"]

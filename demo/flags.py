"""Command-line flags from a frozen config dataclass: one `--field-name` per int or float field
(the demo's training and LoRA-experiment scripts), and the config back from the parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float}  # field annotations are strings (`from __future__`)


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
  """Adds `--field-name` (type and default of the field) for each int or float field."""
  for field in dataclasses.fields(config_class):
    if field.type in _TYPES:
      parser.add_argument(f"--{field.name.replace('_', '-')}", type=_TYPES[field.type],
                          default=field.default)


def config_from_flags[Config](config_class: type[Config], args: argparse.Namespace) -> Config:
  """The config of the parsed flags: the fields `args` holds, the other fields' defaults."""
  values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
                            if hasattr(args, f.name)}
  return config_class(**values)

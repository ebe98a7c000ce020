"""`from_dict` / `to_dict` for frozen config dataclasses (QuantConfig and the model configs).

Checkpoints store a config as `config.to_dict()` in JSON and rebuild it with `Config.from_dict`;
every config shares this one implementation (it lives here because `models` and `convert` build
on `svdq_jax`, never the other way round).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from svdq_jax.errors import InputError


class DictConfig:
  """Mixin for a frozen config dataclass: a JSON-ready dict of its fields, and back.

  Tuple fields become lists in `to_dict`; the dataclass's `__post_init__` turns them back into
  tuples where it needs them hashable.
  """

  def to_dict(self) -> dict[str, Any]:
    """Every field by name; tuple values as lists (what JSON would give back)."""
    values = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      values[field.name] = list(value) if isinstance(value, tuple) else value
    return values

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Self:
    """Inverse of `to_dict`; a key that is not a field is a ValueError (not dropped silently)."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise InputError(f"{cls.__name__}.from_dict: unknown keys {unknown} (unknown fields are "
                       f"not dropped); known: {sorted(names)}")
    return cls(**values)

"""`QuantFormat`: how one quantized layer's arrays are encoded (docs/format.md).

A layer needs only this to compute: its formats, group size and activation shift. The rules that
choose layers and the search that quantizes them (`QuantConfig`) stay out of the layer, its jit
treedef and its checkpoint header. Imports nothing heavy: the CLI's --help reads the format names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from svdq_jax.config_base import DictConfig
from svdq_jax.errors import InputError

WeightFormat = Literal["int4", "nvfp4", "nf4", "int8"]
ActFormat = Literal["int4", "nvfp4", "int8"]

WEIGHT_FORMATS = ("int4", "nvfp4", "nf4", "int8")
ACT_FORMATS = ("int4", "nvfp4", "int8")
NVFP4_GROUP_SIZE = 16


@dataclasses.dataclass(frozen=True)
class QuantFormat(DictConfig):
  """The static part of an `SVDQLinear` that its product depends on.

  Attributes:
    weight_format: the residual's 4-/8-bit format.
    act_format: the format activations are quantized to per token, or None for weight-only
      (W4A16: x times the dequantized kernel).
    group_size: consecutive input channels sharing one scale, resolved for this layer (K for the
      per-channel INT8 formats).
    act_shift: added to the inputs before quantizing them as unsigned INT4 (0.171875 after a
      GELU), or 0 for signed codes.
  """

  weight_format: WeightFormat
  act_format: ActFormat | None
  group_size: int
  act_shift: float = 0.0

  def __post_init__(self):
    if self.weight_format not in WEIGHT_FORMATS:
      raise InputError(f"QuantFormat: weight_format {self.weight_format!r} is not one of "
                       f"{WEIGHT_FORMATS}")
    if self.act_format is not None and self.act_format != self.weight_format:
      raise InputError(f"QuantFormat: act_format {self.act_format!r} needs the same "
                       f"weight_format, got {self.weight_format!r}")
    if not isinstance(self.group_size, int) or self.group_size <= 0:
      raise InputError(f"QuantFormat: group_size must be a positive integer, got "
                       f"{self.group_size!r}")
    if self.weight_format == "nvfp4" and self.group_size != NVFP4_GROUP_SIZE:
      raise InputError(f"QuantFormat: NVFP4 needs group_size {NVFP4_GROUP_SIZE}, got "
                       f"{self.group_size}")
    if self.act_shift < 0 or (self.act_shift and self.act_format != "int4"):
      raise InputError(f"QuantFormat: act_shift {self.act_shift} needs INT4 activations and must "
                       f"be >= 0 (act_format {self.act_format!r})")
    object.__setattr__(self, "act_shift", float(self.act_shift))

  @property
  def quantizes_activations(self) -> bool:
    """False for weight-only layers (W4A16), whose inputs stay in their own dtype."""
    return self.act_format is not None

  @property
  def act_code_format(self) -> str | None:
    """The format activation codes are written in: "uint4" for shifted INT4, else act_format."""
    return "uint4" if self.act_format == "int4" and self.act_shift else self.act_format

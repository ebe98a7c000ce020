"""LoRAs in the pipelines: `pipe(prompt, loras=[(file, strength), ...])`.

Each call applies the LoRAs to the transformer's parameters (`svdq_jax.lora.apply_loras`: on a
quantized layer they join its low-rank branch, on a 16-bit layer their product is added to its
kernel in the kernel's dtype) and hands the result to the jitted denoising loop as its parameter
argument. The transformer itself is never modified, so a call without LoRAs samples from the
base model, bit for bit. A strength is an array value, not a compile-time constant: changing it
reruns the compiled loop; adding or removing a LoRA changes branch ranks (new shapes), which
compiles once for that set. Files are read once per pipeline (cached by path and modification
time).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels.svdq_linear as kernels
from convert.lora import read_lora
from convert.safetensors_io import CheckpointError
from pallas_kernels.svdq_linear.config import MAX_RANK
from svdq_jax.errors import InputError
from svdq_jax.lora import Adapter, apply_loras, linear_shapes

LoRASpec = tuple[str | os.PathLike, float]
"""(LoRA file, strength): what a pipeline's `loras` argument lists."""


def _file_key(path: Path) -> tuple[str, int, int]:
  try:
    stat = path.stat()
  except OSError as e:
    raise CheckpointError(f"LoRA file {str(path)!r}: {e.strerror or e}") from e
  return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def max_branch_rank() -> int | None:
  """The largest low-rank branch the fused GPU kernels take when they would run here (their
  `MAX_RANK`), so a LoRA set that would push sampling off the kernels fails with a clear error;
  None where the XLA path runs anyway (any rank)."""
  return MAX_RANK if kernels.is_supported() else None


class LoRALoader:
  """Reads LoRA files for one transformer, caching each file's adapter.

  Args:
    model_type: "flux" or "pixart" (which module names the files may use, `convert.lora`).
  """

  def __init__(self, model_type: str):
    self.model_type = model_type
    self._adapters: dict[tuple[str, int, int], Adapter] = {}

  def adapters(self, loras: Sequence[LoRASpec], params: Any) -> tuple[list[Adapter], jnp.ndarray]:
    """(adapters, strengths (A,) float32) of `loras` for a model with parameters `params`.

    Raises:
      InputError (CheckpointError) naming the file: a missing file, a strength that is not a
      finite number, or a file `convert.lora.read_lora` rejects (another model's LoRA, an unknown
      format, keys that match no layer: the first of them are named).
    """
    if isinstance(loras, (str, os.PathLike)) or not all(
        isinstance(spec, (tuple, list)) and len(spec) == 2 for spec in loras):
      raise CheckpointError(f"loras must be a list of (file, strength) pairs, got {loras!r}")
    shapes = None
    adapters, strengths = [], []
    for file, strength in loras:
      path = Path(file)
      try:
        value = float(strength)
      except (TypeError, ValueError):
        value = float("nan")
      if not np.isfinite(value):
        raise CheckpointError(f"{path}: LoRA strength {strength!r} is not a finite number")
      key = _file_key(path)
      if key not in self._adapters:
        shapes = linear_shapes(params) if shapes is None else shapes
        self._adapters[key] = read_lora(path, self.model_type, shapes)
      adapters.append(self._adapters[key])
      strengths.append(value)
    return adapters, jnp.asarray(strengths, jnp.float32)

  def state(self, transformer: nnx.Module, loras: Sequence[LoRASpec] | None, *,
            jit: bool = True) -> Any:
    """`nnx.state(transformer)` with `loras` applied (the state itself when there are none).

    Raises:
      InputError as `adapters`, and for LoRAs with `jit=False` (the eager steps run the
      transformer object itself, for calibration).
    """
    state = nnx.state(transformer)
    if not loras:
      return state
    if not jit:
      raise InputError("loras: LoRAs need jit=True (the eager steps of jit=False, used for "
                       "calibration, run the base transformer)")
    adapters, strengths = self.adapters(loras, state)
    return apply_loras(state, adapters, strengths, max_rank=max_branch_rank())

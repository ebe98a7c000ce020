"""LoRAs in the pipelines: `pipe(prompt, loras=[(file, strength), ...])`.

Each call applies the LoRAs to the denoiser's parameters, and for SDXL to its text encoders' when
the file holds LoRAs of them (`svdq_jax.lora.apply_loras`: on a quantized layer they join its
low-rank branch, on a 16-bit layer, linear or conv, their product is added to its kernel in the
kernel's dtype), and hands the result to the jitted functions as their parameter argument. The
models themselves are never modified, so a call without LoRAs samples from the base model, bit
for bit. A strength is an array value, not a compile-time constant: changing it
reruns the compiled loop; adding or removing a LoRA changes branch ranks (new shapes), which
compiles once for that set. Files are read once per pipeline (cached by path and modification
time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

import pallas_kernels.svdq_linear as kernels
from convert.lora import COMPONENT_PREFIX, lora_strength, read_pipeline_lora
from convert.safetensors_io import CheckpointError
from pallas_kernels.svdq_linear.config import MAX_RANK
from svdq_jax.errors import InputError
from svdq_jax.lora import Adapter, apply_loras, kernel_shapes

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
  """Reads LoRA files for one pipeline, caching each file's adapters.

  Args:
    model_type: "flux", "pixart" or "sdxl" (which module names the files may use, `convert.lora`).
  """

  def __init__(self, model_type: str):
    self.model_type = model_type
    self.denoiser = COMPONENT_PREFIX[model_type]
    self._adapters: dict[tuple, dict[str, Adapter]] = {}

  def component_adapters(self, loras: Sequence[LoRASpec], params: Mapping[str, Any]
                         ) -> tuple[dict[str, list[Adapter]], jnp.ndarray]:
    """({component: one adapter per LoRA}, strengths (A,) float32) of `loras` for components
    with parameters `params` ({component: state}; the denoiser, "transformer" or "unet", and
    for SDXL "text_encoder" and "text_encoder_2").

    Raises:
      InputError (CheckpointError) naming the file: a missing file, a strength that is not a
      finite number, or a file `convert.lora.read_pipeline_lora` rejects (another model's LoRA,
      an unknown format, LoRAs of a component not in `params`, keys that match no layer: the
      first of them are named).
    """
    if isinstance(loras, (str, os.PathLike)) or not all(
        isinstance(spec, (tuple, list)) and len(spec) == 2 for spec in loras):
      raise CheckpointError(f"loras must be a list of (file, strength) pairs, got {loras!r}")
    shapes = None
    adapters: dict[str, list[Adapter]] = {component: [] for component in params}
    strengths = []
    for file, strength in loras:
      path = Path(file)
      value = lora_strength(path, strength)
      key = (*_file_key(path), tuple(sorted(params)))
      if key not in self._adapters:
        if shapes is None:
          shapes = {component: kernel_shapes(state) for component, state in params.items()}
        self._adapters[key] = read_pipeline_lora(path, self.model_type, shapes)
      for component, adapter in self._adapters[key].items():
        adapters[component].append(adapter)
      strengths.append(value)
    return adapters, jnp.asarray(strengths, jnp.float32)

  def adapters(self, loras: Sequence[LoRASpec], params: Any) -> tuple[list[Adapter], jnp.ndarray]:
    """(adapters, strengths (A,) float32) of `loras` for the denoiser with parameters `params`
    (a file with LoRAs of other components is an error); as `component_adapters`."""
    adapters, strengths = self.component_adapters(loras, {self.denoiser: params})
    return adapters[self.denoiser], strengths

  def states(self, modules: Mapping[str, nnx.Module], loras: Sequence[LoRASpec] | None, *,
             jit: bool = True) -> dict[str, Any]:
    """`{component: nnx.state(module)}` with `loras` applied to each component they target (the
    states themselves when there are none).

    Raises:
      InputError as `component_adapters`, and for LoRAs with `jit=False` (the eager steps run
      the model objects themselves, for calibration).
    """
    states = {component: nnx.state(module) for component, module in modules.items()}
    if not loras:
      return states
    if not jit:
      raise InputError("loras: LoRAs need jit=True (the eager steps of jit=False, used for "
                       "calibration, run the base models)")
    adapters, strengths = self.component_adapters(loras, states)
    max_rank = max_branch_rank()
    return {component: (apply_loras(state, adapters[component], strengths, max_rank=max_rank)
                        if any(adapters[component]) else state)
            for component, state in states.items()}

  def state(self, transformer: nnx.Module, loras: Sequence[LoRASpec] | None, *,
            jit: bool = True) -> Any:
    """`nnx.state(transformer)` (the denoiser) with `loras` applied (the state itself when there
    are none); as `states` with that one component."""
    return self.states({self.denoiser: transformer}, loras, jit=jit)[self.denoiser]

"""svdq-jax: SVDQuant (4-bit weights and activations plus a 16-bit low-rank branch) for JAX.

A whole model is quantized by three calls:

    stats = calibrate(model, inputs)                      # per-linear activation statistics
    state = quantize_params(nnx.state(model), stats, QuantConfig.preset("svdquant-int4"))
    nnx.update(model, state)                              # or quantize_model(model, stats, config)
"""

import importlib
from typing import Any

_EXPORTS = {
    "ActivationStats": "svdq_jax.calibration",
    "calibrate": "svdq_jax.calibration",
    "apply_loras": "svdq_jax.lora",
    "LayerLoRA": "svdq_jax.lora",
    "LoRAKernel": "svdq_jax.lora",
    "PRESETS": "svdq_jax.config",
    "QuantConfig": "svdq_jax.config",
    "Impl": "svdq_jax.dot",
    "current_impl": "svdq_jax.dot",
    "svdq_dot": "svdq_jax.dot",
    "use_impl": "svdq_jax.dot",
    "QuantFormat": "svdq_jax.formats",
    "quantize_devices": "svdq_jax.params",
    "quantize_model": "svdq_jax.params",
    "quantize_params": "svdq_jax.params",
    "selected_kernels": "svdq_jax.params",
    "SVDQLinear": "svdq_jax.qlinear",
    "is_quantized": "svdq_jax.qlinear",
    "merge_lora": "svdq_jax.transform",
    "quantize_linear": "svdq_jax.transform",
}
"""Public names and their modules. They are imported on first use, so importing a light
submodule (svdq_jax.errors, through convert.CheckpointReader) does not load jax
and flax."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  """A public name of `_EXPORTS`, imported from its module on first access and then cached as a
  module global (so later lookups do not come here)."""
  if name not in _EXPORTS:
    raise AttributeError(f"module 'svdq_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  """The public names, imported or not, for `dir(svdq_jax)` and completion."""
  return sorted({name for name in globals() if name.startswith("__")} | set(_EXPORTS))

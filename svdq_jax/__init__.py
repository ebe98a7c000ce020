"""svdq-jax: SVDQuant (4-bit weights and activations plus a 16-bit low-rank branch) for JAX.

A whole model is quantized by three calls:

    stats = calibrate(model, inputs)                      # per-linear activation statistics
    state = quantize_params(nnx.state(model), stats, QuantConfig.preset("svdquant-int4"))
    nnx.update(model, state)                              # or quantize_model(model, stats, config)
"""

from svdq_jax.calibration import ActivationStats, calibrate
from svdq_jax.config import PRESETS, QuantConfig
from svdq_jax.dot import svdq_dot
from svdq_jax.params import quantize_model, quantize_params, selected_kernels
from svdq_jax.qlinear import SVDQLinear, is_quantized
from svdq_jax.transform import merge_lora, quantize_linear

__all__ = [
    "PRESETS",
    "ActivationStats",
    "QuantConfig",
    "SVDQLinear",
    "calibrate",
    "is_quantized",
    "merge_lora",
    "quantize_linear",
    "quantize_model",
    "quantize_params",
    "selected_kernels",
    "svdq_dot",
]

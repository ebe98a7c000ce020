"""Fused SVDQuant INT4 linear for Hopper (Mosaic GPU): two kernels and their jnp references."""

from pallas_kernels.svdq_linear.api import (
    is_supported,
    quantize_activations,
    svdq_linear,
    unsupported_reason,
    w4a4_gemm,
)
from pallas_kernels.svdq_linear.config import (
    GemmConfig,
    QuantizeConfig,
    SVDQLinearConfig,
    select_config,
)
from pallas_kernels.svdq_linear.reference import (
    pack_int4,
    quantize_activations_reference,
    svdq_linear_reference,
    unpack_int4,
    w4a4_gemm_reference,
)

__all__ = [
    "GemmConfig",
    "QuantizeConfig",
    "SVDQLinearConfig",
    "is_supported",
    "pack_int4",
    "quantize_activations",
    "quantize_activations_reference",
    "select_config",
    "svdq_linear",
    "svdq_linear_reference",
    "unpack_int4",
    "unsupported_reason",
    "w4a4_gemm",
    "w4a4_gemm_reference",
]

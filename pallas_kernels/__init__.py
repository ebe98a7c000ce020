"""Fused Pallas (Mosaic GPU) kernels for Hopper; one sub-package per fused op, each with its
jnp reference. `svdq_linear` is the SVDQuant INT4 linear that `svdq_jax` dispatches to."""

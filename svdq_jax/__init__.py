"""svdq-jax: SVDQuant (4-bit weights and activations plus a 16-bit low-rank branch) for JAX."""

from svdq_jax.dot import svdq_dot

__all__ = ["svdq_dot"]

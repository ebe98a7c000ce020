"""FLUX's rectified-flow training objective, shared by the demo's training and LoRA training.

For clean packed latents x0, noise e and a noise level t drawn logit-normally (SD3 / FLUX
training), x_t = (1 - t) x0 + t e and the transformer predicts the velocity e - x0 (the Euler
scheduler steps x along it from t = 1 to 0); the loss is the mean squared error.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def flow_matching_loss(velocity: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array,
                       key: jax.Array) -> jax.Array:
  """The rectified-flow loss of `velocity(x_t (B, S, C), t (B,)) -> (B, S, C)` on clean latents
  x0 (B, S, C): a scalar in x0's dtype. `key` draws t and the noise."""
  key_t, key_noise = jax.random.split(key)
  noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  t = jax.nn.sigmoid(jax.random.normal(key_t, (x0.shape[0],), x0.dtype))
  x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
  return jnp.square(velocity(x_t, t) - (noise - x0)).mean()

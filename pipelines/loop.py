"""The denoising loop every pipeline runs, as one jitted function.

A pipeline's step is a pure function `step(state, schedule, i, carry, *conditions) -> carry` with
`carry = (latents, scheduler_state)`. Without a progress bar the whole loop is one
`lax.fori_loop` in one `jax.jit` (compiled once per shape: batch, resolution, number of steps), on
one device or data-parallel over `devices` with `models.sharding.data_parallel` (weights
replicated, batch split). With a progress bar the one-step body is compiled on its own and called
once per step from Python, which waits for each step and advances a tqdm bar; that keeps host
callbacks out of the compiled loop (under data parallelism a callback would fire once per
device). `python benchmarks/sampling.py --progress-overhead` measures both ways.

Latents that turn NaN or inf (a 16-bit overflow, a broken weight) raise `NonFiniteError` naming
the first such step, and pixels the VAE decodes to NaN or inf raise it naming the VAE, so no black
image is ever returned as if the run had worked. The fused loop finds that step with one
`isfinite` reduction per step inside the loop.

Sharded weights (`shard_weights="fsdp"` or `"channels"`, `models.sharding.weight_shardings`): the
parameters are split over the devices and the loop is one `jax.jit` over the sharded parameters
and the batch split along "data", partitioned by XLA (no `shard_map`), so no device holds the
whole model.

Several processes: every process calls `denoise` with the same whole-batch host values; the
returned latents are a global array (`models.sharding.local_rows` reads this process's rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from models import schedulers, sharding
from svdq_jax.errors import InputError


class NonFiniteError(RuntimeError):
  """Sampling produced NaN or inf values; the message names the component and the step."""


def _finite_rows(x: jax.Array) -> jax.Array:
  """(B,) bool: whether every value of each batch row of x (B, ...) is finite."""
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _raise_at_step(step: int, num_steps: int, denoiser: str) -> None:
  raise NonFiniteError(f"the {denoiser} made the latents NaN or inf at denoising step {step + 1} "
                       f"of {num_steps} (a 16-bit overflow, or NaN/inf weights); no image written")


def jit_module(module: nnx.Module, method: str = "__call__") -> Callable[..., Any]:
  """`module.method` jitted with the parameters as an argument (not baked in as constants)."""
  graphdef, state = nnx.split(module)

  def call(state, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  jitted = jax.jit(call)
  return lambda *args, **kwargs: jitted(state, *args, **kwargs)


def to_images(decoded: jax.Array) -> np.ndarray:
  """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1] (diffusers' "np").

  Raises:
    NonFiniteError when the VAE decoded NaN or inf pixels.
  """
  images = np.asarray(decoded, np.float32).transpose(0, 2, 3, 1)
  if not np.all(np.isfinite(images)):
    raise NonFiniteError("the vae decoded NaN or inf pixels from finite latents (a 16-bit "
                         "overflow, or NaN/inf weights); no image written")
  return np.clip(images / 2 + 0.5, 0.0, 1.0)


def fused_loop(step: Callable[..., Any], scheduler: schedulers.Scheduler
               ) -> Callable[..., jax.Array]:
  """`denoise(state, schedule, latents, *conditions) -> latents`: every step in one fori_loop."""

  def denoise(state, schedule, latents, *conditions):
    return _checked_loop(step, scheduler)(state, schedule, latents, *conditions)[0]

  return denoise


def _checked_loop(step: Callable[..., Any], scheduler: schedulers.Scheduler
                  ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Like `fused_loop`, returning (latents, first_bad (B,) int32): per batch row, the first step
  after which its latents held NaN or inf, or -1; one `isfinite` reduction per step."""

  def denoise(state, schedule, latents, *conditions):
    def body(i, carry):
      carry, first_bad = carry
      carry = step(state, schedule, i, carry, *conditions)
      first_bad = jnp.where((first_bad < 0) & ~_finite_rows(carry[0]), i, first_bad)
      return carry, first_bad

    init = ((latents, scheduler.init_state(latents)),
            jnp.full((latents.shape[0],), -1, jnp.int32))
    carry, first_bad = jax.lax.fori_loop(0, schedule.num_steps, body, init)
    return carry[0], first_bad

  return denoise


def denoise(make_step: Callable[[bool], Callable[..., Any]], scheduler: schedulers.Scheduler,
             runners: dict, *, state: Any, schedule: schedulers.Schedule, latents: jax.Array,
             conditions: tuple, condition_axes: tuple, devices: int | None, progress: bool,
             jit: bool, denoiser: str = "transformer", shard_weights: str | None = None
             ) -> jax.Array:
  """Runs the denoising loop and returns the final latents.

  Raises NonFiniteError, naming the first step and the `denoiser` ("transformer", "unet"), when
  the latents turn NaN or inf.

  jit and no progress: the fused loop, jitted (or data-parallel over `devices`). jit and
  progress: the jitted one-step body, called per step with a tqdm bar. Not jit: eager steps in
  Python (calibration). `runners` caches the compiled functions per (mode, device count, number
  of conditions, weight sharding). shard_weights: "fsdp" or "channels" splits the parameters over
  the `devices` (see the module docstring); the fused loop only.
  """
  num_steps = schedule.num_steps
  carry = (latents, scheduler.init_state(latents))
  if not jit:
    step = make_step(True)
    for i in range(num_steps):
      carry = step(state, schedule, jnp.int32(i), carry, *conditions)
      if not bool(jnp.all(jnp.isfinite(carry[0]))):
        _raise_at_step(i, num_steps, denoiser)
    return carry[0]
  count = devices or 1
  if shard_weights is not None:
    if progress:
      raise InputError("sharded weights run the fused loop only: sample without a progress bar")
    latents, first_bad = _sharded_run(make_step, scheduler, runners, state, schedule, latents,
                                      conditions, condition_axes, count, shard_weights)
    _check_first_bad(first_bad, num_steps, denoiser)
    return latents
  key = ("per-step" if progress else "fused", count, len(conditions))
  if key not in runners:
    step = make_step(False)
    fn, axes = ((step, (None, None, None, 0, *condition_axes)) if progress
                else (_checked_loop(step, scheduler), (None, None, 0, *condition_axes)))
    runners[key] = (jax.jit(fn) if count == 1
                    else sharding.data_parallel(fn, devices=count, in_axes=axes))
  run = runners[key]
  if not progress:
    latents, first_bad = run(state, schedule, latents, *conditions)
    _check_first_bad(first_bad, num_steps, denoiser)
    return latents
  if count > 1:  # placed once here, so the per-step calls find the weights already replicated
    state, schedule = sharding.replicate((state, schedule), run.mesh)
  with tqdm(total=num_steps, desc="denoising", unit="step") as bar:
    for i in range(num_steps):
      carry = jax.block_until_ready(run(state, schedule, jnp.int32(i), carry, *conditions))
      if not bool(jnp.all(jnp.isfinite(carry[0]))):
        _raise_at_step(i, num_steps, denoiser)
      bar.update(1)
  return carry[0]


def _check_first_bad(first_bad: jax.Array, num_steps: int, denoiser: str) -> None:
  bad = sharding.to_host(first_bad)
  if np.any(bad >= 0):
    _raise_at_step(int(bad[bad >= 0].min()), num_steps, denoiser)


def _sharded_run(make_step, scheduler, runners, state, schedule, latents, conditions,
                 condition_axes, count, mode) -> tuple[jax.Array, jax.Array]:
  """The fused loop as one jit over parameters split by `weight_shardings(mode)` and the batch
  (padded to a multiple of `count`) split along "data"; returns the trimmed outputs."""
  key = ("sharded", count, len(conditions), mode)
  if key not in runners:
    mesh = sharding.data_mesh(count)
    runners[key] = (mesh, jax.jit(_checked_loop(make_step(False), scheduler)), {})
  mesh, run, placed = runners[key]
  if placed.get("source") is not state:  # the parameters are split once per state
    placed.clear()
    placed.update(source=state, state=jax.device_put(
        state, sharding.weight_shardings(state, mesh, mode)))
  batched = (latents, *(c for c, a in zip(conditions, condition_axes, strict=True) if a == 0))
  padded, size = sharding.pad_batch(batched, count)
  padded = iter(sharding.shard_batch(padded, mesh))
  args = [next(padded)] + [next(padded) if a == 0 else sharding.replicate(c, mesh)
                           for c, a in zip(conditions, condition_axes, strict=True)]
  out_latents, first_bad = run(placed["state"], sharding.replicate(schedule, mesh), *args)
  if size % count:
    out_latents, first_bad = out_latents[:size], first_bad[:size]
  return out_latents, first_bad

"""Data-parallel sampling on 8 virtual CPU devices equals the same sampling on one device.

The 8-device runs happen in a subprocess: the device count must be set before jax starts, and the
test session's jax is already running on one CPU device.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from models import sharding

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import jax.numpy as jnp
  import numpy as np
  from models import schedulers, sharding

  assert jax.device_count() == 8, jax.devices()
  sched = schedulers.FlowMatchEulerScheduler(shift=3.0)
  schedule = sched.schedule(6)

  def denoise(weights, latents, cond):
    # A toy velocity model (2-layer MLP on latents + per-example condition) in a fori_loop.
    w1, w2 = weights
    def body(i, x):
      h = jax.nn.gelu(jnp.concatenate([x, cond], -1) @ w1 + schedule.timesteps[i] / 1000)
      x, _ = sched.step(schedule, (), i, h @ w2, x)
      return x
    return jax.lax.fori_loop(0, schedule.num_steps, body, latents)

  rng = np.random.default_rng(0)
  weights = (jnp.asarray(rng.standard_normal((24, 32), np.float32) / 5),
             jnp.asarray(rng.standard_normal((32, 16), np.float32) / 5))
  latents = jnp.asarray(rng.standard_normal((8, 5, 16), np.float32))
  cond = jnp.asarray(rng.standard_normal((8, 5, 8), np.float32))

  one = sharding.data_parallel(denoise, devices=1, in_axes=(None, 0, 0))(weights, latents, cond)
  eight_fn = sharding.data_parallel(denoise, devices=8, in_axes=(None, 0, 0))
  eight = eight_fn(weights, latents, cond)
  assert len(eight.sharding.device_set) == 8, eight.sharding
  # 6 items on 8 devices: padded to 8 and cut back.
  six = eight_fn(weights, latents[:6], cond[:6])
  # One example at a time, plain jit on the default device: the unsharded reference.
  alone = np.stack([np.asarray(jax.jit(denoise)(weights, latents[i:i+1], cond[i:i+1]))[0]
                    for i in range(8)])
  np.save(OUT + "/one.npy", np.asarray(one))
  np.save(OUT + "/eight.npy", np.asarray(eight))
  np.save(OUT + "/six.npy", np.asarray(six))
  np.save(OUT + "/alone.npy", alone)
  # Replicated weights with zero-size leaves (an SVDQLinear of low rank 0) used inside the
  # per-device function: as inputs of the shard_map they crashed XLA's compiler (jax 0.11.2).
  def lowrank(w, x):
    return x @ w["kernel"] + (x @ w["lora_down"]) @ w["lora_up"]
  w = {"kernel": weights[1], "lora_down": jnp.zeros((32, 0)), "lora_up": jnp.zeros((0, 16))}
  x = jnp.asarray(rng.standard_normal((6, 32), np.float32))
  np.save(OUT + "/lowrank_x.npy", np.asarray(x))
  np.save(OUT + "/lowrank_w.npy", np.asarray(weights[1]))
  np.save(OUT + "/lowrank.npy", np.asarray(
      sharding.data_parallel(lowrank, devices=8, in_axes=(None, 0))(w, x)))
""")


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  code = f"OUT = {str(tmp_path)!r}\n" + SCRIPT
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, eight, six, alone = (np.load(tmp_path / f"{n}.npy") for n in ("one", "eight", "six",
                                                                      "alone"))
  assert eight.shape == (8, 5, 16) and six.shape == (6, 5, 16)
  np.testing.assert_array_equal(eight, one)
  np.testing.assert_array_equal(six, eight[:6])
  np.testing.assert_allclose(eight, alone, rtol=1e-6, atol=1e-6)
  x, w = np.load(tmp_path / "lowrank_x.npy"), np.load(tmp_path / "lowrank_w.npy")
  np.testing.assert_allclose(np.load(tmp_path / "lowrank.npy"), x @ w, rtol=1e-5, atol=1e-5)


def test_pad_batch_repeats_last_item():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  (padded,), size = sharding.pad_batch((x,), 4)
  assert size == 3
  np.testing.assert_array_equal(np.asarray(padded), np.concatenate([x, x[-1:]]))


def test_too_many_devices_is_a_clear_error():
  with pytest.raises(ValueError, match=f"asked for {jax.device_count() + 1} devices"):
    sharding.data_mesh(jax.device_count() + 1)


def test_in_axes_are_checked():
  run = sharding.data_parallel(lambda a, b: a + b, devices=1, in_axes=(0, 1))
  with pytest.raises(ValueError, match="in_axes must be 0 or None"):
    run(np.ones((2, 3)), np.ones((2, 3)))

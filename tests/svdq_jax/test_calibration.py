"""The calibration recorder: a layer's statistics depend only on the rows it saw."""

import jax.numpy as jnp
import numpy as np

from svdq_jax.calibration import Recorder


def test_layer_sample_does_not_depend_on_the_order_layers_run_in():
  """Streamed quantization records block by block, `calibrate` step by step: each layer draws
  its sample keys from its own generator, so interleaving other layers changes nothing, while
  another seed does change the sample (more rows than `max_samples`)."""
  rng = np.random.default_rng(0)
  a, b = jnp.zeros((4, 8)), jnp.zeros((4, 16))
  rows_a = [rng.standard_normal((30, 8)).astype(np.float32) for _ in range(3)]
  rows_b = [rng.standard_normal((30, 16)).astype(np.float32) for _ in range(3)]
  paths = {id(a): "blocks/0/a/kernel", id(b): "blocks/1/b/kernel"}

  def record(order, seed=0):
    recorder = Recorder(paths, max_samples=20, seed=seed)
    for kernel, rows in order:
      recorder.record(kernel, jnp.asarray(rows))
    return recorder.stats()

  interleaved = record([pair for i in range(3) for pair in ((a, rows_a[i]), (b, rows_b[i]))])
  by_layer = record([(a, r) for r in rows_a] + [(b, r) for r in rows_b])
  for path in paths.values():
    np.testing.assert_array_equal(interleaved[path].samples, by_layer[path].samples)
    np.testing.assert_array_equal(interleaved[path].maximum, by_layer[path].maximum)
  assert interleaved["blocks/0/a/kernel"].samples.shape == (20, 8)
  assert interleaved["blocks/0/a/kernel"].num_tokens == 90
  other_seed = record([(a, r) for r in rows_a], seed=1)
  assert not np.array_equal(other_seed["blocks/0/a/kernel"].samples,
                            by_layer["blocks/0/a/kernel"].samples)
  every_row = np.concatenate(rows_a)
  sample = by_layer["blocks/0/a/kernel"].samples
  assert all(any(np.array_equal(row, r) for r in every_row) for row in sample)

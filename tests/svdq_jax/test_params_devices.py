"""`quantize_params(devices=...)`: the layers spread over several devices give the same arrays,
bit for bit, as one device.

The several-device run is a subprocess with 4 virtual CPU devices (the device count must be set
before jax starts; this session's jax runs on one).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import QuantConfig, quantize_devices, quantize_params
from svdq_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[2]

# A tiny FLUX transformer of width 64 (one INT4 group) in Nunchaku's layout (q/k/v fused), random
# weights and calibration rows; only the attention linears are quantized (two kernel shapes, so
# few compilations per device). `_quantize_arrays` is wrapped to record the device of every
# kernel it receives.
SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  import svdq_jax
  from models.flux import FluxConfig, FluxTransformer
  from svdq_jax import QuantConfig, transform
  from svdq_jax.calibration import ActivationStats
  from svdq_jax.config import NUNCHAKU_FUSED
  from svdq_jax.tree import named_leaves

  ran_on = []
  inner = transform._quantize_arrays

  def recording(kernel, *args, **kwargs):
    ran_on.append(next(iter(kernel.devices())).id)
    return inner(kernel, *args, **kwargs)

  transform._quantize_arrays = recording
  config = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                      num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
                      axes_dims_rope=(4, 6, 6), split_proj_out=True)
  rng = np.random.default_rng(0)
  abstract = nnx.state(nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0))))
  state = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), abstract)
  skip = QuantConfig().skip + ("*norm*", "*ff*", "*proj_mlp*", "*proj_out_mlp*")
  quant = QuantConfig.preset("svdquant-int4", rank=4, smooth=(0.5,), svd_iters=1,
                             fused=NUNCHAKU_FUSED, skip=skip)
  shapes = dict(named_leaves(state))
  stats = {}
  for path in svdq_jax.selected_kernels(state, quant):
    x = rng.normal(size=(40, shapes[path].shape[0])).astype(np.float32)
    stats[path] = ActivationStats(x.min(0), x.max(0), x, 40)
  arrays, record = {}, {"selected": sorted(stats),
                        "default": [d.id for d in svdq_jax.quantize_devices()]}
  for count in (4, 1):
    ran_on.clear()
    out = svdq_jax.quantize_params(state, stats, quant, progress=False, devices=count)
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
      arrays[f"{count}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    record[f"ran_on_{count}"] = list(ran_on)
    record[f"result_devices_{count}"] = sorted({d.id for leaf in jax.tree.leaves(out)
                                                for d in leaf.devices()})
  np.savez(sys.argv[1] + "/arrays.npz", **arrays)
  with open(sys.argv[1] + "/record.json", "w") as f:
    json.dump(record, f)
""")


@pytest.mark.slow
def test_four_devices_give_the_arrays_of_one(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((tmp_path / "record.json").read_text())
  arrays = dict(np.load(tmp_path / "arrays.npz"))
  # double block: fused q/k/v, fused added q/k/v, to_out, to_add_out; single block: fused q/k/v
  # (the joint to_q/to_k/to_v) and proj_out: 6 transforms.
  assert len(record["selected"]) == 12
  assert len(record["ran_on_1"]) == len(record["ran_on_4"]) == 6
  assert set(record["ran_on_4"]) == {0, 1, 2, 3} and set(record["ran_on_1"]) == {0}
  assert record["result_devices_4"] == record["result_devices_1"] == [0]
  assert record["default"] == [0]  # by default one CPU device: its virtual ones share the cores
  one = {key[1:]: value for key, value in arrays.items() if key.startswith("1")}
  four = {key[1:]: value for key, value in arrays.items() if key.startswith("4")}
  assert sorted(one) == sorted(four) and any("qweight" in key for key in one)
  for key, value in one.items():
    assert four[key].dtype == value.dtype, key
    np.testing.assert_array_equal(four[key], value, err_msg=key)


def test_quantize_devices_resolves_counts_and_refuses_bad_ones():
  local = jax.local_devices()
  default = local[:1] if local[0].platform == "cpu" else local  # virtual CPU devices share cores
  assert quantize_devices() == default and quantize_devices(1) == local[:1]
  assert quantize_devices(local[:1]) == local[:1]
  for bad in (0, len(local) + 1):
    with pytest.raises(InputError, match=f"asked for {bad} devices"):
      quantize_devices(bad)
  with pytest.raises(InputError, match="devices is empty"):
    quantize_devices([])


def test_explicit_device_list_gives_the_default_result():
  """On this session's one device: devices=[it] and devices=None are the same run."""
  rng = np.random.default_rng(1)
  params = {"layer": {"kernel": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}}
  config = QuantConfig.preset("w4a4")
  default = quantize_params(params, None, config, progress=False)
  explicit = quantize_params(params, None, config, progress=False,
                             devices=jax.local_devices()[:1])
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(InputError, match="asked for"):
    quantize_params(params, None, config, progress=False, devices=len(jax.local_devices()) + 1)

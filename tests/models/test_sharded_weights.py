"""Sharded weights: the tiny FLUX pipeline's transformer (float, and quantized svdquant-int4)
split over 8 virtual CPU devices, FSDP-style and by output channels, samples the images of the
unsharded run; each device holds a fraction of the parameters (from the arrays' shardings).

The sampling runs in a subprocess: the device count must be set before jax starts. The int4 runs
also cover the replicated (data-parallel) path with zero-size parameters: the weight-only layers'
low-rank factors have rank 0, which crashed XLA's compiler as `shard_map` inputs
(`models.sharding.data_parallel` works around it).
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

from models import sharding
from svdq_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5

SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np
  from flax import nnx
  import pipelines
  from models import sharding
  from svdq_jax import QuantConfig, SVDQLinear
  folder, out = sys.argv[1], sys.argv[2]
  pipe = pipelines.FluxPipeline.from_pretrained(folder)
  prompts = [f"a {c} {a} in snow" for c in ("red", "blue", "green") for a in ("cat", "dog")]
  kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, seed=5)
  images, record = {}, {}
  mesh = sharding.data_mesh(8)
  for name in ("float", "int4"):
    if name == "int4":
      pipelines.quantize_denoiser(pipe, QuantConfig.preset("svdquant-int4"), prompts[:2],
                                  num_inference_steps=2, height=32, width=32,
                                  max_sequence_length=16, progress=False)
    images[f"{name}_replicated"] = pipe(prompts, devices=8, **kw)
    state = nnx.state(pipe.transformer)
    record[f"{name}_total"] = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    record[f"{name}_empty"] = sum(leaf.size == 0 for leaf in jax.tree.leaves(state))
    for mode in ("fsdp", "channels"):
      images[f"{name}_{mode}"] = pipe(prompts, devices=8, shard_weights=mode, **kw)
      placed = jax.device_put(state, sharding.weight_shardings(state, mesh, mode))
      record[f"{name}_{mode}_bytes"] = sorted(sharding.bytes_per_device(placed).values())
      layers = [leaf for leaf in jax.tree.leaves(placed, is_leaf=lambda x: isinstance(
          x, SVDQLinear)) if isinstance(leaf, SVDQLinear)]
      record[f"{name}_{mode}_split_qweights"] = sum(
          not leaf.qweight.sharding.is_fully_replicated for leaf in layers)
      record[f"{name}_{mode}_qweights"] = len(layers)
  np.savez(out + "/images.npz", **images)
  with open(out + "/record.json", "w") as f:
    json.dump(record, f)
""")


def _run_on_eight_devices(script: str, tmp_path: Path) -> tuple[dict, dict]:
  """Runs `script FOLDER OUT` in a fresh process (the device count is set before jax starts) on
  the tiny FLUX pipeline of width 64 (one INT4 group); its (images.npz, record.json)."""
  pytest.importorskip("torch")
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  folder = tmp_path / "flux"
  save_tiny_flux_pipeline(folder, heads=4)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(tmp_path / "images.npz")), json.loads((tmp_path / "record.json").read_text())


@pytest.mark.slow
def test_sharded_weights_sample_the_unsharded_images(tmp_path):
  images, record = _run_on_eight_devices(SCRIPT, tmp_path)
  for name in ("float", "int4"):
    replicated = images[f"{name}_replicated"]
    for mode in ("fsdp", "channels"):
      sharded = images[f"{name}_{mode}"]
      assert sharded.shape == (6, 32, 32, 3)  # 6 prompts on 8 devices: padded and cut
      # Against the unsharded run (data parallelism, weights replicated) on the same 8 devices:
      # the same math; only float32 summation orders may differ (a partitioned matmul adds
      # its partial sums in another order, and the batch is split otherwise).
      np.testing.assert_allclose(sharded, replicated, rtol=0, atol=TOLERANCE)
      per_device = record[f"{name}_{mode}_bytes"]
      assert len(per_device) == 8
      total = record[f"{name}_total"]
      # Every device holds well under the whole model (what cannot be split is replicated).
      assert max(per_device) < total / 2, (name, mode, per_device, total)
    assert np.abs(replicated[0] - replicated[1]).max() > 1e-3  # other prompt, other image
  assert record["int4_fsdp_qweights"] > 0
  assert record["int4_empty"] > 0  # rank-0 low-rank factors went through the replicated run
  for mode in ("fsdp", "channels"):
    assert record[f"int4_{mode}_split_qweights"] == record[f"int4_{mode}_qweights"]


def test_weight_shardings_split_the_axes_they_name():
  mesh = sharding.data_mesh(1)
  state = {"block": {"kernel": jax.ShapeDtypeStruct((6, 8), jnp.float32),
                     "lora_down": jax.ShapeDtypeStruct((6, 2), jnp.float32)}}
  channels = sharding.weight_shardings(state, mesh, "channels")
  assert channels["block"]["kernel"].spec == jax.sharding.PartitionSpec(None, "data")
  assert channels["block"]["lora_down"].spec == jax.sharding.PartitionSpec()
  fsdp = sharding.weight_shardings(state, mesh, "fsdp")
  assert fsdp["block"]["kernel"].spec == jax.sharding.PartitionSpec(None, "data")  # the larger
  assert fsdp["block"]["lora_down"].spec == jax.sharding.PartitionSpec("data", None)
  with pytest.raises(InputError, match="unknown weight sharding 'rows'"):
    sharding.weight_shardings(state, mesh, "rows")


def test_split_axis_rules():
  assert sharding._split_axis("kernel", (64, 96), 8, "channels") == 1
  assert sharding._split_axis("qweight", (96, 32), 8, "channels") == 0
  assert sharding._split_axis("wscales", (1, 96), 8, "channels") == 1
  assert sharding._split_axis("kernel", (64, 90), 8, "channels") is None  # 90 % 8: replicated
  assert sharding._split_axis("smooth", (64,), 8, "channels") is None
  assert sharding._split_axis("anything", (64, 96), 8, "fsdp") == 1
  assert sharding._split_axis("anything", (64, 90), 8, "fsdp") == 0
  assert sharding._split_axis("wtscale", (), 8, "fsdp") is None


LOAD_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import numpy as np
  from flax import nnx
  import pipelines
  from convert.loading import load_pretrained
  from models import sharding
  folder, out = sys.argv[1], sys.argv[2]
  pipe = pipelines.FluxPipeline.from_pretrained(folder)
  prompts = ["a red cat in snow", "a blue dog", "a green bird on a tree"]
  kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, seed=5)
  images = {"replicated": pipe(prompts, devices=8, **kw)}
  record = {"total": sum(x.nbytes for x in jax.tree.leaves(nnx.state(pipe.transformer)))}
  mesh = sharding.data_mesh(8)
  for mode in ("fsdp", "channels"):
    if mode == "fsdp":  # the pipeline's own option (what `svdq-jax sample --shard-weights` uses)
      sharded_pipe = pipelines.FluxPipeline.from_pretrained(folder, shard_weights=mode, devices=8)
    else:
      sharded_pipe = pipe.with_transformer(
          load_pretrained(folder + "/transformer", "flux", shard_weights=mode, devices=8))
    state = nnx.state(sharded_pipe.transformer)
    expected = sharding.weight_shardings(state, mesh, mode)
    record[mode + "_as_placed"] = all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True))
    record[mode + "_bytes"] = sorted(sharding.bytes_per_device(state).values())
    images[mode] = sharded_pipe(prompts, devices=8, shard_weights=mode, **kw)
  np.savez(out + "/images.npz", **images)
  with open(out + "/record.json", "w") as f:
    json.dump(record, f)
""")


@pytest.mark.slow
def test_loading_straight_into_shards(tmp_path):
  """`FluxPipeline.from_pretrained(..., shard_weights="fsdp", devices=8)` and
  `load_pretrained(..., shard_weights="channels", devices=8)` place every parameter at its
  `weight_shardings` placement as it is read (no device gets the whole model), and the pipeline
  sampling with those weights gives the images of the replicated run."""
  images, record = _run_on_eight_devices(LOAD_SCRIPT, tmp_path)
  for mode in ("fsdp", "channels"):
    assert record[f"{mode}_as_placed"], mode
    per_device = record[f"{mode}_bytes"]
    assert len(per_device) == 8 and max(per_device) < record["total"] / 2, (mode, per_device)
    assert images[mode].shape == (3, 32, 32, 3)
    np.testing.assert_allclose(images[mode], images["replicated"], rtol=0, atol=TOLERANCE)


def test_loading_into_an_unknown_sharding_is_refused(tmp_path):
  from convert.loading import load_pretrained

  with pytest.raises(InputError, match="unknown weight sharding 'rows'"):
    load_pretrained(tmp_path, "flux", shard_weights="rows")

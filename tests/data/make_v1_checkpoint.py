"""Writes tests/data/v1_checkpoint: a tiny quantized checkpoint in the first layer-metadata format.

Each quantized layer's header entry holds the whole `QuantConfig` ("config"), as `SVDQLinear`
wrote it before layers carried only their format. tests/svdq_jax/test_legacy_checkpoint.py loads
it with today's code. Run once from the repository root, with the code of that format:

    JAX_PLATFORMS=cpu python -m tests.data.make_v1_checkpoint

Layers of the tiny model (tests/convert/_tiny.py, in_features 64, hidden 128, 3 blocks):
proj_in INT4 W4A4 (signed) rank 8, blocks/0 INT4 with shifted (post-GELU) inputs rank 8,
blocks/1 NVFP4 rank 8, blocks/2 NF4 W4A16, proj_out INT8 W8A8; the biases stay float32.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.checkpoint import write_checkpoint
from convert.loading import path_str
from svdq_jax import QuantConfig, quantize_linear
from tests.convert import _tiny

DST = Path(__file__).parent / "v1_checkpoint"
CONFIG = _tiny.TinyConfig(in_features=64, hidden_size=128, num_layers=3)
LAYERS = {
    "proj_in/kernel": ("svdquant-int4", "normal"),
    "blocks/0/kernel": ("svdquant-int4", "gelu"),
    "blocks/1/kernel": ("svdquant-nvfp4", "normal"),
    "blocks/2/kernel": ("nf4-w4a16", "normal"),
    "proj_out/kernel": ("w8a8", "normal"),
}


def main() -> None:
  model = _tiny.TinyNet(CONFIG, rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  arrays = {path_str(path): np.asarray(variable.get_value()) for path, variable in flat}
  rng = np.random.default_rng(0)
  for path, (preset, inputs) in LAYERS.items():
    kernel = jnp.asarray(arrays[path])
    samples = rng.standard_normal((64, kernel.shape[0])).astype(np.float32)
    samples[:, 3] *= 10
    if inputs == "gelu":
      samples = np.asarray(jax.nn.gelu(jnp.asarray(samples)))
    overrides = {"rank": 8, "svd_iters": 1} if QuantConfig.preset(preset).rank else {}
    config = QuantConfig.preset(preset, **overrides)
    arrays[path] = quantize_linear(kernel, None, jnp.asarray(samples), config, name=path)
  with pytest.MonkeyPatch.context() as patch:
    _tiny.register(patch)
    write_checkpoint(arrays, DST, model_type="tiny", config=CONFIG, overwrite=True)
  print(f"wrote {DST}")


if __name__ == "__main__":
  main()

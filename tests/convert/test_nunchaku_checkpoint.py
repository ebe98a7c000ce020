"""convert.nunchaku_checkpoint: a synthetic Nunchaku FLUX single file, built with DeepCompressor's
packer from random quantized layers, imported and run; and the one-line errors."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import nunchaku as nk
from convert import nunchaku_checkpoint as nc
from convert.safetensors_io import CheckpointError, CheckpointReader, save_file
from models.flux import FluxTransformer
from tests.convert._nunchaku_file import SMALL, build_nunchaku_file, flux_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_import_runs_like_the_float_model_it_quantizes(precision, tmp_path, np_rng):
  src = tmp_path / f"svdq-{precision}_r32-flux.1-tiny.safetensors"
  params = build_nunchaku_file(src, SMALL, np_rng, precision=precision)
  dst = nc.import_nunchaku(src, tmp_path / "imported", progress=False)
  model = FluxTransformer.from_pretrained(dst)
  assert model.config.split_proj_out
  kernel = model.transformer_blocks[0].ff.net[2].kernel.get_value()
  assert kernel.rank == 32 and kernel.weight_format == precision
  assert kernel.act_shift == (nk.GELU_SHIFT if precision == "int4" else 0.0)
  to_q = model.single_transformer_blocks[0].attn.to_q.kernel.get_value()
  assert (to_q.wcscales is not None) == (precision == "nvfp4")
  reference = FluxTransformer(dataclasses.replace(SMALL, split_proj_out=True),
                              rngs=nnx.Rngs(0))
  state = nnx.state(reference, nnx.Param)
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(jnp.asarray(params["/".join(map(str, path))]))
  nnx.update(reference, state)
  inputs = flux_inputs(SMALL)
  y = np.asarray(nnx.jit(lambda m, i: m(**i))(model, inputs))
  want = np.asarray(nnx.jit(lambda m, i: m(**i))(reference, inputs))
  rel = np.linalg.norm(y - want) / np.linalg.norm(want)
  assert rel < 0.15, rel  # 4-bit activations; a wrong layout or mapping gives ~1


def test_import_errors_are_one_line_and_write_nothing(tmp_path, np_rng):
  src = tmp_path / "n.safetensors"
  build_nunchaku_file(src, SMALL, np_rng)
  reader = CheckpointReader(src)
  tensors = {k: np.asarray(reader.get(k)) for k in reader.keys()}
  meta = dict(reader.metadata)

  def write(name, tensors=tensors, **changes):
    path = tmp_path / name
    save_file(tensors, path, metadata={**meta, **changes})
    return path

  cases = [
      (write("sdxl.safetensors", model_class="NunchakuSDXLUNet2DConditionModel"),
       "config is for 'FluxTransformer2DModel'"),
      (write("sana.safetensors", model_class="NunchakuSanaTransformer2DModel"), "not supported"),
      (write("r20.safetensors", quantization_config=meta["quantization_config"].replace(
          '"rank": 32', '"rank": 20')), "rank 20"),
      (write("missing.safetensors", {k: v for k, v in tensors.items()
                                     if "single_transformer_blocks.0.mlp_fc2" not in k}),
       "missing quantized layer 'single_transformer_blocks.0.mlp_fc2'"),
      (write("shape.safetensors", tensors | {"transformer_blocks.0.out_proj.bias":
                                             tensors["transformer_blocks.0.out_proj.bias"][:64]}),
       "transformer_blocks.0.out_proj: tensor 'bias'"),
  ]
  plain = tmp_path / "plain.safetensors"
  save_file({"x": np.zeros(2, np.float32)}, plain)
  cases.append((plain, "not a Nunchaku checkpoint"))
  for path, match in cases:
    with pytest.raises(CheckpointError, match=match) as info:
      nc.import_nunchaku(path, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

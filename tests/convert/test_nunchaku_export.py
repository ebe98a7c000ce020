"""convert.nunchaku_export: a small FLUX model quantized by us in Nunchaku's layout, exported to a
Nunchaku single file and imported back (same layers up to the documented bf16 rounding, nearly the
same output, and a second export byte-identical); the layout checks and one-line errors."""

import dataclasses
import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from cli import main as cli
from convert import nunchaku as nk
from convert import nunchaku_checkpoint as nc
from convert.checkpoint import read_arrays, save_checkpoint, write_checkpoint
from convert.nunchaku_export import export_nunchaku, split_proj_out
from convert.safetensors_io import CheckpointError, CheckpointReader
from models.flux import FluxTransformer
from svdq_jax import QuantConfig, calibrate, is_quantized, quantize_model
from svdq_jax.config import NUNCHAKU_FUSED, NUNCHAKU_SHIFTED
from tests.convert._nunchaku_file import SMALL, flux_inputs

BF16 = ml_dtypes.bfloat16


def _run(model, inputs) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, i: m(**i))(model, inputs))


def _quantized(tmp_path, preset: str, rank: int, *, fused=NUNCHAKU_FUSED):
  """Our checkpoint of SMALL split and quantized (one smoothing alpha, one refinement step)."""
  model = FluxTransformer(SMALL, rngs=nnx.Rngs(0))
  split = split_proj_out(model)
  x = flux_inputs(SMALL, 9)
  np.testing.assert_allclose(_run(split, x), _run(model, x), rtol=1e-5, atol=1e-5)
  stats = calibrate(lambda kw: split(**kw), [flux_inputs(SMALL, s) for s in range(2)], model=split,
                    max_samples=64, progress=False)
  config = QuantConfig.preset(preset, rank=rank, smooth=(0.5,), svd_iters=1, fused=fused,
                              shifted=NUNCHAKU_SHIFTED)
  quantize_model(split, stats, config, progress=False)
  folder = tmp_path / f"ours-{preset}"
  save_checkpoint(split, folder, model_type="flux", config=split.config)
  return split, folder


pytestmark = pytest.mark.slow  # each precision quantizes a 2-block FLUX model (about a minute)


@pytest.fixture(scope="module", params=[("svdquant-int4", 16), ("svdquant-nvfp4", 32)],
                ids=["int4-r16", "nvfp4-r32"])
def quantized(request, tmp_path_factory):
  return request.param, _quantized(tmp_path_factory.mktemp("q"), *request.param)


def test_export_import_round_trip(quantized, tmp_path, capsys):
  (preset, rank), (ours, folder) = quantized
  file = tmp_path / "svdq-ours-flux.safetensors"
  assert cli.main(["export-nunchaku", str(folder), str(file)]) == 0, capsys.readouterr().err
  reader = CheckpointReader(file)
  meta = reader.metadata
  assert meta["model_class"] == nc.FLUX_CLASS
  quant = json.loads(meta["quantization_config"])
  precision = "int4" if preset == "svdquant-int4" else "fp4_e2m1_all"
  assert quant["weight"]["dtype"] == precision and quant["rank"] == rank
  assert json.loads(meta["config"])["_class_name"] == "FluxTransformer2DModel"
  assert reader.shape("transformer_blocks.0.qkv_proj.qweight") == (3 * 128, 64)
  assert ("single_transformer_blocks.0.qkv_proj.wtscale" in reader) == (precision != "int4")

  back_folder = nc.import_nunchaku(file, tmp_path / "back", progress=False)
  back = FluxTransformer.from_pretrained(back_folder)
  ours_arrays = {path: leaf for path, leaf in _flat(ours).items()}
  for path, got in _flat(back).items():
    want = ours_arrays[path]
    if not is_quantized(got):
      if not path.endswith("/bias") or not is_quantized(ours_arrays[path[:-4] + "kernel"]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(BF16), path)
      continue
    own = np.asarray(ours_arrays[path[: -len("kernel")] + "bias"], np.float32)
    for field in ("qweight", "wscales", "lora_down", "lora_up", "wtscale"):
      np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                    np.asarray(getattr(want, field)), f"{path} {field}")
    assert got.format == want.format and got.wcscales is None
    np.testing.assert_array_equal(np.asarray(got.smooth),
                                  np.asarray(want.smooth).astype(BF16).astype(np.float32))
    folded = (own if want.bias is None else own + np.asarray(want.bias)).astype(BF16)
    delta = _adanorm_delta(path, got.out_features)
    stored = (folded.astype(np.float32) + delta).astype(BF16)  # Nunchaku's bias holds the +1
    np.testing.assert_array_equal(np.asarray(got.bias), stored.astype(np.float32) - delta)
  x = flux_inputs(SMALL, 5)
  y, y_back = _run(ours, x), _run(back, x)
  rel = np.linalg.norm(y_back - y) / np.linalg.norm(y)
  assert rel < 2e-2, rel  # smoothing factors and biases rounded to bf16, nothing else

  again = tmp_path / "again.safetensors"
  export_nunchaku(back_folder, again, progress=False)
  assert again.read_bytes() == file.read_bytes()


def _adanorm_delta(path: str, n: int) -> np.ndarray:
  """The 1 Nunchaku adds to the bias of an AdaLN linear's scale chunks (1 and splits - 2, diffusers'
  scale_msa and scale_mlp), which makes those biases lose bits in bfloat16; zeros elsewhere."""
  splits = 6 if "/norm1" in path else 3 if "/norm/" in path else 1
  delta = np.zeros((splits, n // splits), np.float32)
  if splits > 1:
    delta[1] = delta[splits - 2] = 1.0
  return delta.reshape(-1)


def _flat(model) -> dict:
  return {"/".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("quantized", [("svdquant-nvfp4", 32)], ids=["nvfp4-r32"], indirect=True)
def test_export_errors_are_one_line_and_write_nothing(quantized, tmp_path, capsys):
  """One precision is enough for the error paths."""
  _, (ours, folder) = quantized
  arrays = read_arrays(folder)
  config = ours.config

  def variant(name, **changes):
    return write_checkpoint({**arrays, **changes}, tmp_path / name, model_type="flux",
                            config=config)

  to_k = "transformer_blocks/0/attn/to_k/kernel"
  out_proj = "transformer_blocks/0/attn/to_out/0/kernel"
  k_layer, out_layer = arrays[to_k], arrays[out_proj]
  unsplit = tmp_path / "float"
  save_checkpoint(FluxTransformer(SMALL, rngs=nnx.Rngs(0)), unsplit, model_type="flux",
                  config=SMALL)
  cases = [
      (variant("smooth", **{to_k: dataclasses.replace(k_layer, smooth=k_layer.smooth * 2)}),
       "are not one fused layer (the parts have different smoothing factors)"),
      (variant("scale", **{out_proj: dataclasses.replace(
          out_layer, wtscale=out_layer.wtscale * (1 + 2.0 ** -12))}),
       "tensor scale is not a bfloat16 value"),
      (variant("adanorm", **{"transformer_blocks/0/norm1/linear/kernel": np.zeros(
          (128, 6 * 128), np.float32)}), "norm1/linear must be INT4 g64 weight-only"),
      (unsplit, "single blocks have one proj_out"),
      (tmp_path / "nothing", "does not exist"),
  ]
  for src, match in cases:
    with pytest.raises(CheckpointError, match=re.escape(match)) as info:
      export_nunchaku(src, tmp_path / "out.safetensors", progress=False)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("*out.safetensors*"))
  status = cli.main(["export-nunchaku", str(folder), str(tmp_path / "out.npz")])
  err = capsys.readouterr().err
  assert status == cli.EXIT_BAD_INPUT and err.count("\n") == 1
  assert "svdq-jax export-nunchaku: error:" in err and ".safetensors file" in err
  # An NVFP4 layer with per-channel scales (an import of a DeepCompressor file) exports them.
  channel = jnp.linspace(0.5, 2.0, out_layer.out_features).astype(jnp.bfloat16).astype(
      jnp.float32)
  per_channel = variant("channel", **{out_proj: dataclasses.replace(out_layer, wcscales=channel)})
  export_nunchaku(per_channel, tmp_path / "channel.safetensors", progress=False)
  reader = CheckpointReader(tmp_path / "channel.safetensors")
  tensors = {t: reader.get(f"transformer_blocks.0.out_proj.{t}")
             for t in ("wcscales", "wtscale", "qweight", "wscales", "bias", "smooth")}
  got = nk.unpack_linear(tensors, name="out_proj")
  np.testing.assert_array_equal(np.asarray(got.wcscales), np.asarray(channel))
  assert float(got.wtscale) == float(out_layer.wtscale)

"""convert.nunchaku against DeepCompressor's packer: layers it packs unpack to the same codes,
scales and factors and compute notes/nunchaku.md 3.5; layers of ours pack to its bytes."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert import nunchaku as nk
from convert.safetensors_io import CheckpointError
from svdq_jax import quantizers as qz
from svdq_jax import svdq_dot
from svdq_jax.qlinear import SVDQLinear, split_outputs
from tests.convert import _nunchaku_reference as ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (K, N) of every kind of FLUX.1 W4A4 linear at a quarter-scale width D = 256 (qkv D -> 3D,
# out_proj D -> D, mlp_fc1 D -> 4D, mlp_fc2 4D -> D, shifted).
FLUX_KINDS = {"qkv_proj": (256, 768, 0.0), "out_proj": (256, 256, 0.0),
              "mlp_fc1": (256, 1024, 0.0), "mlp_fc2": (1024, 256, nk.GELU_SHIFT)}


def _ours(layer: ref.RandomLayer, shift: float) -> SVDQLinear:
  """Our layer holding the same values, built directly in docs/format.md's layout."""
  n, k = layer.codes.shape
  return SVDQLinear(
      qweight=qz.pack_nibbles(jnp.asarray(layer.codes)),
      wscales=jnp.asarray(layer.scales), wtscale=jnp.float32(layer.wtscale),
      smooth=jnp.asarray(layer.smooth.astype(np.float32)),
      lora_down=jnp.asarray(layer.down.T), lora_up=jnp.asarray(layer.up.T),
      bias=jnp.asarray(layer.bias.astype(np.float32)),
      format=nk.w4a4_format(layer.fmt, shift), in_features=k, out_features=n,
      wcscales=None if layer.wcscales is None else jnp.asarray(layer.wcscales.astype(np.float32)))


def _expected_bias(layer: ref.RandomLayer, shift: float) -> np.ndarray:
  """The bias DeepCompressor stores: bias + up @ down @ shift (the branch sees the unshifted x,
  notes 1.7), rounded to bf16."""
  if not shift or not layer.down.shape[0]:
    return layer.bias.astype(np.float32)
  extra = layer.up.astype(np.float64) @ (layer.down.astype(np.float64) @
                                         np.full(layer.codes.shape[1], shift))
  return (layer.bias.astype(np.float64) + extra).astype(ml_dtypes.bfloat16).astype(np.float32)


def _check_unpacked(got: SVDQLinear, layer: ref.RandomLayer, shift: float, np_rng) -> None:
  n, k = layer.codes.shape
  signed = layer.fmt == "int4"
  np.testing.assert_array_equal(np.asarray(got.weight_codes()),
                                layer.codes if signed else layer.codes.astype(np.uint8))
  np.testing.assert_array_equal(np.ascontiguousarray(got.wscales).view(np.uint8),
                                np.ascontiguousarray(layer.scales).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(got.smooth), layer.smooth.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(got.lora_down).T, layer.down)
  np.testing.assert_array_equal(np.asarray(got.lora_up).T, layer.up)
  np.testing.assert_array_equal(np.asarray(got.bias), _expected_bias(layer, shift))
  assert float(got.wtscale) == layer.wtscale
  if layer.wcscales is None:
    assert got.wcscales is None
  else:
    np.testing.assert_array_equal(np.asarray(got.wcscales), layer.wcscales.astype(np.float32))
  assert (got.in_features, got.out_features, got.act_shift) == (k, n, shift)
  x = np_rng.normal(0, 1, (5, k)).astype(np.float32)
  if shift:
    x = np.maximum(x, -shift)  # GELU outputs
  want = ref.reference_output(x, layer, _expected_bias(layer, shift), shift)
  y = np.asarray(svdq_dot(jnp.asarray(x), got, impl="xla"))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _check_packed_bytes(ours: dict, theirs: dict, *, rename: bool = True) -> None:
  if rename:
    theirs = {nk.CURRENT_NAMES.get(key, key): value for key, value in theirs.items()}
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
    assert ours[key].tobytes() == value.tobytes(), key


# Every kind once, ranks 16 / 32 / 128 spread over them (the unshifted and shifted fc2 both).
@pytest.mark.parametrize("kind,rank", [("qkv_proj", 32), ("out_proj", 16), ("mlp_fc1", 128),
                                       ("mlp_fc2", 16), ("mlp_fc2", 128)])
def test_int4_flux_kinds_unpack_and_pack_like_deepcompressor(kind, rank, np_rng):
  k, n, shift = FLUX_KINDS[kind]
  layer = ref.random_layer(np_rng, k, n, rank)
  theirs = ref.dc_pack(layer, shift=shift or None)
  got = nk.unpack_linear(theirs, act_shift=shift)
  _check_unpacked(got, layer, shift, np_rng)
  unshifted = ref.dc_pack(layer)
  _check_packed_bytes(nk.pack_linear(_ours(layer, shift)), unshifted)


@pytest.mark.parametrize("k,n,shift", [(128, 128, 0.0), (384, 640, nk.GELU_SHIFT),
                                        (640, 384, 0.0), (640, 384, nk.GELU_SHIFT)])
def test_int4_other_shapes_and_current_names(k, n, shift, np_rng):
  layer = ref.random_layer(np_rng, k, n, 48)
  theirs = ref.dc_pack(layer, shift=shift or None)
  current = {nk.CURRENT_NAMES.get(key, key): value for key, value in theirs.items()}
  _check_unpacked(nk.unpack_linear(current, act_shift=shift), layer, shift, np_rng)
  _check_packed_bytes(nk.pack_linear(_ours(layer, shift), naming="deepcompressor"),
                      ref.dc_pack(layer), rename=False)


def test_int4_without_branch_or_smoothing(np_rng):
  layer = ref.random_layer(np_rng, 256, 384, 0)
  layer.smooth = np.ones_like(layer.smooth)
  theirs = ref.dc_pack(layer, smooth=False)
  assert "lora_down" not in theirs
  got = nk.unpack_linear(theirs)
  assert got.rank == 0
  _check_unpacked(got, layer, 0.0, np_rng)
  _check_packed_bytes(nk.pack_linear(_ours(layer, 0.0)), theirs)


def test_int4_padded_shapes_cut_and_repad(np_rng):
  """Nunchaku pads K and N to 128 (codes and factors with zeros, scales, smooth, bias with ones);
  given the true shape, unpack cuts the padding off and pack puts it back byte for byte."""
  k, n = 192, 200
  layer = ref.random_layer(np_rng, k, n, 32)
  theirs = ref.dc_pack(layer)
  assert theirs["qweight"].shape == (256, 128)
  got = nk.unpack_linear(theirs, in_features=k, out_features=n)
  _check_unpacked(got, layer, 0.0, np_rng)
  _check_packed_bytes(nk.pack_linear(got, naming="deepcompressor"), theirs, rename=False)


def test_own_bias_is_added_before_rounding(np_rng):
  layer = ref.random_layer(np_rng, 128, 128, 16)
  own = np_rng.normal(0, 1, (128,)).astype(np.float32)
  ours = _ours(layer, 0.0)
  packed = nk.pack_linear(ours, bias=own)
  want = (layer.bias.astype(np.float32) + own).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(nk.unpack_scales(packed["bias"]), want)


# NVFP4: E2M1 codes, float8_e4m3 group-16 scales, and a per-tensor wtscale (a single linear) or
# per-channel wcscales (a fused q/k/v linear whose parts have their own tensor scales: constant over
# each third); no activation shift.
def _qkv_channel_scales(np_rng, n: int) -> np.ndarray:
  return np.repeat(np_rng.uniform(1e-5, 1e-4, 3), n // 3)


@pytest.mark.parametrize("kind,rank,per_channel", [
    ("qkv_proj", 32, True), ("qkv_proj", 16, False), ("out_proj", 128, False),
    ("mlp_fc1", 16, False), ("mlp_fc2", 48, False)])
def test_nvfp4_flux_kinds_unpack_and_pack_like_deepcompressor(kind, rank, per_channel, np_rng):
  k, n, _ = FLUX_KINDS[kind]
  channel = _qkv_channel_scales(np_rng, n) if per_channel else None
  layer = ref.random_layer(np_rng, k, n, rank, "nvfp4", channel_scales=channel)
  theirs = ref.dc_pack(layer)
  assert ("wcscales" in theirs, "wtscale" in theirs) == (per_channel, not per_channel)
  got = nk.unpack_linear(theirs)
  assert got.format == nk.w4a4_format("nvfp4")
  _check_unpacked(got, layer, 0.0, np_rng)
  _check_packed_bytes(nk.pack_linear(_ours(layer, 0.0)), theirs)


@pytest.mark.parametrize("k,n,rank", [(384, 640, 64), (640, 384, 0), (128, 256, 128)])
def test_nvfp4_other_shapes_with_per_channel_scales(k, n, rank, np_rng):
  channel = np_rng.uniform(1e-5, 1e-4, n)  # any per-channel values, not only per-third ones
  layer = ref.random_layer(np_rng, k, n, rank, "nvfp4", channel_scales=channel)
  theirs = ref.dc_pack(layer)
  _check_unpacked(nk.unpack_linear(theirs), layer, 0.0, np_rng)
  _check_packed_bytes(nk.pack_linear(_ours(layer, 0.0), naming="deepcompressor"), theirs,
                      rename=False)


def test_nvfp4_padded_shapes_cut_and_repad(np_rng):
  """N padded to 128 as for INT4. (K stays a multiple of 128 here: DeepCompressor pads NVFP4
  micro-scales only to 4 groups, not to Nunchaku's K'/16 rows, so for other K its files do not fit
  Nunchaku's own (K'/16, N') buffer.)"""
  k, n = 256, 200
  layer = ref.random_layer(np_rng, k, n, 16, "nvfp4", channel_scales=np_rng.uniform(1, 2, n))
  theirs = ref.dc_pack(layer)
  got = nk.unpack_linear(theirs, in_features=k, out_features=n)
  _check_unpacked(got, layer, 0.0, np_rng)
  _check_packed_bytes(nk.pack_linear(got, naming="deepcompressor"), theirs, rename=False)


def test_nvfp4_split_qkv_keeps_each_part_exact(np_rng):
  """A fused NVFP4 qkv split into q, k, v (as the import does): each part computes its slice of
  the fused layer's output, wcscales sliced like the codes."""
  k, n, _ = FLUX_KINDS["qkv_proj"]
  layer = ref.random_layer(np_rng, k, n, 32, "nvfp4",
                           channel_scales=_qkv_channel_scales(np_rng, n))
  fused = nk.unpack_linear(ref.dc_pack(layer))
  x = jnp.asarray(np_rng.normal(0, 1, (4, k)).astype(np.float32))
  whole = np.asarray(svdq_dot(x, fused, impl="xla"))
  parts = split_outputs(fused, (n // 3,) * 3)
  got = np.concatenate([np.asarray(svdq_dot(x, part, impl="xla")) for part in parts], axis=1)
  np.testing.assert_array_equal(got, whole)


@pytest.mark.parametrize("bad,match", [
    (lambda t: t.pop("qweight"), "missing tensor 'qweight'"),
    (lambda t: t.pop("proj_up"), "only one of the low-rank factors"),
    (lambda t: t.update(bias=t["bias"][:-1]), r"'bias' is bfloat16\(383,\), expected"),
    (lambda t: t.update(wscales=t["wscales"].astype(np.float32)), "'wscales' has dtype float32"),
    (lambda t: t.update(smooth=t["smooth_factor"]), "both 'smooth' and 'smooth_factor'"),
    (lambda t: t.update(qweight=t["qweight"][:100]), "not padded to multiples of 128"),
])
def test_unpack_errors_name_the_tensor(bad, match, np_rng):
  layer = ref.random_layer(np_rng, 128, 384, 16)
  tensors = nk.pack_linear(_ours(layer, 0.0))
  bad(tensors)
  with pytest.raises(CheckpointError, match=f"^blocks.0.qkv: .*{match}"):
    nk.unpack_linear(tensors, name="blocks.0.qkv")


def test_fp16_scales_that_bf16_cannot_hold_are_refused(np_rng):
  layer = ref.random_layer(np_rng, 128, 128, 16)
  tensors = nk.pack_linear(_ours(layer, 0.0), dtype=np.float16)
  nk.unpack_linear(tensors)  # bf16 values stored in fp16: exact
  tensors["wscales"] = tensors["wscales"] + np.float16(1e-4)
  with pytest.raises(CheckpointError, match="bfloat16 cannot represent exactly"):
    nk.unpack_linear(tensors)


def test_pack_refuses_layers_nunchaku_cannot_hold(np_rng):
  layer = _ours(ref.random_layer(np_rng, 128, 128, 16), 0.0)
  weight_only = dataclasses.replace(layer, format=nk.w4a16_format())
  with pytest.raises(CheckpointError, match="INT4 or NVFP4 W4A4"):
    nk.pack_linear(weight_only)


# --- W4A16 (AWQ) AdaLN linears


def _w4a16_values(np_rng, k, n, low):
  codes = np_rng.integers(low, 8, (n, k)).astype(np.int8)
  scales = (np_rng.uniform(0.5, 2.0, (k // 64, n)) * 1e-2).astype(ml_dtypes.bfloat16)
  bias = np_rng.normal(0, 0.5, (n,)).astype(ml_dtypes.bfloat16)
  return codes, scales, bias


@pytest.mark.parametrize("splits,k,n", [(6, 256, 6 * 256), (3, 256, 3 * 256), (1, 128, 64),
                                        (1, 3072 // 4, 128)])
def test_w4a16_deepcompressor_files_import_exactly(splits, k, n, np_rng):
  """DeepCompressor's AWQ files (zero point 7, i.e. wzeros = -bf16(7 s)): the imported layer's
  dequantized weight is Nunchaku's q * s + wzeros exactly, the chunks in diffusers' order, and
  the bias without the folded +1."""
  codes, scales, bias = _w4a16_values(np_rng, k, n, -7)
  theirs = ref.dc_pack_w4a16(codes, scales, bias, zero=None, splits=splits)
  got = nk.unpack_w4a16(theirs, adanorm_splits=splits)
  s = scales.astype(np.float64)
  zeros = -(7 * s).astype(ml_dtypes.bfloat16).astype(np.float64)
  want = (codes + 7) * np.repeat(s.T, 64, axis=1) + np.repeat(zeros.T, 64, axis=1)
  np.testing.assert_array_equal(np.asarray(got.dequantize()).astype(np.float64), want.T)
  delta = np.zeros((splits, n // splits))
  if splits > 1:
    delta[1] = delta[-2] = 1
  folded = (bias.astype(np.float32) + delta.reshape(-1)).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(got.bias), folded.astype(np.float32) - delta.reshape(-1))
  assert got.act_format is None and got.rank in (k // 64, 2 * k // 64)
  x = np_rng.normal(0, 1, (3, k)).astype(np.float32)
  y = np.asarray(svdq_dot(jnp.asarray(x), got, impl="xla"))
  np.testing.assert_allclose(y, x.astype(np.float64) @ want.T + np.asarray(got.bias),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [6, 3, 1])
def test_w4a16_ours_pack_like_deepcompressor_and_round_trip(splits, np_rng):
  k, n = 256, 3 * 384 if splits == 3 else 6 * 128
  codes, scales, bias = _w4a16_values(np_rng, k, n, -8)
  ours = SVDQLinear(
      qweight=qz.pack_nibbles(jnp.asarray(codes)), wscales=jnp.asarray(scales),
      wtscale=jnp.float32(1), smooth=jnp.ones((k,), jnp.float32),
      lora_down=jnp.zeros((k, 0), jnp.bfloat16), lora_up=jnp.zeros((0, n), jnp.bfloat16),
      bias=jnp.asarray(bias.astype(np.float32)), format=nk.w4a16_format(), in_features=k,
      out_features=n)
  packed = nk.pack_w4a16(ours, adanorm_splits=splits)
  theirs = ref.dc_pack_w4a16(codes, scales, bias, zero=8, splits=splits)
  _check_packed_bytes(packed, theirs)
  back = nk.unpack_w4a16(packed, adanorm_splits=splits)
  assert back.rank == 0
  np.testing.assert_array_equal(np.asarray(back.qweight), np.asarray(ours.qweight))
  np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(ours.dequantize()))


def test_w4a16_imported_layer_exports_its_zero_points_back(np_rng):
  codes, scales, bias = _w4a16_values(np_rng, 128, 6 * 128, -7)
  theirs = ref.dc_pack_w4a16(codes, scales, bias, zero=None, splits=6)
  back = nk.pack_w4a16(nk.unpack_w4a16(theirs, adanorm_splits=6), adanorm_splits=6)
  _check_packed_bytes(back, theirs)

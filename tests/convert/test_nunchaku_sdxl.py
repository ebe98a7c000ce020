"""convert.nunchaku_sdxl: a synthetic Nunchaku SDXL single file (a tiny diffusers SDXL UNet whose
transformer-block linears are quantized and packed by DeepCompressor's own packer) imported
exactly and sampled through StableDiffusionXLPipeline; and the one-line errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli import main as cli
from convert import mapping
from convert import nunchaku_checkpoint as nc
from convert.nunchaku import concat_outputs
from convert.safetensors_io import CheckpointError, CheckpointReader, save_file
from models.unet_sdxl import UNetSDXL
from pipelines.sdxl import StableDiffusionXLPipeline
from svdq_jax import is_quantized
from svdq_jax.qlinear import split_outputs

pytest.importorskip("deepcompressor.backend.nunchaku.convert")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

from tests.convert._nunchaku_sdxl_file import LAYERS, build_nunchaku_sdxl_file  # noqa: E402
from tests.pipelines._pipeline_reference import HEIGHT, WIDTH, save_tiny_sdxl_pipeline  # noqa: E402

CHANNELS = (32, 128)  # transformers 128 wide: two INT4 groups of 64 (one reads as per-channel)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
  """(diffusers folder, Nunchaku file, its W4A4 layers by Nunchaku name)."""
  root = tmp_path_factory.mktemp("nunchaku_sdxl")
  base = root / "base"
  save_tiny_sdxl_pipeline(base, block_out_channels=CHANNELS)
  src = root / "svdq-int4_r32-sdxl-tiny.safetensors"
  layers = build_nunchaku_sdxl_file(src, base / "unet", np.random.default_rng(0))
  return base, src, layers


def _flat(model) -> dict:
  return {"/".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_import_is_exact(sdxl_file, tmp_path):
  """Every quantized layer has DeepCompressor's codes, scales, smoothing factor, low-rank factors
  and bias (q/k/v split from attn1.to_qkv, none for the bias-less ones); every 16-bit tensor is
  the file's."""
  _, src, layers = sdxl_file
  dst = nc.import_nunchaku(src, tmp_path / "unet", progress=False)
  params = _flat(UNetSDXL.from_pretrained(dst))
  assert len(layers) == 8 * len(LAYERS)  # 2 blocks down, 2 in the middle, 4 up
  for name, layer in layers.items():
    block, lname = name.split(".transformer_blocks.")
    index, lname = lname.split(".", 1)
    ours = f"{block}.transformer_blocks.{index}".replace(".", "/")
    start = 0
    for part in LAYERS[lname]:
      path = f"{ours}/{part.replace('.', '/')}"
      kernel = params[f"{path}/kernel"]
      cols = slice(start, start + kernel.out_features)
      start += kernel.out_features
      assert kernel.weight_format == "int4" and kernel.act_shift == 0.0 and kernel.rank == 32
      np.testing.assert_array_equal(np.asarray(kernel.weight_codes()), layer.codes[cols])
      np.testing.assert_array_equal(np.asarray(kernel.wscales), layer.scales[:, cols])
      np.testing.assert_array_equal(np.asarray(kernel.smooth), layer.smooth.astype(np.float32))
      np.testing.assert_array_equal(np.asarray(kernel.lora_down), layer.down.T)
      np.testing.assert_array_equal(np.asarray(kernel.lora_up), layer.up[cols].T)
      if lname in ("attn1.to_qkv", "attn2.to_q"):
        assert kernel.bias is None and f"{path}/bias" not in params
      else:
        np.testing.assert_array_equal(np.asarray(kernel.bias), layer.bias.astype(np.float32))
        assert not np.asarray(params[f"{path}/bias"]).any()
    assert start == layer.codes.shape[0]
  reader = CheckpointReader(src)
  quantized = {p for p, v in params.items() if is_quantized(v)}
  own_biases = {p.removesuffix("kernel") + "bias" for p in quantized}
  plain = {p: v for p, v in params.items() if p not in quantized | own_biases}
  assert len(quantized) == 8 * 8 and "down_blocks/1/attentions/0/proj_in/kernel" in plain
  for path, value in plain.items():
    stored = mapping.kernel_to_ours(reader.get(mapping.torch_key(path))) if (
        path.endswith("kernel")) else reader.get(mapping.torch_key(path))
    np.testing.assert_array_equal(np.asarray(value), stored, err_msg=path)


def _unet_inputs(config, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return dict(sample=jax.random.normal(keys[0], (1, 4, HEIGHT // 2, WIDTH // 2)),
              timestep=jnp.array([500.0]),
              encoder_hidden_states=jax.random.normal(keys[1], (1, 12, config.cross_attention_dim)),
              added_cond_kwargs={"text_embeds": jax.random.normal(keys[2], (1, 20)),
                                 "time_ids": jnp.array([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])})


def _swap_geglu_halves(unet) -> None:
  """The layout mistake of exchanging GEGLU's value and gate halves, in every transformer block."""
  for level in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
    for transformer in level.attentions or ():
      for block in transformer.transformer_blocks:
        kernel = block.ff.net[0].proj.kernel
        half = kernel.get_value().out_features // 2
        value, gate = split_outputs(kernel.get_value(), (half, half))
        kernel.set_value(concat_outputs([gate, value]))


@pytest.mark.slow
def test_imported_pipeline_samples_close_to_the_float_one(sdxl_file, tmp_path):
  """Imported with the diffusers folder as --base: the UNet's output is the float UNet's up to
  the 4-bit error, well below what exchanging GEGLU's halves gives; the sampled images are close
  to the float pipeline's; `svdq-jax sample` runs the folder."""
  base, src, _ = sdxl_file
  dst = nc.import_nunchaku(src, tmp_path / "sdxl-int4", base=base, progress=False)
  quantized = StableDiffusionXLPipeline.from_pretrained(dst)
  floating = StableDiffusionXLPipeline.from_pretrained(base)
  assert is_quantized(quantized.unet.mid_block.attentions[0].transformer_blocks[1].attn1.to_v
                      .kernel.get_value())
  inputs = _unet_inputs(floating.unet.config)
  run = nnx.jit(lambda m, i: m(**i))
  want = np.asarray(run(floating.unet, inputs))
  rel = np.linalg.norm(np.asarray(run(quantized.unet, inputs)) - want) / np.linalg.norm(want)
  kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=5.0, seed=0)
  images = quantized(["a photo of a red cat"], **kwargs)
  expected = floating(["a photo of a red cat"], **kwargs)
  psnr = 10 * np.log10(1 / np.mean((images - expected) ** 2))
  _swap_geglu_halves(quantized.unet)
  swapped = np.linalg.norm(np.asarray(run(quantized.unet, inputs)) - want) / np.linalg.norm(want)
  print(f"UNet relative error {rel:.4f} (GEGLU halves exchanged: {swapped:.4f}); "
        f"images {psnr:.1f} dB")
  assert rel < 0.4 and rel < 0.6 * swapped, (rel, swapped)
  assert psnr > 17, psnr
  png = tmp_path / "cat.png"
  status = cli.main(["sample", str(dst), "--prompt", "a photo of a red cat", "--steps", "1",
                     "--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(png), "--quiet"])
  assert status == 0 and png.is_file()


def test_import_errors_are_one_line_and_write_nothing(sdxl_file, tmp_path, capsys):
  """Library: one-line CheckpointErrors, nothing written; command line: one line, exit 2."""
  _, src, _ = sdxl_file
  reader = CheckpointReader(src)
  tensors = {k: np.asarray(reader.get(k)) for k in reader.keys()}
  meta = dict(reader.metadata)
  block = "mid_block.attentions.0.transformer_blocks.1"

  def write(name, tensors=tensors, **changes):
    path = tmp_path / name
    save_file(tensors, path, metadata={**meta, **changes})
    return path

  flux_base = tmp_path / "flux_base"
  flux_base.mkdir()
  (flux_base / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  cases = [
      (write("sana.safetensors", model_class="NunchakuSanaTransformer2DModel"),
       "model_class 'NunchakuSanaTransformer2DModel' is not supported", None),
      (write("qweight.safetensors", {k: v for k, v in tensors.items()
                                     if k != f"{block}.ff.net.2.qweight"}),
       f"{block}.ff.net.2: missing tensor 'qweight'", None),
      (write("layer.safetensors", {k: v for k, v in tensors.items()
                                   if not k.startswith(f"{block}.attn2.to_q.")}),
       f"missing quantized layer '{block}.attn2.to_q'", None),
      (write("to_k.safetensors", {k: v for k, v in tensors.items()
                                  if k != f"{block}.attn2.to_k.weight"}),
       f"missing keys ['{block}.attn2.to_k.weight']", None),
      (write("bias.safetensors", tensors | {f"{block}.attn1.to_qkv.bias":
                                            tensors[f"{block}.ff.net.2.bias"]}),
       f"{block}.attn1.to_qkv: unexpected tensor 'bias'", None),
      (write("config.safetensors", config=json.dumps({"_class_name": "UNet2DConditionModel",
                                                      "class_embed_type": "timestep"})),
       "class_embed_type", None),
      (src, "--base needs a StableDiffusionXLPipeline", flux_base),
  ]
  for path, match, base in cases:
    with pytest.raises(CheckpointError, match=re.escape(match)) as info:
      nc.import_nunchaku(path, tmp_path / "out", base=base, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    argv = ["import-nunchaku", str(path), str(tmp_path / "out")]
    status = cli.main(argv + (["--base", str(base)] if base else []))
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after the progress bar's returns
    assert status == cli.EXIT_BAD_INPUT and "\n" not in err and match in err, err
    assert err.startswith("svdq-jax import-nunchaku: error:") and not (tmp_path / "out").exists()

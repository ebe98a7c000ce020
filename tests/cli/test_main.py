"""The `svdq-jax` command line: help, exit statuses and one-line errors (input problems only; a
bug keeps its traceback), argument checks that run before any model is loaded, and a real
`sample`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cli import main as cli
from convert.safetensors_io import CheckpointError, save_file
from models.unet_sdxl import UNetSDXLConfig
from svdq_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("demo", "convert", "import-nunchaku", "export-nunchaku", "quantize", "sample",
            "train-lora", "bench")


def _run(argv, capsys) -> tuple[int, str, str]:
  status = cli.main(argv)
  out, err = capsys.readouterr()
  return status, out, err


def _assert_bad_input(status: int, err: str, *needles: str) -> None:
  assert status == cli.EXIT_BAD_INPUT
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("svdq-jax")
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([command, "--help"])
  assert exit_info.value.code == 0
  assert f"usage: svdq-jax {command}" in capsys.readouterr().out


def test_no_or_unknown_command_is_bad_input(capsys):
  _assert_bad_input(*_run([], capsys)[::2], "required")
  status, _, err = _run(["paint"], capsys)
  _assert_bad_input(status, err, "svdq-jax: error:", "paint")


def test_sample_bad_inputs(tmp_path, capsys):
  _assert_bad_input(*_run(["sample", str(tmp_path / "nope"), "--prompt", "x"], capsys)[::2],
                    "does not exist")
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x"], capsys)[::2],
                    "model_index.json")
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x"], capsys)[::2],
                    "KandinskyPipeline", "not supported")
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x", "--devices", "999"],
                          capsys)[::2], "asked for 999 devices", "ask for 1 to")
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x", "--lora", "a.safetensors"],
                          capsys)[::2], "--lora 'a.safetensors': no file 'a.safetensors'")
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x", "--steps", "0"],
                          capsys)[::2], "--steps must be >= 1")
  _assert_bad_input(*_run(["sample", str(tmp_path)], capsys)[::2], "--prompt")
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x", "--out", "a.jpg"],
                          capsys)[::2], ".png")


def test_unreadable_model_index_is_bad_input(tmp_path, capsys):
  (tmp_path / "model_index.json").mkdir()
  _assert_bad_input(*_run(["sample", str(tmp_path), "--prompt", "x"], capsys)[::2],
                    "svdq-jax sample: error:", "model_index.json")


def test_quantize_bad_inputs(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  _assert_bad_input(*_run(["quantize", str(tmp_path / "nope"), str(tmp_path / "dst")],
                          capsys)[::2], "does not exist")
  binary = tmp_path / "prompts.bin"
  binary.write_bytes(b"\xff\xfe\x00\x81 not text")
  _assert_bad_input(*_run(["quantize", str(src), str(tmp_path / "dst"), "--calib", str(binary)],
                          capsys)[::2], "not UTF-8")
  empty = tmp_path / "empty.txt"
  empty.write_text("# only a comment\n\n")
  _assert_bad_input(*_run(["quantize", str(src), str(tmp_path / "dst"), "--calib", str(empty)],
                          capsys)[::2], "holds no prompt")
  _assert_bad_input(*_run(["quantize", str(src), str(tmp_path / "dst"), "--calib",
                           str(tmp_path / "missing.txt")], capsys)[::2], "does not exist")
  _assert_bad_input(*_run(["quantize", str(src), str(tmp_path / "dst"), "--calib", str(src)],
                          capsys)[::2], "is not a file")
  _assert_bad_input(*_run(["quantize", str(src), str(tmp_path / "dst"), "--preset", "int3"],
                          capsys)[::2], "unknown preset 'int3'", "'svdquant-int4'")


def test_convert_and_bench_bad_inputs(tmp_path, capsys):
  _assert_bad_input(*_run(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")],
                          capsys)[::2], "does not exist")
  _assert_bad_input(*_run(["bench", "gpus"], capsys)[::2], "gpus")


def test_import_nunchaku_bad_inputs(tmp_path, capsys):
  plain = tmp_path / "plain.safetensors"
  save_file({"x": np.zeros(2, np.float32)}, plain)
  _assert_bad_input(*_run(["import-nunchaku", str(plain), str(tmp_path / "dst")], capsys)[::2],
                    "svdq-jax import-nunchaku: error:", "not a Nunchaku checkpoint")
  _assert_bad_input(*_run(["import-nunchaku", str(plain), str(tmp_path / "dst"), "--base",
                           str(tmp_path)], capsys)[::2], "model_index.json")
  assert not (tmp_path / "dst").exists()


def test_import_nunchaku_writes_a_pipeline_folder_with_base(tmp_path, capsys, np_rng):
  """A synthetic Nunchaku file (DeepCompressor's packer) with --base: the transformer is the
  import, the base's other components are copied, and DST is refused a second time."""
  pytest.importorskip("deepcompressor.backend.nunchaku.convert")
  from models.flux import FluxTransformer
  from pipelines.folder import PipelineFolder
  from tests.convert._nunchaku_file import SMALL, build_nunchaku_file
  src = tmp_path / "svdq-int4_r32-flux.1-tiny.safetensors"
  build_nunchaku_file(src, SMALL, np_rng)
  base = _configs_only_pipeline(tmp_path / "base", "FluxPipeline")
  dst = tmp_path / "flux-int4"
  status, _, err = _run(["import-nunchaku", str(src), str(dst), "--base", str(base)], capsys)
  assert status == 0, err
  assert f"wrote {dst}" in err
  assert json.loads((dst / "scheduler" / "scheduler_config.json").read_text()) == {
      "_class_name": "FlowMatchEulerDiscreteScheduler"}
  assert PipelineFolder.read(dst).pipeline == "FluxPipeline"
  model = FluxTransformer.from_pretrained(dst / "transformer")
  assert model.config.num_layers == SMALL.num_layers
  assert model.transformer_blocks[0].ff.net[2].kernel.get_value().rank == 32
  _assert_bad_input(*_run(["import-nunchaku", str(src), str(dst), "--base", str(base)],
                          capsys)[::2], "already exists")
  status, _, err = _run(["import-nunchaku", str(src), str(dst), "--overwrite"], capsys)
  assert status == 0, err
  assert not (dst / "scheduler").exists()


@pytest.mark.slow
def test_real_width_nunchaku_file_imports_exactly_and_samples(tmp_path, capsys, np_rng):
  """A synthetic Nunchaku INT4 file at FLUX.1's width (24 heads of 128, one double and one single
  block, DeepCompressor-packed) imported with a tiny diffusers pipeline as --base: the fused qkv
  computes notes/nunchaku.md 3.5 at width 3072, and the pipeline samples a finite image."""
  pytest.importorskip("deepcompressor.backend.nunchaku.convert")
  import jax.numpy as jnp

  import pipelines
  from models.flux import FluxConfig, FluxTransformer
  from svdq_jax import svdq_dot
  from tests.convert import _nunchaku_reference as ref
  from tests.convert._nunchaku_file import build_nunchaku_file
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  base = tmp_path / "tiny"
  save_tiny_flux_pipeline(base)
  config = FluxConfig(num_layers=1, num_single_layers=1, in_channels=16, joint_attention_dim=32,
                      pooled_projection_dim=32, guidance_embeds=True)
  assert config.inner_dim == 3072
  src = tmp_path / "svdq-int4_r32-flux.1-wide.safetensors"
  layers = {}
  build_nunchaku_file(src, config, np_rng, float_params=False, layers=layers)
  dst = tmp_path / "wide"
  status, _, err = _run(["import-nunchaku", str(src), str(dst), "--base", str(base)], capsys)
  assert status == 0, err
  attn = FluxTransformer.from_pretrained(dst / "transformer").single_transformer_blocks[0].attn
  qkv = layers["single_transformer_blocks.0.qkv_proj"]
  x = np_rng.normal(0, 1, (3, 3072)).astype(np.float32)
  want = ref.reference_output(x, qkv, qkv.bias, 0.0)
  for i, linear in enumerate((attn.to_q, attn.to_k, attn.to_v)):
    part = linear.kernel.get_value()
    cols = slice(i * 3072, (i + 1) * 3072)
    np.testing.assert_array_equal(np.asarray(part.weight_codes()), qkv.codes[cols])
    y = np.asarray(svdq_dot(jnp.asarray(x), part, impl="xla"))
    np.testing.assert_allclose(y, want[:, cols], rtol=1e-5, atol=1e-5 * np.abs(want).max())
  pipe = pipelines.load_pipeline(dst, dtype=jnp.float32)
  images = pipe("a red cat", height=16, width=16, num_inference_steps=1, max_sequence_length=16)
  assert images.shape == (1, 16, 16, 3) and np.all(np.isfinite(images))


def _write_json(file: Path, content: dict) -> None:
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_text(json.dumps(content))


def _configs_only_pipeline(folder: Path, pipeline: str, *, patch_size: int = 2) -> Path:
  """A pipeline folder with model_index.json, the scheduler's config and the VAE's and
  transformer's config.json but no weights: any attempt to load a model from it fails. The VAE
  downsamples 8x."""
  _write_json(folder / "model_index.json", {"_class_name": pipeline})
  scheduler = {"PixArtSigmaPipeline": "DPMSolverMultistepScheduler",
               "StableDiffusionXLPipeline": "EulerDiscreteScheduler"}.get(
                   pipeline, "FlowMatchEulerDiscreteScheduler")
  _write_json(folder / "scheduler" / "scheduler_config.json", {"_class_name": scheduler})
  _write_json(folder / "vae" / "config.json", {
      "_class_name": "AutoencoderKL", "block_out_channels": [32, 64, 64, 64],
      "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4})
  if pipeline == "PixArtSigmaPipeline":
    _write_json(folder / "transformer" / "config.json", {
        "_class_name": "PixArtTransformer2DModel", "patch_size": patch_size, "sample_size": 128,
        "use_additional_conditions": False, "caption_channels": 4096})
  elif pipeline == "StableDiffusionXLPipeline":
    _write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                  **UNetSDXLConfig.sdxl().to_dict()})
  else:
    _write_json(folder / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel"})
  return folder


def test_bad_image_size_fails_before_the_model_is_touched(tmp_path, capsys, no_model_load):
  missing = str(tmp_path / "no-such-model")
  _assert_bad_input(*_run(["sample", missing, "--prompt", "x", "--height", "0"], capsys)[::2],
                    "--height must be >= 1, got 0")
  _assert_bad_input(*_run(["sample", missing, "--prompt", "x", "--width=-16"], capsys)[::2],
                    "--width must be >= 1, got -16")
  _assert_bad_input(*_run(["quantize", missing, str(tmp_path / "q"), "--height", "0"],
                          capsys)[::2], "--height must be >= 1")
  flux = str(_configs_only_pipeline(tmp_path / "flux", "FluxPipeline"))
  _assert_bad_input(*_run(["sample", flux, "--prompt", "x", "--height", "1000"], capsys)[::2],
                    f"FluxPipeline in {flux!r}", "multiples of 16", "1000x1024")
  _assert_bad_input(*_run(["sample", flux, "--prompt", "x", "--width", "24"], capsys)[::2],
                    "multiples of 16", "1024x24")
  _assert_bad_input(*_run(["quantize", flux, str(tmp_path / "q"), "--height", "520"],
                          capsys)[::2], "multiples of 16", "520x512")
  pixart = str(_configs_only_pipeline(tmp_path / "pixart", "PixArtSigmaPipeline", patch_size=4))
  _assert_bad_input(*_run(["sample", pixart, "--prompt", "x", "--height", "48", "--width", "64"],
                          capsys)[::2], "multiples of 32", "PixArtSigmaPipeline", "48x64")
  sdxl = str(_configs_only_pipeline(tmp_path / "sdxl", "StableDiffusionXLPipeline"))
  _assert_bad_input(*_run(["sample", sdxl, "--prompt", "x", "--height", "1016"], capsys)[::2],
                    f"StableDiffusionXLPipeline in {sdxl!r}", "multiples of 32", "1016x1024")
  _assert_bad_input(*_run(["quantize", sdxl, str(tmp_path / "q"), "--width", "500"],
                          capsys)[::2], "multiples of 32", "512x500")


def test_sizes_the_model_can_make_reach_the_load(tmp_path, capsys, monkeypatch):
  """The size check passes what the pipelines accept (VAE factor 8 times FLUX's 2x2 packing, or
  times PixArt's patch size), and only then is a model loaded."""
  from models import pretrained

  loads = []

  def load(path, model_type, dtype=None):
    loads.append(f"{Path(path).parent.name}/{Path(path).name}")
    raise InputError("stop after the load was reached")

  monkeypatch.setattr(pretrained, "_loaders", [load])
  flux = str(_configs_only_pipeline(tmp_path / "flux", "FluxPipeline"))
  pixart = str(_configs_only_pipeline(tmp_path / "pixart", "PixArtSigmaPipeline", patch_size=4))
  sdxl = str(_configs_only_pipeline(tmp_path / "sdxl", "StableDiffusionXLPipeline"))
  for folder, height, width in ((flux, "1024", "528"), (pixart, "96", "64"),
                                (sdxl, "512", "800")):
    _assert_bad_input(*_run(["sample", folder, "--prompt", "x", "--height", height, "--width",
                             width], capsys)[::2], "stop after the load was reached")
  assert loads == ["flux/transformer", "pixart/transformer", "sdxl/unet"]


def test_other_sample_and_quantize_checks_come_before_the_model(tmp_path, capsys, no_model_load):
  flux = str(_configs_only_pipeline(tmp_path / "flux", "FluxPipeline"))
  (tmp_path / "done").mkdir()
  _assert_bad_input(*_run(["quantize", flux, str(tmp_path / "done")], capsys)[::2],
                    "already exists", "overwrite")
  count = len(jax.local_devices())
  _assert_bad_input(*_run(["quantize", flux, str(tmp_path / "new"), "--devices",
                           str(count + 1)], capsys)[::2], f"asked for {count + 1} devices")
  assert not (tmp_path / "new").exists()
  _write_json(tmp_path / "list" / "model_index.json", {"_class_name": "FluxPipeline"})
  (tmp_path / "list" / "model_index.json").write_text("[1, 2]")
  _assert_bad_input(*_run(["sample", str(tmp_path / "list"), "--prompt", "x"], capsys)[::2],
                    "model_index.json: not a JSON object")
  (tmp_path / "list" / "model_index.json").write_text("{broken")
  _assert_bad_input(*_run(["sample", str(tmp_path / "list"), "--prompt", "x"], capsys)[::2],
                    "model_index.json: cannot parse model_index.json")
  _write_json(tmp_path / "bare" / "model_index.json", {"_class_name": "FluxPipeline"})
  _assert_bad_input(*_run(["sample", str(tmp_path / "bare"), "--prompt", "x"], capsys)[::2],
                    f"{tmp_path / 'bare' / 'scheduler' / 'scheduler_config.json'}: missing")


def test_quantize_passes_its_settings(tmp_path, capsys, monkeypatch):
  import pipelines

  calls = []
  monkeypatch.setattr(pipelines, "quantize_pipeline", lambda *a, **kw: calls.append((a, kw)))
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n")
  status, _, err = _run(["quantize", "src", "dst", "--calib", str(calib), "--guidance", "0",
                         "--steps", "1", "--dtype", "float32"], capsys)
  assert status == 0, err
  (args, kwargs), = calls
  assert args == ("src", "dst") and kwargs["prompts"] == ["a red cat"]
  assert kwargs["guidance_scale"] == 0.0 and kwargs["num_inference_steps"] == 1
  assert kwargs["devices"] is None
  status, _, err = _run(["quantize", "src", "dst", "--calib", str(calib), "--devices", "2"],
                        capsys)
  assert status == 0 and calls[1][1]["guidance_scale"] is None and calls[1][1]["devices"] == 2


def _convert_raising(error: Exception, tmp_path: Path, monkeypatch) -> list[str]:
  """`svdq-jax convert` arguments that pass the CLI's own checks, with `convert.api.convert`
  replaced by one that raises `error`."""
  from convert import api

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(api, "convert", fail)
  (tmp_path / "src").mkdir()
  return ["convert", str(tmp_path / "src"), str(tmp_path / "dst")]


@pytest.mark.parametrize("error", [
    InputError("--model 'sd3' is not a model type"),
    CheckpointError("w.safetensors: header of 12 bytes, the file has 8"),
    FileNotFoundError(2, "No such file or directory", "w.safetensors"),
    PermissionError(13, "Permission denied", "out/dst"),
], ids=lambda e: type(e).__name__)
def test_input_errors_are_one_line_with_status_2(tmp_path, capsys, monkeypatch, error):
  status, _, err = _run(_convert_raising(error, tmp_path, monkeypatch), capsys)
  _assert_bad_input(status, err, "svdq-jax convert: error:", " ".join(str(error).split()))


@pytest.mark.parametrize("error", [
    ValueError("operands could not be broadcast together with shapes (3,) (4,)"),
    KeyError("transformer_blocks/0/attn/to_q/kernel"),
    TypeError("unsupported operand"),
    OSError(28, "No space left on device"),
], ids=lambda e: type(e).__name__)
def test_unexpected_errors_propagate(tmp_path, capsys, monkeypatch, error):
  """A bug (or a full disk) is not bad input: main lets it through, traceback and all."""
  argv = _convert_raising(error, tmp_path, monkeypatch)
  with pytest.raises(type(error)) as raised:
    cli.main(argv)
  assert raised.value is error
  assert capsys.readouterr().err == ""


def test_unexpected_error_exits_1_with_traceback_as_a_subprocess(tmp_path):
  (tmp_path / "src").mkdir()
  script = ("import sys\n"
            "from convert import api\n"
            "from cli import main as cli\n"
            "def fail(*args, **kwargs):\n"
            "  raise ValueError('injected bug')\n"
            "api.convert = fail\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", script, "convert", str(tmp_path / "src"),
                         str(tmp_path / "dst")], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith("Traceback"), proc.stderr
  assert proc.stderr.strip().endswith("ValueError: injected bug")
  assert "svdq-jax convert: error:" not in proc.stderr


def test_default_prompt_file_ships_and_parses():
  prompts = cli.read_prompt_file(cli.DEFAULT_CALIB)
  assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)


def test_bad_input_exit_status_as_a_subprocess(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-m", "cli", "sample", str(tmp_path / "nope"),
                         "--prompt", "a cat"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"svdq-jax sample: error: {tmp_path / 'nope'}: pipeline folder "
                                 "does not exist")
  proc = subprocess.run([sys.executable, "-m", "cli", "--help"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and all(c in proc.stdout for c in COMMANDS)


def test_help_and_bad_flags_load_no_jax():
  """--help, a command's --help and a flag argparse refuses answer without importing jax or our
  models (a fresh process: this one has them loaded)."""
  script = ("import sys\n"
            "from cli import main as cli\n"
            "for argv in (['--help'], ['sample', '--help'], ['train-lora', '--help']):\n"
            "  try:\n"
            "    cli.main(argv)\n"
            "  except SystemExit as e:\n"
            "    assert e.code == 0, (argv, e.code)\n"
            "assert cli.main(['sample', 'folder', '--steps', '0', '--prompt', 'x']) == 2\n"
            "assert cli.main(['paint']) == 2\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "             ('jax', 'flax', 'numpy', 'models', 'convert', 'pipelines', 'demo')))\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
  assert "--steps must be >= 1" in proc.stderr


def test_parser_names_the_library_values():
  """The values cli.parser repeats so as not to load the library are the library's."""
  from cli import parser
  from demo import quality, sampling
  from models import sharding
  assert parser.WEIGHT_SHARDINGS == sharding.WEIGHT_SHARDINGS
  assert parser.DEMO_STEPS == sampling.NUM_STEPS
  assert parser.DEMO_NUM_PROMPTS == quality.NUM_PROMPTS
  assert parser.COMMANDS == COMMANDS


def test_sample_writes_png_with_prompt_and_seed(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from PIL import Image

  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  folder = tmp_path / "flux"
  save_tiny_flux_pipeline(folder)
  out = tmp_path / "cat.png"
  status, stdout, _ = _run(["sample", str(folder), "--prompt", "a red cat", "--prompt",
                            "a blue dog", "--steps", "2", "--seed", "11", "--height", "32",
                            "--width", "32", "--out", str(out), "--quiet"], capsys)
  assert status == 0
  paths = [Path(p) for p in stdout.split()]
  assert [p.name for p in paths] == ["cat_0.png", "cat_1.png"]
  with Image.open(paths[1]) as image:
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a blue dog" and image.text["seed"] == "11"


def test_sample_with_sharded_weights_reads_them_onto_their_shardings(tmp_path, capsys,
                                                                     monkeypatch):
  """--shard-weights loads the transformer straight onto its shardings (here over the one CPU
  device) and samples the image of the unsharded run."""
  pytest.importorskip("torch")
  import numpy as np
  from PIL import Image

  from convert import loading
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  folder = tmp_path / "flux"
  save_tiny_flux_pipeline(folder)
  calls = []
  inner = loading.load_pretrained

  def spy(path, model_type, dtype=None, **options):
    calls.append((Path(path).name, options))
    return inner(path, model_type, dtype, **options)

  monkeypatch.setattr(loading, "load_pretrained", spy)
  args = ["sample", str(folder), "--prompt", "a red cat", "--steps", "2", "--height", "32",
          "--width", "32", "--quiet"]
  for name, extra in (("plain", []), ("sharded", ["--shard-weights", "fsdp"])):
    status, _, err = _run([*args, *extra, "--out", str(tmp_path / f"{name}.png")], capsys)
    assert status == 0, err
  assert ("transformer", {"shard_weights": "fsdp", "devices": 1}) in calls
  with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "sharded.png") as split:
    difference = np.abs(np.asarray(plain, int) - np.asarray(split, int))
  assert difference.max() <= 1, difference.max()


@pytest.mark.slow
def test_quantize_then_sample_stays_close_to_float(tmp_path, capsys):
  """`svdq-jax quantize` (svdquant-int4) on a tiny FLUX of width 64 (one INT4 group) writes a
  folder that `sample` and load_pipeline read; its image stays within 40 dB PSNR of the float
  image (measured: about 60 dB), and only the block linears are quantized."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")

  import pipelines
  from svdq_jax import is_quantized
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  src, dst = tmp_path / "flux", tmp_path / "flux-int4"
  save_tiny_flux_pipeline(src, heads=4)
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n# comment\na blue dog in snow\n")
  status, _, err = _run(["quantize", str(src), str(dst), "--preset", "svdquant-int4", "--calib",
                         str(calib), "--steps", "2", "--height", "32", "--width", "32"], capsys)
  assert status == 0, err
  assert json.loads((dst / "svdq_quantization.json").read_text())["calibration"]["prompts"] == 2
  _assert_bad_input(*_run(["quantize", str(src), str(dst), "--calib", str(calib)], capsys)[::2],
                    "already exists")
  quant_pipe = pipelines.load_pipeline(dst)
  transformer = quant_pipe.transformer
  assert is_quantized(transformer.transformer_blocks[0].attn.to_q.kernel.get_value())
  assert is_quantized(transformer.single_transformer_blocks[0].proj_out.kernel.get_value())
  assert not is_quantized(transformer.x_embedder.kernel.get_value())
  assert not is_quantized(transformer.proj_out.kernel.get_value())
  kwargs = dict(height=32, width=32, num_inference_steps=3, seed=1, max_sequence_length=16)
  expected = pipelines.load_pipeline(src)(["a red cat sitting on a mat"], **kwargs)
  got = quant_pipe(["a red cat sitting on a mat"], **kwargs)
  psnr = 10 * np.log10(1.0 / np.mean((got - expected) ** 2))
  assert 40.0 <= psnr < 200.0, psnr  # close, but not identical: the 4-bit path did run


@pytest.mark.slow
def test_sdxl_quantize_then_sample(tmp_path, capsys):
  """`svdq-jax quantize` on a tiny SDXL folder writes unet/ as our checkpoint (the feed-forward
  output linears, 128 wide, are INT4; narrower layers and the cross-attention key/value stay
  16-bit); `sample` reads it and writes one PNG per prompt, close to the float folder's image."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from PIL import Image

  import pipelines
  from svdq_jax import is_quantized
  from tests.pipelines._pipeline_reference import save_tiny_sdxl_pipeline

  src, dst = tmp_path / "sdxl", tmp_path / "sdxl-int4"
  save_tiny_sdxl_pipeline(src)
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat on a mat\n")
  status, _, err = _run(["quantize", str(src), str(dst), "--calib", str(calib), "--steps", "1",
                         "--height", "32", "--width", "32"], capsys)
  assert status == 0, err
  assert json.loads((dst / "unet" / "config.json").read_text())["svdq_jax"]["model_type"] == "unet"
  assert (dst / "text_encoder_2").is_dir() and (dst / "tokenizer_2").is_dir()
  unet = pipelines.load_pipeline(dst).unet
  block = unet.mid_block.attentions[0].transformer_blocks[1]
  assert is_quantized(block.ff.net[2].kernel.get_value())
  assert not is_quantized(block.attn2.to_k.kernel.get_value())
  images = {}
  for name, folder in (("float", src), ("int4", dst)):
    out = tmp_path / f"{name}.png"
    status, stdout, err = _run(["sample", str(folder), "--prompt", "a red cat", "--steps", "2",
                                "--height", "32", "--width", "32", "--negative-prompt", "a dog",
                                "--out", str(out), "--quiet"], capsys)
    assert status == 0, err
    assert stdout.split() == [str(out)]
    with Image.open(out) as image:
      images[name] = np.asarray(image, np.float32) / 255
  err = np.abs(images["int4"] - images["float"]).mean()
  assert 0 < err < 0.05, err


@pytest.mark.slow
def test_quantize_in_nunchaku_layout_exports_imports_and_samples(tmp_path, capsys):
  """The workflow of the README: `quantize --nunchaku-layout` on a tiny FLUX of width 64 (padded
  to 128 in Nunchaku's file), `export-nunchaku`, `import-nunchaku --base`, `sample`: the import
  samples the image of the quantized folder up to the bf16 rounding of smoothing factors and
  biases (within 40 dB PSNR)."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")

  import pipelines
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  src, ours = tmp_path / "flux", tmp_path / "flux-int4"
  save_tiny_flux_pipeline(src, heads=4)
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\na blue dog in snow\n")
  status, _, err = _run(["quantize", str(src), str(ours), "--calib", str(calib), "--steps", "2",
                         "--height", "32", "--width", "32", "--nunchaku-layout"], capsys)
  assert status == 0, err
  attn = pipelines.load_pipeline(ours).transformer.transformer_blocks[0].attn
  q, k = attn.to_q.kernel.get_value(), attn.to_k.kernel.get_value()
  np.testing.assert_array_equal(np.asarray(q.smooth), np.asarray(k.smooth))
  file = tmp_path / "svdq-int4_r32-tiny.safetensors"
  status, _, err = _run(["export-nunchaku", str(ours), str(file)], capsys)
  assert status == 0, err
  back = tmp_path / "back"
  status, _, err = _run(["import-nunchaku", str(file), str(back), "--base", str(src)], capsys)
  assert status == 0, err
  out = tmp_path / "cat.png"
  status, stdout, err = _run(["sample", str(back), "--prompt", "a red cat", "--steps", "2",
                              "--height", "32", "--width", "32", "--out", str(out), "--quiet"],
                             capsys)
  assert status == 0 and Path(stdout.strip()) == out, err
  kwargs = dict(height=32, width=32, num_inference_steps=2, seed=1, max_sequence_length=16)
  expected = pipelines.load_pipeline(ours)(["a red cat"], **kwargs)
  got = pipelines.load_pipeline(back)(["a red cat"], **kwargs)
  psnr = 10 * np.log10(1.0 / max(np.mean((got - expected) ** 2), 1e-20))
  assert psnr >= 40.0, psnr


def test_bench_runs_the_benchmark_script_with_its_arguments(capfd):
  status = cli.main(["bench", "models", "--help"])
  out = capfd.readouterr().out
  assert status == 0
  assert "usage: sampling.py" in out and "--progress-overhead" in out


def test_nan_weights_fail_naming_the_step_and_component_without_writing(tmp_path, capsys):
  """NaN in a transformer weight: `sample` (the fused jitted loop) prints one line naming the
  first denoising step and the transformer, exits 3 and writes no PNG; NaN in a VAE decoder
  weight (finite latents): NonFiniteError naming the vae."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import pipelines
  from tests.pipelines._pipeline_reference import build_tiny_flux_pipeline

  bad_transformer = build_tiny_flux_pipeline()
  with torch.no_grad():
    bad_transformer.transformer.proj_out.weight[0, 0] = float("nan")
  bad_transformer.save_pretrained(tmp_path / "flux", safe_serialization=True)
  capsys.readouterr()
  out = tmp_path / "cat.png"
  status, stdout, err = _run(["sample", str(tmp_path / "flux"), "--prompt", "a red cat", "--steps",
                              "2", "--height", "32", "--width", "32", "--out", str(out),
                              "--quiet"], capsys)
  assert status == cli.EXIT_NON_FINITE, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert "transformer" in lines[0] and "denoising step 1 of 2" in lines[0], lines[0]
  assert stdout == "" and not list(tmp_path.glob("*.png"))

  bad_vae = build_tiny_flux_pipeline()
  with torch.no_grad():
    bad_vae.vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
  bad_vae.save_pretrained(tmp_path / "flux-vae", safe_serialization=True)
  pipe = pipelines.load_pipeline(tmp_path / "flux-vae")
  with pytest.raises(pipelines.NonFiniteError, match="the vae decoded NaN or inf"):
    pipe("a red cat", height=32, width=32, num_inference_steps=2, max_sequence_length=16)


@pytest.mark.slow
def test_quantize_keeps_layers_narrower_than_the_group_16_bit(tmp_path, capsys, caplog):
  """The default tiny FLUX has width 32, below svdquant-int4's group of 64: `quantize` exits 0,
  with one notice counting the layers it kept 16-bit, instead of a traceback."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  src, dst = tmp_path / "flux", tmp_path / "flux-int4"
  save_tiny_flux_pipeline(src)
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n")
  with caplog.at_level("WARNING", logger="svdq_jax"):
    status, _, err = _run(["quantize", str(src), str(dst), "--preset", "svdquant-int4", "--calib",
                           str(calib), "--steps", "1", "--height", "32", "--width", "32"], capsys)
  assert status == 0, err
  notices = [r.getMessage() for r in caplog.records if r.name == "svdq_jax"]
  assert len(notices) == 1 and "stay 16-bit" in notices[0], notices
  assert (dst / "transformer").is_dir()


def test_sample_defaults_of_the_folder_apply_below_the_flags(tmp_path, capsys, no_model_load):
  """sample_defaults.json sets the size (and the rest) unless a flag does; a setting the pipeline
  has no argument for, or a damaged file, is one line and exit 2 before any model is loaded."""
  flux = _configs_only_pipeline(tmp_path / "flux", "FluxPipeline")
  _write_json(flux / "sample_defaults.json", {"height": 40, "width": 32, "true_cfg_scale": 4.0,
                                              "negative_prompt": ""})
  _assert_bad_input(*_run(["sample", str(flux), "--prompt", "x"], capsys)[::2],
                    "multiples of 16", "40x32")
  _assert_bad_input(*_run(["sample", str(flux), "--prompt", "x", "--width", "8"], capsys)[::2],
                    "multiples of 16", "40x8")
  pixart = _configs_only_pipeline(tmp_path / "pixart", "PixArtSigmaPipeline", patch_size=4)
  _assert_bad_input(*_run(["sample", str(pixart), "--prompt", "x", "--true-cfg", "2"],
                          capsys)[::2], "PixArtSigmaPipeline", "has no true_cfg_scale setting")
  _write_json(flux / "sample_defaults.json", {"hieght": 32})
  _assert_bad_input(*_run(["sample", str(flux), "--prompt", "x"], capsys)[::2],
                    "sample_defaults.json: unknown setting 'hieght'")
  _write_json(flux / "sample_defaults.json", {"height": "32"})
  _assert_bad_input(*_run(["sample", str(flux), "--prompt", "x"], capsys)[::2],
                    "sample_defaults.json: height must be of type int, got '32'")

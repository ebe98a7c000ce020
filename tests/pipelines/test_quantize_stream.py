"""Streamed quantization (`quantize_pipeline(stream=True)`, `svdq-jax quantize --stream`) against
the whole-model path on a tiny diffusers FLUX folder of width 64 (one INT4 group)."""

import json
import weakref

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from flax import nnx  # noqa: E402

import pipelines  # noqa: E402
from cli import main as cli  # noqa: E402
from convert.checkpoint import read_arrays  # noqa: E402
from pipelines.folder import PipelineFolder  # noqa: E402
from pipelines.quantize_stream import quantize_pipeline_streamed  # noqa: E402
from svdq_jax import QuantConfig, is_quantized  # noqa: E402
from tests.pipelines._pipeline_reference import (  # noqa: E402  (needs torch, checked above)
  save_tiny_flux_pipeline,
  save_tiny_pixart_pipeline,
)

PROMPTS = ["a red cat", "a blue dog in snow"]
SETTINGS = dict(num_inference_steps=2, height=32, width=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
  """A dev-like tiny FLUX folder of width 64, one double and one single block, whose
  sample_defaults.json asks for 16 T5 tokens and true classifier-free guidance (so the runs have
  two branches, as the quantize workflow's calibration takes them from that file)."""
  folder = tmp_path_factory.mktemp("flux64") / "src"
  save_tiny_flux_pipeline(folder, heads=4)
  config = json.loads((folder / "transformer" / "config.json").read_text())
  assert config["num_layers"] == 1 and config["num_single_layers"] == 1
  (folder / "sample_defaults.json").write_text(json.dumps(
      {"max_sequence_length": 16, "negative_prompt": "", "true_cfg_scale": 2.0}))
  return folder


def _flat_leaves(arrays: dict) -> dict[str, np.ndarray]:
  """{path/field: numpy array} of read_arrays' output (quantized layers by their fields)."""
  out = {}
  for path, value in arrays.items():
    if is_quantized(value):
      for field, leaf in value.arrays().items():
        out[f"{path}/{field}"] = np.asarray(leaf)
    else:
      out[path] = np.asarray(value)
  return out


@pytest.mark.slow
def test_streamed_equals_whole_model_layer_by_layer(flux, tmp_path):
  """Both paths calibrate on the float model's activations with the same eager calls in the same
  order per layer, so the written checkpoints are equal array for array (exactly, not within a
  tolerance), and load_pipeline samples from the streamed one."""
  whole, streamed = tmp_path / "whole", tmp_path / "streamed"
  pipelines.quantize_pipeline(flux, whole, preset="svdquant-int4", prompts=PROMPTS, **SETTINGS)
  pipelines.quantize_pipeline(flux, streamed, preset="svdquant-int4", prompts=PROMPTS,
                              stream=True, **SETTINGS)
  expected = read_arrays(whole / "transformer")
  got = read_arrays(streamed / "transformer")
  quantized = sorted(p for p, v in expected.items() if is_quantized(v))
  assert quantized == sorted(p for p, v in got.items() if is_quantized(v))
  assert "transformer_blocks/0/attn/to_q/kernel" in quantized
  assert "single_transformer_blocks/0/proj_out/kernel" in quantized
  expected, got = _flat_leaves(expected), _flat_leaves(got)
  assert sorted(expected) == sorted(got)
  for path in expected:
    assert got[path].dtype == expected[path].dtype, path
    np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
  assert (json.loads((whole / "transformer" / "config.json").read_text())
          == json.loads((streamed / "transformer" / "config.json").read_text()))
  note = json.loads((streamed / "svdq_quantization.json").read_text())
  assert note["stream"] is True and note["calibration"]["prompts"] == 2
  assert sorted(p.name for p in streamed.iterdir()) == sorted(
      [p.name for p in flux.iterdir()] + ["svdq_quantization.json"])
  kwargs = dict(height=32, width=32, num_inference_steps=2, seed=1, max_sequence_length=16,
                negative_prompt="", true_cfg_scale=2.0)
  images = pipelines.load_pipeline(streamed)(["a red cat"], **kwargs)
  np.testing.assert_array_equal(images, pipelines.load_pipeline(whole)(["a red cat"], **kwargs))


@pytest.mark.slow
def test_stream_holds_one_float_block_at_a_time(flux, tmp_path):
  """Each time a float block is read (both passes), the parameter arrays of every block read
  before it are already freed (weak references to them are dead), and at most one block's float
  bytes are alive. The blocks are read once per step for the trajectory and once more to
  calibrate."""
  reads: list[tuple[str, list[weakref.ref]]] = []
  alive_bytes: list[int] = []
  block_bytes: list[int] = []

  def hook(path, block):
    leaves = jax.tree.leaves(nnx.state(block, nnx.Param))
    block_bytes.append(sum(leaf.nbytes for leaf in leaves))
    alive = sum(sum(r().nbytes for r in refs if r() is not None) for _, refs in reads)
    alive_bytes.append(alive)
    reads.append((path, [weakref.ref(leaf) for leaf in leaves]))

  folder = PipelineFolder.read(flux)
  quantize_pipeline_streamed(
      folder, tmp_path / "q", config=QuantConfig.preset("svdquant-int4"), preset="svdquant-int4",
      prompts=PROMPTS, num_inference_steps=2, height=32, width=32, seed=3, guidance_scale=None,
      overwrite=False, dtype=None, nunchaku_layout=False, progress=False,
      sampling={"max_sequence_length": 16}, block_hook=hook)
  blocks = ["transformer_blocks/0", "single_transformer_blocks/0"]
  assert [path for path, _ in reads] == blocks * 3  # 2 trajectory steps + calibration
  assert alive_bytes == [0] * len(reads), alive_bytes
  assert all(r() is None for _, refs in reads for r in refs)
  assert max(block_bytes) > 0


def test_stream_refuses_what_it_cannot_stream(flux, tmp_path, capsys):
  """Bad input for --stream is one line and exit status 2, before any model is loaded: a
  PixArt folder, and a folder whose transformer is already our checkpoint."""
  pixart = tmp_path / "pixart"
  save_tiny_pixart_pipeline(pixart)
  capsys.readouterr()  # diffusers' progress bars while saving
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n")
  base = ["--calib", str(calib), "--steps", "1", "--height", "32", "--width", "32"]
  status = cli.main(["quantize", str(pixart), str(tmp_path / "q1"), "--stream", *base])
  err = capsys.readouterr().err
  assert status == cli.EXIT_BAD_INPUT and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1 and "--stream handles FluxPipeline" in err
  assert not (tmp_path / "q1").exists()

  ours = tmp_path / "ours"
  assert cli.main(["quantize", str(flux), str(ours), "--preset", "bf16", *base]) == 0
  capsys.readouterr()
  status = cli.main(["quantize", str(ours), str(tmp_path / "q2"), "--stream", *base])
  err = capsys.readouterr().err
  assert status == cli.EXIT_BAD_INPUT and "is a svdq-jax checkpoint" in err
  assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q2").exists()


@pytest.mark.slow
def test_cli_quantize_stream_then_sample(flux, tmp_path, capsys):
  """`svdq-jax quantize --stream` writes a folder `svdq-jax sample` reads."""
  calib = tmp_path / "calib.txt"
  calib.write_text("a red cat\n")
  dst = tmp_path / "q"
  status = cli.main(["quantize", str(flux), str(dst), "--stream", "--calib", str(calib),
                     "--steps", "1", "--height", "32", "--width", "32"])
  assert status == 0, capsys.readouterr().err
  assert json.loads((dst / "svdq_quantization.json").read_text())["stream"] is True
  out = tmp_path / "cat.png"
  status = cli.main(["sample", str(dst), "--prompt", "a red cat", "--steps", "2", "--height",
                     "32", "--width", "32", "--out", str(out)])
  assert status == 0, capsys.readouterr().err
  assert out.exists()

"""`convert.api.convert`: component folders, single files, pipeline folders, dtype casting, and
every kind of bad input giving an InputError (a CheckpointError for the checkpoint itself) with
nothing left at the destination."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert import api
from convert.api import convert
from convert.checkpoint import load_checkpoint, read_header
from convert.loading import path_str
from convert.safetensors_io import CheckpointError, save_file
from svdq_jax.errors import InputError
from tests.convert import _tiny

CONFIG = _tiny.TinyConfig(in_features=8, hidden_size=16, num_layers=2)


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
  return _tiny.register(monkeypatch)


def _source(folder, seed=0, config=CONFIG, dtype=np.float32):
  weights = _tiny.source_weights(config, seed, dtype)
  _tiny.write_source(folder, config, weights)
  return weights


def _check_forward(model, weights, config=CONFIG, rtol=1e-5):
  x = np.random.default_rng(7).standard_normal((3, config.in_features)).astype(np.float32)
  want = _tiny.reference_forward(weights, x, config.num_layers)
  got = np.asarray(model(jnp.asarray(x)), np.float64)
  assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want))


def _assert_nothing_at(dst):
  assert not dst.exists()
  assert [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")] == []


def test_component_folder(tmp_path):
  weights = _source(tmp_path / "src")
  dst = convert(tmp_path / "src", tmp_path / "dst", progress=False)
  assert dst == (tmp_path / "dst").absolute()
  assert read_header(dst)["model_type"] == "tiny"
  assert read_header(dst)["config"] == CONFIG.to_dict()
  _check_forward(load_checkpoint(dst), weights)


def test_single_file_and_model_override(tmp_path):
  weights = _source(tmp_path / "src")
  raw = json.loads((tmp_path / "src" / "config.json").read_text())
  del raw["_class_name"]
  (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=r"neither '_class_name'.*'architectures'.*'tiny'"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")
  convert(tmp_path / "src" / "diffusion_pytorch_model.safetensors", tmp_path / "dst",
          model="tiny", progress=False)
  _check_forward(load_checkpoint(tmp_path / "dst"), weights)


def test_dtype_cast_to_bfloat16(tmp_path):
  weights = _source(tmp_path / "src")
  convert(tmp_path / "src", tmp_path / "dst", dtype="bfloat16", progress=False)
  model = load_checkpoint(tmp_path / "dst")
  kernel = np.asarray(model.proj_in.kernel.get_value())
  assert kernel.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(kernel, weights["proj_in.weight"].T.astype(ml_dtypes.bfloat16))
  with pytest.raises(InputError, match="dtype 'int32': needs a floating dtype"):
    convert(tmp_path / "src", tmp_path / "dst2", dtype="int32", progress=False)
  with pytest.raises(InputError, match="dtype 'float3': not a dtype"):
    convert(tmp_path / "src", tmp_path / "dst2", dtype="float3", progress=False)
  _assert_nothing_at(tmp_path / "dst2")


def _pipeline(root):
  """A diffusers-layout pipeline: two tiny components, a tokenizer and a scheduler folder."""
  weights = {"transformer": _source(root / "transformer", seed=1),
             "text_encoder": _source(root / "text_encoder", seed=2)}
  (root / "tokenizer").mkdir()
  (root / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
  (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\na b\n")
  (root / "scheduler").mkdir()
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
  index = {"_class_name": "TinyPipeline", "_diffusers_version": "0.42.1",
           "transformer": ["diffusers", "TinyNetModel"], "text_encoder": ["transformers",
                                                                        "TinyNetModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "safety_checker": [None, None]}
  (root / "model_index.json").write_text(json.dumps(index))
  return weights


def test_pipeline_folder(tmp_path):
  weights = _pipeline(tmp_path / "src")
  dst = convert(tmp_path / "src", tmp_path / "dst", progress=True)
  for name in ("transformer", "text_encoder"):
    _check_forward(load_checkpoint(dst / name), weights[name])
  for copied in ("model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json"):
    assert (dst / copied).read_bytes() == (tmp_path / "src" / copied).read_bytes()
  assert sorted(p.name for p in dst.iterdir()) == ["model_index.json", "scheduler",
                                                   "text_encoder", "tokenizer", "transformer"]
  with pytest.raises(InputError, match="src: is a pipeline folder; a model type applies to one "
                     "component folder"):
    convert(tmp_path / "src", tmp_path / "dst2", model="tiny", progress=False)


def test_pipeline_failure_midway_leaves_nothing(tmp_path, monkeypatch):
  _pipeline(tmp_path / "src")
  calls = []
  real = api.write_into

  def fail_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full (injected)")
    return real(*args, **kwargs)

  monkeypatch.setattr(api, "write_into", fail_second)
  with pytest.raises(OSError, match="injected"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  assert len(calls) == 2
  _assert_nothing_at(tmp_path / "dst")


def test_pipeline_bad_components(tmp_path):
  _pipeline(tmp_path / "src")
  index_path = tmp_path / "src" / "model_index.json"
  index = json.loads(index_path.read_text())
  (tmp_path / "src" / "unet").mkdir()
  save_file({"w": np.zeros(2, np.float32)}, tmp_path / "src" / "unet" / "model.safetensors")
  index_path.write_text(json.dumps({**index, "unet": ["diffusers", "SD3Transformer2DModel"]}))
  with pytest.raises(CheckpointError, match=r"unknown model type 'SD3Transformer2DModel' for "
                     r"component 'unet'; known: .*'TinyNetModel'"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  index_path.write_text(json.dumps({**index, "vae": ["diffusers", "TinyNetModel"]}))
  with pytest.raises(CheckpointError, match=r"component 'vae' \(TinyNetModel\) has no folder"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  index_path.write_text("{broken")
  with pytest.raises(CheckpointError, match="cannot parse model_index.json"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  index_path.write_text("[]")
  with pytest.raises(CheckpointError, match=r"model_index.json: not a JSON object \(it holds a "
                     "list"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="no such file or folder"):
    convert(tmp_path / "absent", tmp_path / "dst", progress=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match=r"empty: not a checkpoint \(no model_index.json or "
                     r"config.json\)"):
    convert(tmp_path / "empty", tmp_path / "dst", progress=False)
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(CheckpointError, match="not a .safetensors file"):
    convert(tmp_path / "notes.txt", tmp_path / "dst", progress=False)
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(json.dumps(
      {"_class_name": "TinyNetModel", **CONFIG.to_dict()}))
  with pytest.raises(CheckpointError, match="holds no .safetensors file"):
    convert(tmp_path / "noweights", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")


def test_unknown_model_type_names_known_ones(tmp_path):
  _source(tmp_path / "src")
  raw = json.loads((tmp_path / "src" / "config.json").read_text())
  (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "_class_name": "Whatever"}))
  with pytest.raises(CheckpointError, match=r"config.json: unknown model type 'Whatever'; known: "
                     r".*'tiny'.*'TinyNetModel'"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  with pytest.raises(InputError, match=r"src: unknown model type 'nope'; known: .*'tiny'"):
    convert(tmp_path / "src", tmp_path / "dst", model="nope", progress=False)
  _assert_nothing_at(tmp_path / "dst")


def test_already_ours_and_existing_destination(tmp_path):
  _source(tmp_path / "src")
  convert(tmp_path / "src", tmp_path / "dst", progress=False)
  with pytest.raises(CheckpointError, match="already a svdq-jax checkpoint"):
    convert(tmp_path / "dst", tmp_path / "dst2", progress=False)
  with pytest.raises(InputError, match=r"dst: already exists \(pass overwrite=True"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  (tmp_path / "src" / "config.json").write_text("{broken")
  with pytest.raises(InputError, match="already exists"):  # checked before the source is read
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _source(tmp_path / "src")
  convert(tmp_path / "src", tmp_path / "dst", overwrite=True, progress=False)
  assert read_header(tmp_path / "dst")["model_type"] == "tiny"


def test_truncated_source(tmp_path):
  _source(tmp_path / "src")
  weights_file = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
  weights_file.write_bytes(weights_file.read_bytes()[:-10])
  with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: truncated: "
                     r"key '.*' needs bytes up to"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")


@pytest.mark.parametrize("edit,match", [
    (lambda w: w.pop("blocks.1.weight"), r"missing key 'blocks.1.weight'"),
    (lambda w: w.update({"extra.weight": np.zeros(3, np.float32)}),
     r"unexpected keys \['extra.weight'\]"),
    (lambda w: w.update({"proj_in.weight": np.zeros((16, 9), np.float32)}),
     r"key 'proj_in.weight' has shape \(16, 9\), expected \(16, 8\)"),
    (lambda w: w.update({"norm.bias": np.zeros(16, np.int32)}),
     r"key 'norm/bias' has dtype int32, the model expects a floating dtype like float32"),
])
def test_key_shape_dtype_errors(tmp_path, edit, match):
  weights = _tiny.source_weights(CONFIG)
  edit(weights)
  _tiny.write_source(tmp_path / "src", CONFIG, weights)
  with pytest.raises(CheckpointError, match=match) as info:
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  assert "src" in str(info.value)
  _assert_nothing_at(tmp_path / "dst")


def test_converter_output_checked_against_the_model(tmp_path, monkeypatch):
  _source(tmp_path / "src")
  real = _tiny.convert_state

  def drops_a_key(reader, config):
    arrays = real(reader, config)
    del arrays["norm/scale"]
    return arrays

  monkeypatch.setattr(_tiny, "convert_state", drops_a_key)
  with pytest.raises(CheckpointError, match=r"missing keys \['norm/scale'\] \(1\)"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")


def _flat_params(model) -> dict[str, np.ndarray]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {path_str(path): np.asarray(variable.get_value()) for path, variable in flat}


@pytest.mark.parity
def test_converted_flux_pipeline_loads_exactly(tmp_path):
  """A tiny diffusers FluxPipeline (transformer, VAE, CLIP, T5, tokenizers, scheduler), converted:
  our FluxPipeline loads the converted folder with every parameter equal to loading the diffusers
  folder directly, and the transformer's parameters equal the torch state dict, transposed."""
  pytest.importorskip("diffusers")
  from pipelines import FluxPipeline
  from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline

  reference = save_tiny_flux_pipeline(tmp_path / "src", guidance_embeds=True)
  dst = convert(tmp_path / "src", tmp_path / "dst", progress=False)
  components = {"transformer": "flux", "vae": "vae", "text_encoder": "clip",
                "text_encoder_2": "t5"}
  assert {name: read_header(dst / name)["model_type"] for name in components} == components
  for folder in ("tokenizer", "tokenizer_2", "scheduler"):
    for file in (tmp_path / "src" / folder).iterdir():
      assert (dst / folder / file.name).read_bytes() == file.read_bytes()
  direct = FluxPipeline.from_pretrained(tmp_path / "src")
  converted = FluxPipeline.from_pretrained(dst)
  for name in components:
    want, got = _flat_params(getattr(direct, name)), _flat_params(getattr(converted, name))
    assert sorted(got) == sorted(want), name
    for path, array in want.items():
      assert got[path].dtype == array.dtype and np.array_equal(got[path], array), (name, path)
  torch_state = {k: v.numpy() for k, v in reference.transformer.state_dict().items()}
  ours = _flat_params(converted.transformer)
  assert len(ours) == len(torch_state)
  for path, array in ours.items():
    stem, leaf = path.rsplit("/", 1)
    key = f"{stem.replace('/', '.')}.{'bias' if leaf == 'bias' else 'weight'}"
    np.testing.assert_array_equal(array, torch_state[key].T if leaf == "kernel" else
                                  torch_state[key], err_msg=path)


def test_registry_dispatch_on_real_converters():
  from convert import registry

  known = registry.known_model_types()
  for name, short in [("FluxTransformer2DModel", "flux"), ("PixArtTransformer2DModel", "pixart"),
                      ("AutoencoderKL", "vae"), ("T5EncoderModel", "t5"),
                      ("CLIPTextModel", "clip"), ("CLIPTextModelWithProjection", "clip")]:
    assert known[name] == short
  assert registry.detect({"architectures": ["T5EncoderModel"]}, where="x").name == "t5"
  assert registry.detect({"_class_name": "AutoencoderKL"}, where="x").name == "vae"
  assert registry.find_entry("clip").model_class().__name__ == "CLIPTextModel"
  with pytest.raises(CheckpointError, match=r"x: unknown model type 'T5ForConditionalGeneration'; "
                     r"known: \['flux', 'pixart', 'vae', 't5', 'clip', 'unet', 'tiny'\]"):
    registry.detect({"architectures": ["T5ForConditionalGeneration"]}, where="x")


def test_package_level_names_and_permissions(tmp_path):
  import convert as package

  _source(tmp_path / "src")
  dst = package.convert(tmp_path / "src", tmp_path / "dst", progress=False)
  assert isinstance(package.load_checkpoint(dst), _tiny.TinyNet)
  umask = os.umask(0)
  os.umask(umask)
  assert dst.stat().st_mode & 0o777 == 0o777 & ~umask


def test_bad_config_names_the_file(tmp_path):
  _source(tmp_path / "src")
  raw = json.loads((tmp_path / "src" / "config.json").read_text())
  del raw["hidden_size"]
  (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=r"src/config.json: TinyNetModel config.json lacks "
                     r"'hidden_size'"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  (tmp_path / "src" / "config.json").write_text("{oops")
  with pytest.raises(CheckpointError, match=r"src/config.json: cannot parse config.json"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  _assert_nothing_at(tmp_path / "dst")


def test_pipeline_with_a_truncated_component_fails_before_converting(tmp_path, monkeypatch):
  _pipeline(tmp_path / "src")
  weights_file = tmp_path / "src" / "text_encoder" / "diffusion_pytorch_model.safetensors"
  weights_file.write_bytes(weights_file.read_bytes()[:-10])
  written = []
  monkeypatch.setattr(api, "write_into", lambda *args, **kwargs: written.append(args))
  with pytest.raises(CheckpointError, match=r"text_encoder/diffusion_pytorch_model.safetensors: "
                     r"truncated"):
    convert(tmp_path / "src", tmp_path / "dst", progress=False)
  assert written == []
  _assert_nothing_at(tmp_path / "dst")

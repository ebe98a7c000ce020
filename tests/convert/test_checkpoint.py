"""Our checkpoint format: exact round trips (float32, bfloat16, quantized), loading through
`load_pretrained`, configs read from config.json alone, atomic writes under injected failures, and
the errors of `load_into` and of reading JSON files."""

import gc
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from convert import checkpoint, loading, registry
from convert.checkpoint import load_checkpoint, read_header, save_checkpoint
from convert.loading import (
  check_arrays,
  load_into,
  load_pretrained,
  path_str,
  read_component_config,
  read_json_object,
  state_paths,
)
from convert.safetensors_io import CheckpointError
from models import sharding
from svdq_jax import QuantConfig, SVDQLinear, is_quantized, quantize_model
from svdq_jax.errors import InputError
from tests.convert import _tiny


@pytest.fixture
def tiny(monkeypatch) -> registry.ModelEntry:
  return _tiny.register(monkeypatch)


def _model(config=None, seed=0, param_dtype=jnp.float32):
  return _tiny.TinyNet(config or _tiny.TinyConfig(), param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _params(model) -> dict[str, np.ndarray]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {path_str(path): np.asarray(variable.get_value()) for path, variable in flat}


def _leftovers(folder) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_exact(tiny, tmp_path, param_dtype):
  config = _tiny.TinyConfig(in_features=8, hidden_size=16, num_layers=3)
  model = _model(config, param_dtype=param_dtype)
  dst = save_checkpoint(model, tmp_path / "ckpt", model_type="TinyNetModel", config=config)
  header = read_header(dst)
  assert header == {"format_version": checkpoint.FORMAT_VERSION, "model_type": "tiny",
                    "config": config.to_dict(), "quantized": {}, "empty": {}}
  loaded = load_checkpoint(dst)
  assert isinstance(loaded, _tiny.TinyNet)
  assert not any(leaf.committed for leaf in jax.tree.leaves(nnx.state(loaded)))
  want, got = _params(model), _params(loaded)
  assert sorted(got) == sorted(want)
  for path in want:
    assert got[path].dtype == want[path].dtype, path
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8)), param_dtype)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
  assert _leftovers(tmp_path) == []


def test_load_dtype_casts_floats(tiny, tmp_path):
  model = _model()
  save_checkpoint(model, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  loaded = load_checkpoint(tmp_path / "c", dtype=jnp.bfloat16)
  got = _params(loaded)
  assert {a.dtype for a in got.values()} == {np.dtype(ml_dtypes.bfloat16)}
  want = _params(model)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path].astype(ml_dtypes.bfloat16))


def test_load_pretrained_delegates_to_ours(tiny, tmp_path, monkeypatch):
  model = _model(seed=3)
  save_checkpoint(model, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())

  def unused(*_):
    raise AssertionError("a checkpoint of ours must not go through the source converter")

  monkeypatch.setattr(_tiny, "config_from_json", unused)
  monkeypatch.setattr(_tiny, "convert_state", unused)
  loaded = load_pretrained(tmp_path / "c", "tiny")
  for path, want in _params(model).items():
    np.testing.assert_array_equal(_params(loaded)[path], want)


def test_failure_during_write_leaves_nothing(tiny, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError("disk full (injected)")

  monkeypatch.setattr(checkpoint.json, "dumps", fail)
  with pytest.raises(OSError, match="injected"):
    save_checkpoint(_model(), tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  assert list(tmp_path.iterdir()) == []


def test_existing_destination(tiny, tmp_path, monkeypatch):
  first, second = _model(seed=1), _model(seed=2)
  save_checkpoint(first, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  with pytest.raises(CheckpointError, match="already exists"):
    save_checkpoint(second, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())

  def fail(*args, **kwargs):
    raise OSError("injected")

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint.json, "dumps", fail)
    with pytest.raises(OSError):
      save_checkpoint(second, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig(),
                      overwrite=True)
  np.testing.assert_array_equal(_params(load_checkpoint(tmp_path / "c"))["proj_in/kernel"],
                                _params(first)["proj_in/kernel"])
  save_checkpoint(second, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig(),
                  overwrite=True)
  np.testing.assert_array_equal(_params(load_checkpoint(tmp_path / "c"))["proj_in/kernel"],
                                _params(second)["proj_in/kernel"])
  assert _leftovers(tmp_path) == []


def _dead_pid() -> int:
  """The id of a process of ours that has exited."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_leftovers_of_a_killed_writer_are_cleaned_by_the_next(tiny, tmp_path):
  """What a SIGKILL can leave beside DST (in atomic_folder's naming): half-written temporary
  folders, and, when it struck between the two renames of an overwrite, the previous DST moved
  aside and no DST. The next write for DST moves the previous folder back, removes the debris of
  dead processes, and leaves the folders of live processes and of other hosts alone."""
  first = _model(seed=1)
  save_checkpoint(first, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  host, dead = checkpoint._owner().rsplit("-", 1)[0], _dead_pid()
  aside = tmp_path / f".c.{host}-{dead}.0123abcd.old"
  aside.mkdir()
  os.replace(tmp_path / "c", aside / "c")
  half = tmp_path / f".c.{host}-{dead}.89abcdef.tmp"
  (half / "params").mkdir(parents=True)
  (half / "config.json").write_text("{")
  live = tmp_path / f".c.{checkpoint._owner()}.00000000.tmp"
  elsewhere = tmp_path / f".c.another-machine-{dead}.00000001.tmp"
  other_dst = tmp_path / f".cc.{host}-{dead}.00000002.tmp"
  for folder in (live, elsewhere, other_dst):
    folder.mkdir()
  assert not (tmp_path / "c").exists()
  with pytest.raises(CheckpointError, match="already exists"):  # the previous one is back
    save_checkpoint(_model(seed=2), tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  np.testing.assert_array_equal(_params(load_checkpoint(tmp_path / "c"))["proj_in/kernel"],
                                _params(first)["proj_in/kernel"])
  assert _leftovers(tmp_path) == sorted([live.name, elsewhere.name, other_dst.name])
  # Killed after the new folder moved in: the new one stays, the old one aside is removed.
  aside.mkdir()
  (aside / "c").mkdir()
  assert checkpoint.clean_stale_siblings(tmp_path / "c") == [aside]
  assert (tmp_path / "c" / "config.json").exists() and not aside.exists()


def test_header_errors(tiny, tmp_path):
  folder = tmp_path / "c"
  save_checkpoint(_model(), folder, model_type="tiny", config=_tiny.TinyConfig())
  raw = json.loads((folder / "config.json").read_text())
  raw["svdq_jax"]["format_version"] = 99
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match="format version 99"):
    load_checkpoint(folder)
  raw["svdq_jax"]["format_version"] = 1
  raw["svdq_jax"]["model_type"] = "no-such-model"
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=r"unknown model type 'no-such-model'.*'tiny'"):
    load_checkpoint(folder)
  (folder / "config.json").write_text(json.dumps({"_class_name": "TinyNetModel"}))
  with pytest.raises(CheckpointError, match="not a svdq-jax checkpoint"):
    load_checkpoint(folder)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_checkpoint(tmp_path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("format_version", "1", "'format_version' must be a JSON integer, got \"1\""),
    ("model_type", ["tiny"], "'model_type' must be a JSON string, got [\"tiny\"]"),
    ("config", None, "'config' must be a JSON object, got null"),
    ("quantized", [], "'quantized' must be a JSON object, got []"),
    ("empty", "none", "'empty' must be a JSON object, got \"none\""),
])
def test_header_entry_of_the_wrong_json_type(tiny, tmp_path, key, value, message):
  """A hand-edited header is a CheckpointError naming the entry (was a TypeError or an
  AttributeError from deep inside loading)."""
  folder = tmp_path / "c"
  save_checkpoint(_model(), folder, model_type="tiny", config=_tiny.TinyConfig())
  raw = json.loads((folder / "config.json").read_text())
  raw["svdq_jax"][key] = value
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=re.escape(f"{folder}: config.json 'svdq_jax' header: "
                                                      f"{message}")):
    load_checkpoint(folder)


def test_unknown_model_type_on_save(tiny, tmp_path):
  with pytest.raises(CheckpointError, match=r"unknown model type 'Nope'; known: .*'tiny'"):
    save_checkpoint(_model(), tmp_path / "c", model_type="Nope", config=_tiny.TinyConfig())
  assert list(tmp_path.iterdir()) == []


def test_load_into_errors():
  config = _tiny.TinyConfig()
  model = nnx.eval_shape(lambda: _model(config))
  arrays = {path: np.zeros(spec.shape, spec.dtype) for path, spec in state_paths(model).items()}
  assert sorted(arrays)[:2] == ["blocks/0/kernel", "blocks/1/kernel"]
  broken = dict(arrays)
  del broken["blocks/1/kernel"]
  broken["blocks/2/kernel"] = np.zeros((16, 16), np.float32)
  with pytest.raises(CheckpointError, match=r"src: .*missing keys \['blocks/1/kernel'\] \(1\); "
                     r"unexpected keys \['blocks/2/kernel'\] \(1\)"):
    load_into(model, broken, source="src")
  with pytest.raises(CheckpointError, match=r"key 'proj_in/kernel' has shape \(16, 8\), the model "
                     r"expects \(8, 16\)"):
    load_into(model, {**arrays, "proj_in/kernel": np.zeros((16, 8), np.float32)}, source="src")
  with pytest.raises(CheckpointError, match=r"key 'norm/bias' has dtype int32, the model expects "
                     r"a floating dtype like float32"):
    check_arrays(state_paths(model), {**arrays, "norm/bias": np.zeros((16,), np.int32)},
                 source="src")
  loaded = load_into(model, arrays, source="src")
  assert jax.tree.all(jax.tree.map(lambda a: not np.any(np.asarray(a)),
                                   nnx.state(loaded, nnx.Param)))


@pytest.mark.parametrize("preset", ["svdquant-int4", "svdquant-nvfp4"])
def test_quantized_round_trip_is_exact(tiny, tmp_path, preset):
  config = _tiny.TinyConfig(in_features=64, hidden_size=128, num_layers=2)
  model = _model(config, seed=4)
  quant = QuantConfig.preset(preset, smooth=None, rank=8, svd_iters=1, weight_only=("blocks/1/*",))
  quantize_model(model, None, quant, progress=False)
  layers = lambda m: {"proj_in": m.proj_in, "blocks/0": m.blocks[0], "blocks/1": m.blocks[1],
                      "proj_out": m.proj_out}
  kernels = {name: layer.kernel.get_value() for name, layer in layers(model).items()}
  assert [is_quantized(k) for k in kernels.values()] == [True, True, True, False]
  save_checkpoint(model, tmp_path / "q", model_type="tiny", config=config)
  header = read_header(tmp_path / "q")
  assert sorted(header["quantized"]) == ["blocks/0/kernel", "blocks/1/kernel", "proj_in/kernel"]
  assert header["quantized"]["proj_in/kernel"] == kernels["proj_in"].metadata()
  loaded = load_checkpoint(tmp_path / "q")
  for name, want in kernels.items():
    got = layers(loaded)[name].kernel.get_value()
    if not is_quantized(want):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      continue
    assert is_quantized(got) and got.metadata() == want.metadata(), name
    for field, array in want.arrays().items():
      assert np.asarray(got.arrays()[field]).dtype == np.asarray(array).dtype, (name, field)
      assert np.asarray(got.arrays()[field]).tobytes() == np.asarray(array).tobytes(), (name, field)
  # like freshly built parameters: on the default device and free to move (a GPU run puts them
  # there, not on the host CPU where they were restored)
  assert not any(leaf.committed for leaf in jax.tree.leaves(nnx.state(loaded)))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64)), jnp.float32)
  forward = nnx.jit(lambda m, v: m(v))
  np.testing.assert_array_equal(np.asarray(forward(loaded, x)), np.asarray(forward(model, x)))


def test_quantized_checkpoint_loads_into_the_shardings_asked_for(tiny, tmp_path, monkeypatch):
  """`load_checkpoint(shardings=...)` asks for every parameter's placement by its path (an
  SVDQLinear's arrays by "<kernel path>/<field>") and puts the stored values there; the quantized
  layers are read onto the host CPU device first (not the default device, an accelerator's)."""
  config = _tiny.TinyConfig(in_features=64, hidden_size=128, num_layers=2)
  model = _model(config, seed=4)
  quant = QuantConfig.preset("svdquant-int4", smooth=None, rank=8, svd_iters=1)
  quantize_model(model, None, quant, progress=False)
  save_checkpoint(model, tmp_path / "q", model_type="tiny", config=config)
  mesh = sharding.data_mesh(1)
  asked = {}

  def shardings(name, shape):
    asked[name] = shape
    return NamedSharding(mesh, P("data") if shape else P())

  read_onto = []
  from_arrays = SVDQLinear.from_arrays.__func__

  def spy(cls, arrays, metadata, *, device=None):
    read_onto.append(device)
    return from_arrays(cls, arrays, metadata, device=device)

  monkeypatch.setattr(SVDQLinear, "from_arrays", classmethod(spy))
  loaded = load_checkpoint(tmp_path / "q", shardings=shardings)
  layers = len(read_onto)
  assert layers >= 2 and read_onto == [jax.local_devices(backend="cpu")[0]] * layers
  load_checkpoint(tmp_path / "q")
  assert read_onto[layers:] == [None] * layers  # unsharded: the default device, as before
  qweight = model.proj_in.kernel.get_value().qweight
  assert asked["proj_in/kernel/qweight"] == qweight.shape
  assert {"proj_in/kernel/wscales", "proj_in/kernel/lora_up", "proj_out/bias"} <= set(asked)
  for leaf in jax.tree.leaves(nnx.state(loaded)):
    assert leaf.committed and leaf.sharding.mesh == mesh
    assert leaf.sharding.spec == (P("data") if leaf.ndim else P())
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64)), jnp.float32)
  forward = nnx.jit(lambda m, v: m(v))
  np.testing.assert_array_equal(np.asarray(forward(loaded, x)), np.asarray(forward(model, x)))


# After a failed read, a tensorstore callback may post to orbax's already-closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_data", "remove_manifest"])
def test_damaged_parameters(tiny, tmp_path, damage):
  folder = tmp_path / "c"
  save_checkpoint(_model(), folder, model_type="tiny", config=_tiny.TinyConfig())
  files = [f for f in (folder / "params").rglob("*") if f.is_file()]
  if damage == "truncate_data":
    for f in files:
      if f.parent.name == "d":
        f.write_bytes(f.read_bytes()[:10])
  else:
    for f in files:
      if f.name == "manifest.ocdbt":
        f.unlink()
  with pytest.raises(CheckpointError, match=r"params: (corrupt or incomplete orbax parameters|"
                     r"orbax metadata missing)"):
    load_checkpoint(folder)
  time.sleep(0.5)  # let that late callback fail inside this test, where it is ignored
  gc.collect()


def test_load_pretrained_of_another_family(tiny, tmp_path):
  save_checkpoint(_model(), tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  with pytest.raises(CheckpointError, match=r"a svdq-jax checkpoint of a 'tiny' model \(.*TinyNet"
                     r"\), but this loader reads 't5' \(models.t5:T5Encoder\)"):
    load_pretrained(tmp_path / "c", "t5")


def test_load_pretrained_bad_config_names_the_file(tmp_path):
  """A config the converter rejects is an error naming the folder's config.json, as in convert."""
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'config.json'}: T5 converter: "
                                                      "model_type 'bert' is not 't5'")):
    load_pretrained(tmp_path, "t5")


def test_load_checkpoint_bad_stored_config_names_the_folder(tiny, tmp_path):
  save_checkpoint(_model(), tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig())
  path = tmp_path / "c" / "config.json"
  raw = json.loads(path.read_text())
  raw[checkpoint.HEADER_KEY]["config"]["depth"] = 3
  path.write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'c'}: invalid 'tiny' config "
                                                      "in config.json: ") + ".*'depth'"):
    load_checkpoint(tmp_path / "c")


def test_restore_reads_one_window_at_a_time(tiny, tmp_path, monkeypatch):
  """orbax hands the handler every array at once; ours passes them on RESTORE_WINDOW at a time, in
  order, so tensorstore never holds the read buffers of the whole checkpoint."""
  from orbax.checkpoint import type_handlers

  model = _model(_tiny.TinyConfig(num_layers=3), seed=5)
  save_checkpoint(model, tmp_path / "c", model_type="tiny", config=_tiny.TinyConfig(num_layers=3))
  original = type_handlers.ArrayHandler.deserialize
  windows = []

  async def recording(self, infos, args=None):
    windows.append([info.name for info in infos])
    return await original(self, infos, args)

  monkeypatch.setattr(type_handlers.ArrayHandler, "deserialize", recording)
  loaded = load_checkpoint(tmp_path / "c")
  want = _params(model)
  assert max(len(w) for w in windows) == checkpoint.RESTORE_WINDOW == 1
  assert sorted(name for w in windows for name in w) == sorted(p.replace("/", ".") for p in want)
  for path, array in _params(loaded).items():
    np.testing.assert_array_equal(array, want[path], err_msg=path)


def test_restored_arrays_are_adopted_without_a_copy(tiny, tmp_path):
  """read_arrays returns host jax.Arrays, which `load_into`'s jnp.asarray(np.asarray(a)) keeps as
  they are (tensorstore's own numpy buffers are not aligned for jax, which copied them)."""
  config = _tiny.TinyConfig(in_features=64, hidden_size=128)
  save_checkpoint(_model(config), tmp_path / "c", model_type="tiny", config=config)
  arrays = checkpoint.read_arrays(tmp_path / "c")
  for path, array in arrays.items():
    assert isinstance(array, jax.Array) and array.devices() == {jax.devices("cpu")[0]}, path
    adopted = jnp.asarray(np.asarray(array), dtype=array.dtype)
    assert adopted.unsafe_buffer_pointer() == array.unsafe_buffer_pointer(), path


def test_restore_without_cpu_backend_or_with_64_bit_arrays_gives_numpy(tiny, tmp_path,
                                                                       monkeypatch):
  """Arrays jax would narrow (float64, int64 without x64) and every array when jax has no CPU
  backend come back as numpy, bit-exact in their stored dtypes."""
  rng = np.random.default_rng(6)
  stored = {"a/wide": rng.standard_normal((3, 5)), "a/index": np.arange(7, dtype=np.int64) << 40,
            "b/half": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16)}
  checkpoint.write_checkpoint(stored, tmp_path / "c", model_type="tiny",
                              config=_tiny.TinyConfig())
  got = checkpoint.read_arrays(tmp_path / "c")
  assert [type(got[k]) for k in stored] == [np.ndarray, np.ndarray, type(jnp.zeros(1))]

  def no_cpu(*args, **kwargs):
    raise RuntimeError("Unknown backend cpu (injected)")

  monkeypatch.setattr(checkpoint.jax, "local_devices", no_cpu)
  got_without_cpu = checkpoint.read_arrays(tmp_path / "c")
  for arrays in (got, got_without_cpu):
    for key, want in stored.items():
      assert np.asarray(arrays[key]).dtype == want.dtype, key
      assert np.asarray(arrays[key]).tobytes() == want.tobytes(), key
  assert {type(a) for a in got_without_cpu.values()} == {np.ndarray}


def test_load_pretrained_unknown_model_type_is_an_input_error(tiny, tmp_path):
  _tiny.write_source(tmp_path, _tiny.TinyConfig(), _tiny.source_weights(_tiny.TinyConfig()))
  with pytest.raises(InputError, match=re.escape(f"{tmp_path}: unknown model type 'sd3'; known: ")
                     + ".*'tiny'"):
    load_pretrained(tmp_path, "sd3")


def test_component_config_from_config_json_alone(tiny, tmp_path, monkeypatch):
  """Both layouts give the config they were written with, detected or named, and no weight is
  read (reading one fails here)."""
  config = _tiny.TinyConfig(in_features=8, hidden_size=16, num_layers=3)
  _tiny.write_source(tmp_path / "src", config, _tiny.source_weights(config))
  save_checkpoint(_model(config), tmp_path / "ours", model_type="tiny", config=config)

  def read_weights(*args, **kwargs):
    raise AssertionError("a weight was read")

  monkeypatch.setattr(loading, "CheckpointReader", read_weights)
  monkeypatch.setattr(checkpoint, "read_arrays", read_weights)
  for folder, ours in (("src", False), ("ours", True)):
    for model_type in (None, "tiny", "TinyNetModel"):
      component = read_component_config(tmp_path / folder, model_type)
      assert (component.entry, component.config, component.checkpoint) == (tiny, config, ours)
  with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'ours'}: a svdq-jax checkpoint of "
                                                 "a 'tiny' model")):
    read_component_config(tmp_path / "ours", "t5")
  with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nope'}: not a folder")):
    read_component_config(tmp_path / "nope", "tiny")


def test_read_json_object_errors_name_the_file(tmp_path):
  file = tmp_path / "model_index.json"
  with pytest.raises(CheckpointError, match=re.escape(f"{file}: missing (or not a file)")):
    read_json_object(file)
  file.mkdir()
  with pytest.raises(CheckpointError, match=re.escape(f"{file}: missing (or not a file)")):
    read_json_object(file)
  file.rmdir()
  for content, match in ((b"\xff\xfe{}", "cannot parse model_index.json: 'utf-8' codec"),
                         (b"{broken", "cannot parse model_index.json: Expecting property name"),
                         (b"[1, 2]", "not a JSON object (it holds a list)")):
    file.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(f"{file}: {match}")):
      read_json_object(file)
  file.write_text(json.dumps({"_class_name": "FluxPipeline", "vae": ["diffusers", "X"]}))
  assert read_json_object(file) == {"_class_name": "FluxPipeline", "vae": ["diffusers", "X"]}

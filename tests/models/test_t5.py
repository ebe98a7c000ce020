"""models.t5.T5Encoder and convert.t5 against transformers' T5EncoderModel (the reference).

Tiny random-init transformers models are saved with `save_pretrained`, loaded with our
`from_pretrained` (no torch in that path) and run on the same token ids.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from convert.safetensors_io import CheckpointError
from models.t5 import T5Config, T5Encoder, relative_position_bucket
from tests._checkpoints import rewrite_safetensors

pytestmark = pytest.mark.parity

# Two shapes of encoder: T5 v1.1 (gated-gelu, FLUX/PixArt's) with the real bucket settings, and
# the original T5's relu feed-forward with d_kv * heads != d_model and few buckets over a short
# max_distance, so the logarithmic and the clamped buckets are used at the test's length.
CONFIGS = {
    "v1_1_gated_gelu": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=32, relative_attention_max_distance=128,
                            feed_forward_proj="gated-gelu"),
    "relu_few_buckets": dict(vocab_size=40, d_model=24, d_kv=16, d_ff=40, num_layers=3,
                             num_heads=3, relative_attention_num_buckets=8,
                             relative_attention_max_distance=16, feed_forward_proj="relu"),
}
LENGTHS = {"v1_1_gated_gelu": 20, "relu_few_buckets": 40}
TOLERANCE = 1e-4


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, transformers model in eval mode, folder it was saved to)."""
  torch.manual_seed(0)
  model = T5EncoderModel(HFT5Config(**CONFIGS[request.param])).eval()
  folder = tmp_path_factory.mktemp(f"t5_{request.param}")
  model.save_pretrained(folder)
  return request.param, model, folder


def make_inputs(name: str, padded: bool) -> tuple[np.ndarray, np.ndarray | None]:
  """Token ids (2, T) and, when `padded`, a mask hiding the last 5 tokens of the second row."""
  length = LENGTHS[name]
  ids = np.random.default_rng(1).integers(0, CONFIGS[name]["vocab_size"], (2, length))
  if not padded:
    return ids.astype(np.int32), None
  mask = np.ones((2, length), np.int32)
  mask[1, -5:] = 0
  return ids.astype(np.int32), mask


def reference_forward(model: T5EncoderModel, ids: np.ndarray, mask: np.ndarray | None):
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(),
                attention_mask=None if mask is None else torch.from_numpy(mask).long())
  return out.last_hidden_state.double().numpy()




@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (32, 64)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
  relative = torch.arange(-300, 301)
  expected = HFT5Attention._relative_position_bucket(relative, bidirectional=True,
                                                     num_buckets=num_buckets,
                                                     max_distance=max_distance).numpy()
  ours = relative_position_bucket(jnp.asarray(relative.numpy()), num_buckets=num_buckets,
                                  max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(ours), expected)


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
def test_parity_with_transformers(reference, padded):
  name, model, folder = reference
  ids, mask = make_inputs(name, padded)
  expected = reference_forward(model, ids, mask)
  ours = T5Encoder.from_pretrained(folder)
  mask_arg = None if mask is None else jnp.asarray(mask)
  eager = ours(jnp.asarray(ids), mask_arg)
  jitted = nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids), mask_arg)
  assert eager.shape == expected.shape and eager.dtype == jnp.float32
  assert rel_err(eager, expected) <= TOLERANCE
  assert rel_err(jitted, expected) <= TOLERANCE


def test_padding_mask_changes_the_output(reference):
  """Guards the masked parity test against a mask that is silently ignored."""
  name, model, folder = reference
  ids, mask = make_inputs(name, padded=True)
  ours = T5Encoder.from_pretrained(folder)
  unmasked = np.asarray(ours(jnp.asarray(ids)))
  masked = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  assert rel_err(masked[1], unmasked[1]) > 1e-3
  np.testing.assert_allclose(masked[0], unmasked[0], rtol=1e-6, atol=1e-6)


def test_bfloat16_runs_close_to_float32_reference(reference):
  name, model, folder = reference
  ids, mask = make_inputs(name, padded=True)
  expected = reference_forward(model, ids, mask)
  ours = T5Encoder.from_pretrained(folder, dtype=jnp.bfloat16)
  params = jax.tree.leaves(nnx.state(ours, nnx.Param))
  assert all(p.dtype == jnp.bfloat16 for p in params)
  out = nnx.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out, np.float32)).all()
  assert rel_err(np.asarray(out, np.float32), expected) <= 5e-2


@pytest.mark.parametrize("kept", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                  ("shared.weight", "encoder.embed_tokens.weight")],
                         ids=["shared", "embed_tokens", "both"])
def test_tied_embedding_under_either_key(reference, kept, tmp_path):
  name, model, folder = reference
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  embedding = tensors.pop("shared.weight")
  tensors.update({key: embedding for key in kept})
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  ids, mask = make_inputs(name, padded=False)
  ours = T5Encoder.from_pretrained(tmp_path)
  assert rel_err(ours(jnp.asarray(ids)), reference_forward(model, ids, mask)) <= TOLERANCE


def test_sharded_checkpoint_loads(reference, tmp_path):
  """FLUX's text_encoder_2 is sharded: *.safetensors.index.json plus several shard files."""
  name, model, _ = reference
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  assert list(tmp_path.glob("*.safetensors.index.json"))
  ids, mask = make_inputs(name, padded=True)
  ours = T5Encoder.from_pretrained(tmp_path)
  assert rel_err(ours(jnp.asarray(ids), jnp.asarray(mask)),
                 reference_forward(model, ids, mask)) <= TOLERANCE


@pytest.fixture
def copied_checkpoint(reference, tmp_path):
  """A writable copy of a reference checkpoint folder."""
  _, _, folder = reference
  for file in ("config.json", "model.safetensors"):
    (tmp_path / file).write_bytes((folder / file).read_bytes())
  return tmp_path


def test_missing_key_is_named(copied_checkpoint):
  key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  rewrite_safetensors(copied_checkpoint, lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"missing keys.*{key}"):
    T5Encoder.from_pretrained(copied_checkpoint)


def test_unexpected_key_is_named(copied_checkpoint):
  key = "decoder.block.0.layer.0.SelfAttention.q.weight"
  rewrite_safetensors(copied_checkpoint,
                     lambda t: t.update({key: np.zeros((4, 4), np.float32)}))
  with pytest.raises(CheckpointError, match=f"unexpected keys.*{key}"):
    T5Encoder.from_pretrained(copied_checkpoint)


def test_wrong_shape_names_key_expected_and_found(copied_checkpoint):
  key = "encoder.block.0.layer.0.SelfAttention.q.weight"

  def widen_q(tensors):
    tensors[key] = np.ascontiguousarray(np.concatenate([tensors[key]] * 2, axis=1))

  rewrite_safetensors(copied_checkpoint, widen_q)
  found = safetensors.numpy.load_file(copied_checkpoint / "model.safetensors")[key].shape
  with pytest.raises(CheckpointError, match=rf"{key}.*shape \({found[0]}, {found[1]}\), expected"):
    T5Encoder.from_pretrained(copied_checkpoint)


def test_integer_weight_is_a_dtype_error(copied_checkpoint):
  key = "encoder.final_layer_norm.weight"
  rewrite_safetensors(copied_checkpoint, lambda t: t.update({key: t[key].astype(np.int32)}))
  with pytest.raises(CheckpointError, match=f"{key}.*dtype int32"):
    T5Encoder.from_pretrained(copied_checkpoint)


@pytest.mark.parametrize("change,message", [
    ({"feed_forward_proj": "gated-swish"}, "swish"),
    ({"architectures": ["T5ForConditionalGeneration"]}, "T5ForConditionalGeneration"),
    ({"model_type": "umt5"}, "umt5"),
], ids=["activation", "architecture", "model_type"])
def test_unsupported_config_is_a_checkpoint_error(copied_checkpoint, change, message):
  path = copied_checkpoint / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(CheckpointError, match=message):
    T5Encoder.from_pretrained(copied_checkpoint)


def test_v1_1_xxl_eval_shape_allocates_nothing_and_matches_transformers_size():
  config = T5Config.v1_1_xxl()
  model = nnx.eval_shape(lambda: T5Encoder(config, dtype=jnp.bfloat16,
                                           param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  with torch.device("meta"):
    hf_model = T5EncoderModel(HFT5Config(**config.to_dict()))
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == sum(
      p.numel() for p in hf_model.parameters())


def test_config_round_trip_and_errors():
  config = T5Config.v1_1_xxl()
  assert T5Config.from_dict(config.to_dict()) == config
  assert config.is_gated_act and config.dense_act_fn == "gelu_new"
  with pytest.raises(ValueError, match="unknown keys"):
    T5Config.from_dict({**config.to_dict(), "n_positions": 512})
  with pytest.raises(ValueError, match="float16"):
    T5Encoder(T5Config(**CONFIGS["relu_few_buckets"]), dtype=jnp.float16, rngs=nnx.Rngs(0))

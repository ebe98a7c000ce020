"""models.clip.CLIPTextModel and convert.clip against transformers' CLIP text models.

The references are transformers' CLIPTextModel and CLIPTextModelWithProjection.
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
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection

from convert.safetensors_io import CheckpointError
from models.clip import CLIPTextConfig, CLIPTextModel
from tests._checkpoints import rewrite_safetensors

pytestmark = pytest.mark.parity

# FLUX's text_encoder shape (CLIPTextModel, quick_gelu, the legacy eos_token_id 2: pooled at the
# largest id) and SDXL text_encoder_2's (WithProjection, exact gelu). The second uses an explicit
# eos id below other ids in the input, so the two pooling rules pick different positions.
CONFIGS = {
    "vit_l_style": (HFCLIPTextModel, dict(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1)),
    "bigg_style": (HFCLIPTextModelWithProjection, dict(
        vocab_size=99, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=5, max_position_embeddings=16, hidden_act="gelu", projection_dim=24,
        bos_token_id=0, eos_token_id=50, pad_token_id=1)),
}
LENGTH = 12
TOLERANCE = 1e-4


def rel_err(ours, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, transformers model in eval mode, folder it was saved to)."""
  model_class, kwargs = CONFIGS[request.param]
  torch.manual_seed(0)
  model = model_class(HFCLIPTextConfig(**kwargs)).eval()
  folder = tmp_path_factory.mktemp(f"clip_{request.param}")
  model.save_pretrained(folder)
  return request.param, model, folder


def end_of_text_id(name: str) -> int:
  kwargs = CONFIGS[name][1]
  return kwargs["vocab_size"] - 1 if kwargs["eos_token_id"] == 2 else kwargs["eos_token_id"]


def make_inputs(name: str, padded: bool) -> tuple[np.ndarray, np.ndarray | None]:
  """Token ids (2, LENGTH) shaped like a CLIP tokenizer's output, and the padding mask if asked.

  Start token, text, end-of-text, then padding with the end-of-text id (as SD's tokenizers pad).
  Row 0 is full (end-of-text at 11); row 1 ends at 7 and is padded after it.
  """
  eos = end_of_text_id(name)
  rng = np.random.default_rng(1)
  text = rng.integers(3, CONFIGS[name][1]["vocab_size"] - 1, (2, LENGTH))
  ids = np.where(text == eos, eos + 1, text)
  ids[:, 0] = 0
  ids[0, -1] = eos
  ids[1, 7:] = eos
  mask = np.ones((2, LENGTH), np.int32)
  mask[1, 8:] = 0
  return ids.astype(np.int32), mask if padded else None


def reference_forward(model, ids: np.ndarray, mask: np.ndarray | None) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(),
                attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                output_hidden_states=True)
  result = {"last_hidden_state": out.last_hidden_state,
            "hidden_states": torch.stack(out.hidden_states)}
  if isinstance(model, HFCLIPTextModelWithProjection):
    result["text_embeds"] = out.text_embeds
  else:
    result["pooler_output"] = out.pooler_output
  return {k: v.double().numpy() for k, v in result.items()}


def assert_matches(ours, expected: dict[str, np.ndarray], tolerance: float) -> None:
  got = {"last_hidden_state": ours.last_hidden_state,
         "hidden_states": jnp.stack(ours.hidden_states),
         "text_embeds": ours.text_embeds, "pooler_output": ours.pooler_output}
  for key, value in expected.items():
    assert got[key].shape == value.shape, key
    assert rel_err(got[key], value) <= tolerance, (key, rel_err(got[key], value))




@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
def test_parity_with_transformers(reference, padded):
  name, model, folder = reference
  ids, mask = make_inputs(name, padded)
  expected = reference_forward(model, ids, mask)
  ours = CLIPTextModel.from_pretrained(folder)
  mask_arg = None if mask is None else jnp.asarray(mask)
  eager = ours(jnp.asarray(ids), mask_arg, output_hidden_states=True)
  forward = nnx.jit(lambda m, i, a: m(i, a, output_hidden_states=True))
  assert eager.last_hidden_state.dtype == jnp.float32
  assert len(eager.hidden_states) == CONFIGS[name][1]["num_hidden_layers"] + 1
  assert_matches(eager, expected, TOLERANCE)
  assert_matches(forward(ours, jnp.asarray(ids), mask_arg), expected, TOLERANCE)


def test_pooled_output_is_read_at_the_end_of_text_token(reference):
  """The pooled output is the final state at the first end-of-text token.

  Checked against transformers' last_hidden_state, since WithProjection returns no pooler_output.
  """
  name, model, folder = reference
  ids, _ = make_inputs(name, padded=False)
  expected = reference_forward(model, ids, None)["last_hidden_state"][np.arange(2), [11, 7]]
  pooled = CLIPTextModel.from_pretrained(folder)(jnp.asarray(ids)).pooler_output
  assert rel_err(pooled, expected) <= TOLERANCE


def test_outputs_without_hidden_states_or_projection(reference):
  name, _, folder = reference
  ids, _ = make_inputs(name, padded=False)
  out = CLIPTextModel.from_pretrained(folder)(jnp.asarray(ids))
  assert out.hidden_states is None
  has_projection = CONFIGS[name][0] is HFCLIPTextModelWithProjection
  assert (out.text_embeds is not None) == has_projection


def test_padding_mask_changes_only_padded_positions(reference):
  """Guards the masked parity test against a mask that is silently ignored.

  Under causal attention tokens before the padding cannot see it; the padded positions can.
  """
  name, _, folder = reference
  ids, mask = make_inputs(name, padded=True)
  ours = CLIPTextModel.from_pretrained(folder)
  unmasked = np.asarray(ours(jnp.asarray(ids)).last_hidden_state)
  masked = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state)
  np.testing.assert_allclose(masked[:, :8], unmasked[:, :8], rtol=1e-6, atol=1e-6)
  assert rel_err(masked[1, 8:], unmasked[1, 8:]) > 1e-3


def test_bfloat16_runs_close_to_float32_reference(reference):
  name, model, folder = reference
  ids, mask = make_inputs(name, padded=True)
  expected = reference_forward(model, ids, mask)
  ours = CLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  out = nnx.jit(lambda m, i, a: m(i, a, output_hidden_states=True))(
      ours, jnp.asarray(ids), jnp.asarray(mask))
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out.last_hidden_state, np.float32)).all()
  assert_matches(out, expected, 5e-2)


def test_legacy_text_model_prefix_and_position_ids_buffer(reference, tmp_path):
  """Keys prefixed `text_model.` plus the `position_ids` buffer (pre-v5 files: FLUX's, SDXL's)."""
  name, model, folder = reference
  tensors = safetensors.numpy.load_file(folder / "model.safetensors")
  prefixed = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
              for k, v in tensors.items()}
  positions = CONFIGS[name][1]["max_position_embeddings"]
  prefixed["text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
  safetensors.numpy.save_file(prefixed, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  ids, _ = make_inputs(name, padded=False)
  out = CLIPTextModel.from_pretrained(tmp_path)(jnp.asarray(ids), output_hidden_states=True)
  assert_matches(out, reference_forward(model, ids, None), TOLERANCE)


@pytest.fixture
def copied_checkpoint(reference, tmp_path):
  """(name, a writable copy of a reference checkpoint folder, its key prefix)."""
  name, _, folder = reference
  for file in ("config.json", "model.safetensors"):
    (tmp_path / file).write_bytes((folder / file).read_bytes())
  prefix = "text_model." if CONFIGS[name][0] is HFCLIPTextModelWithProjection else ""
  return name, tmp_path, prefix


def test_missing_key_is_named(copied_checkpoint):
  _, folder, prefix = copied_checkpoint
  key = f"{prefix}encoder.layers.1.mlp.fc2.bias"
  rewrite_safetensors(folder, lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"missing keys.*{key}"):
    CLIPTextModel.from_pretrained(folder)


def test_unexpected_key_is_named(copied_checkpoint):
  _, folder, prefix = copied_checkpoint
  key = f"{prefix}encoder.layers.7.mlp.fc1.weight"
  rewrite_safetensors(folder, lambda t: t.update({key: np.zeros((4, 4), np.float32)}))
  with pytest.raises(CheckpointError, match=f"unexpected keys.*{key}"):
    CLIPTextModel.from_pretrained(folder)


def test_wrong_shape_names_key_expected_and_found(copied_checkpoint):
  _, folder, prefix = copied_checkpoint
  key = f"{prefix}embeddings.position_embedding.weight"
  rewrite_safetensors(folder, lambda t: t.update({key: np.ascontiguousarray(t[key][:10])}))
  with pytest.raises(CheckpointError, match=rf"{key}.*shape \(10, \d+\), expected \(16, \d+\)"):
    CLIPTextModel.from_pretrained(folder)


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "relu"}, "relu"),
    ({"architectures": ["CLIPModel"]}, "CLIPModel"),
    ({"model_type": "clip"}, "model_type 'clip'"),
    ({"eos_token_id": [2, 3]}, "eos_token_id"),
], ids=["activation", "architecture", "model_type", "eos_list"])
def test_unsupported_config_is_a_checkpoint_error(copied_checkpoint, change, message):
  _, folder, _ = copied_checkpoint
  path = folder / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(CheckpointError, match=message):
    CLIPTextModel.from_pretrained(folder)


def test_sequence_longer_than_positions_is_a_value_error(reference):
  _, _, folder = reference
  ours = CLIPTextModel.from_pretrained(folder)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
    ours(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("preset,hf_class", [
    (CLIPTextConfig.vit_l_14, HFCLIPTextModel),
    (CLIPTextConfig.bigg_14, HFCLIPTextModelWithProjection),
], ids=["vit_l_14", "bigg_14"])
def test_preset_eval_shape_allocates_nothing_and_matches_transformers_size(preset, hf_class):
  config = preset()
  model = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  hf_kwargs = {k: v for k, v in config.to_dict().items() if v is not None}
  with torch.device("meta"):
    hf_model = hf_class(HFCLIPTextConfig(**hf_kwargs))
  assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == sum(
      p.numel() for p in hf_model.parameters())


def test_config_round_trip_and_errors():
  config = CLIPTextConfig.bigg_14()
  assert CLIPTextConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="unknown keys"):
    CLIPTextConfig.from_dict({**config.to_dict(), "text_config": {}})
  with pytest.raises(ValueError, match="not divisible"):
    CLIPTextConfig(vocab_size=10, hidden_size=30, intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=4)

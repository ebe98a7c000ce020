"""A tiny model family with its converter, used to test the conversion machinery on its own.

Source checkpoints are written by `write_source` in a diffusers-like layout (config.json with
`_class_name` "TinyNetModel" and torch-layout weights (out, in)); `register` adds the family to the
registry for one test.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import registry
from convert.safetensors_io import CheckpointError, CheckpointReader, save_file
from models.layers import LayerNorm, Linear

MODEL_TYPES = ("TinyNetModel",)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  in_features: int = 8
  hidden_size: int = 16
  num_layers: int = 2

  @classmethod
  def from_dict(cls, d: dict) -> TinyConfig:
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class TinyNet(nnx.Module):
  """proj_in -> blocks (bias-free linears with tanh) -> norm -> proj_out; (B, F) -> (B, F)."""

  def __init__(self, config: TinyConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    f, h = config.in_features, config.hidden_size
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    self.proj_in = Linear(f, h, **kw)
    self.blocks = nnx.List([Linear(h, h, use_bias=False, **kw) for _ in range(config.num_layers)])
    self.norm = LayerNorm(h, param_dtype=param_dtype)
    self.proj_out = Linear(h, f, **kw)

  def __call__(self, hidden_states: jax.Array) -> jax.Array:
    x = self.proj_in(hidden_states)
    for block in self.blocks:
      x = jnp.tanh(block(x))
    return self.proj_out(self.norm(x))


def config_from_json(cfg: dict) -> TinyConfig:
  try:
    return TinyConfig(cfg["in_features"], cfg["hidden_size"], cfg["num_layers"])
  except KeyError as e:
    raise CheckpointError(f"TinyNetModel config.json lacks {e}") from None


def source_shapes(config: TinyConfig) -> dict[str, tuple[int, ...]]:
  """Torch-layout key -> shape of a TinyNetModel checkpoint."""
  f, h = config.in_features, config.hidden_size
  shapes = {"proj_in.weight": (h, f), "proj_in.bias": (h,), "norm.weight": (h,),
            "norm.bias": (h,), "proj_out.weight": (f, h), "proj_out.bias": (f,)}
  shapes.update({f"blocks.{i}.weight": (h, h) for i in range(config.num_layers)})
  return shapes


def convert_state(reader: CheckpointReader, config: TinyConfig) -> dict[str, np.ndarray]:
  shapes = source_shapes(config)
  unexpected = sorted(set(reader.keys()) - set(shapes))
  if unexpected:
    raise CheckpointError(f"{reader.path}: unexpected keys {unexpected}")
  out = {}
  for key, shape in shapes.items():
    if key not in reader:
      raise CheckpointError(f"{reader.path}: missing key {key!r}")
    if reader.shape(key) != shape:
      raise CheckpointError(f"{reader.path}: key {key!r} has shape {reader.shape(key)}, "
                            f"expected {shape}")
    array = reader.get(key)
    leaf = "scale" if key == "norm.weight" else "kernel" if key.endswith(".weight") else "bias"
    out[f"{key.rsplit('.', 1)[0].replace('.', '/')}/{leaf}"] = array.T if array.ndim == 2 else array
  return out


def source_weights(config: TinyConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(dtype) for k, s in source_shapes(config).items()}


def write_source(folder: Path, config: TinyConfig, weights: dict[str, np.ndarray]) -> Path:
  """A diffusers-like component folder: config.json and diffusion_pytorch_model.safetensors."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps({"_class_name": "TinyNetModel",
                                                  **config.to_dict()}))
  save_file(weights, folder / "diffusion_pytorch_model.safetensors")
  return folder


def reference_forward(weights: dict[str, np.ndarray], x: np.ndarray, num_layers: int) -> np.ndarray:
  """TinyNet's forward in float64 numpy on the torch-layout weights (an independent reference)."""
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  h = x.astype(np.float64) @ w["proj_in.weight"].T + w["proj_in.bias"]
  for i in range(num_layers):
    h = np.tanh(h @ w[f"blocks.{i}.weight"].T)
  mean = h.mean(-1, keepdims=True)
  h = (h - mean) / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
  h = h * w["norm.weight"] + w["norm.bias"]
  return h @ w["proj_out.weight"].T + w["proj_out.bias"]


ENTRY = registry.ModelEntry("tiny", sys.modules[__name__], TinyNet, TinyConfig)


def register(monkeypatch) -> registry.ModelEntry:
  """Adds the tiny family to the registry for one test."""
  monkeypatch.setattr(registry, "ENTRIES", (*registry.ENTRIES, ENTRY))
  return ENTRY

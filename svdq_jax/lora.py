"""LoRAs on parameter pytrees: pure functions, no file I/O (`convert.lora` reads the files).

An adapter is `{kernel path: LayerLoRA}`, keyed by the "/"-joined paths of `svdq_jax.tree`
("transformer_blocks/0/attn/to_q/kernel"). `apply_loras(params, adapters, strengths)` returns a new
tree in which

  - an `SVDQLinear` gets each LoRA concatenated onto its low-rank branch (Nunchaku's way: the rank
    grows by the LoRA's rank, the 4-bit residual, scales and smoothing are untouched, and the fused
    kernel computes the LoRA in the same pass as the branch; `lora_down` acts on the raw input, so
    no smoothing correction is needed);
  - a plain kernel (the layers kept in 16 bits: embedders, the final projection, or a whole float
    model) gets `kernel + sum_i strength_i * scale_i * lora_down_i @ lora_up_i`, computed in float32
    and stored in the kernel's dtype;
  - a convolution's HWIO kernel (kh, kw, I, O), always 16-bit, is the same for its matrix view
    (kh * kw * I, O): its LoRA's lora_down is (kh * kw * I, r) in that order (a conv LoRA's
    down kernel (r, I, kh, kw) transposed to (kh, kw, I, r) and flattened; its 1x1 up kernel is
    lora_up), and the product is reshaped back to the kernel's shape.

Strengths are arrays: a new strength changes values, never shapes, so a jitted sampler that takes
the parameters as an argument is not recompiled (and `apply_loras` itself jits with the strengths
as a traced argument). The base tree is never modified: unloading every LoRA is using it again.

Training a LoRA keeps it apart instead: `with_lora_branches(params, factors, scale)` wraps each
targeted kernel in a `LoRAKernel`, whose float32 branch `svdq_dot` adds to the frozen kernel's
product; `jax.grad` with respect to `factors` then reaches the LoRA through `svdq_dot` (see
`svdq_jax.dot` for the backward pass of a 4-bit kernel). `adapter_of(factors, scale)` turns the
trained factors into the adapter `apply_loras` takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax.errors import InputError
from svdq_jax.qlinear import SVDQLinear
from svdq_jax.tree import map_named_leaves, named_leaves


class LayerLoRA(NamedTuple):
  """One layer's LoRA: `y += scale * strength * (x @ lora_down) @ lora_up`.

  Attributes:
    lora_down: (K, r) float (the file's lora_A / lora_down, transposed to act on x (..., K)).
    lora_up: (r, N) float (lora_B / lora_up, transposed).
    scale: the file's own scaling, alpha / r (1.0 for a file without alpha): applied once, by
      `apply_loras`, times the user's strength.
  """

  lora_down: Any
  lora_up: Any
  scale: float


Adapter = Mapping[str, LayerLoRA]
LoRAFactors = Mapping[str, Mapping[str, Any]]
"""Trainable LoRA factors by kernel path: `{path: {"lora_down": (K, r), "lora_up": (r, N)}}`."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAKernel:
  """A frozen kernel with a separate LoRA branch (for training one):
  `svdq_dot(x, w) == svdq_dot(x, w.kernel) + w.scale * (x @ w.lora_down) @ w.lora_up`, the branch
  in float32.

  Attributes:
    kernel: the layer's kernel, a plain (K, N) array or an `SVDQLinear`.
    lora_down: (K, r) float32.
    lora_up: (r, N) float32.
    scale: alpha / r (static).
  """

  kernel: Any
  lora_down: jax.Array
  lora_up: jax.Array
  scale: float = dataclasses.field(metadata={"static": True})

  @property
  def shape(self) -> tuple[int, int]:
    """(K, N) of the wrapped kernel."""
    return tuple(self.kernel.shape)


def _is_linear(leaf: Any) -> bool:
  if isinstance(leaf, SVDQLinear):
    return True
  return (getattr(leaf, "ndim", 0) == 2 and hasattr(leaf, "dtype")
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def linear_shapes(params: Any) -> dict[str, tuple[int, int]]:
  """`{kernel path: (K, N)}` of every linear layer of `params` a LoRA can target.

  A linear layer is a leaf named "kernel" that is an `SVDQLinear` or a 2-D float array (an
  nnx.State, an nnx.Module or a nested dict; ShapeDtypeStructs count).
  """
  return {path: tuple(int(d) for d in leaf.shape) for path, leaf in named_leaves(params)
          if path.rsplit("/", 1)[-1] == "kernel" and _is_linear(leaf)}


def kernel_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """`{kernel path: shape}` of every layer a LoRA can target: the linear layers of
  `linear_shapes` (K, N), and the convolutions, plain 4-D float kernels (kh, kw, I, O)."""
  shapes: dict[str, tuple[int, ...]] = dict(linear_shapes(params))
  for path, leaf in named_leaves(params):
    if (path.rsplit("/", 1)[-1] == "kernel" and getattr(leaf, "ndim", 0) == 4
        and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
      shapes[path] = tuple(int(d) for d in leaf.shape)
  return shapes


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
  """(K, N) of a kernel of `shape`: itself for a linear (K, N), (kh * kw * I, O) for a conv."""
  return int(np.prod(shape[:-1])), int(shape[-1])


def check_adapter(adapter: Adapter, shapes: Mapping[str, tuple[int, int]], *,
                  name: str = "LoRA") -> None:
  """Raises `InputError` naming `name` unless every layer of `adapter` is a linear of `shapes`
  with factors (K, r) and (r, N) of that layer's (K, N)."""
  unknown = sorted(set(adapter) - set(shapes))
  if unknown:
    raise InputError(f"{name}: {len(unknown)} layers are not linear layers of the model, first "
                     f"{unknown[:5]}")
  for path, lora in adapter.items():
    k, n = shapes[path]
    down, up = lora.lora_down, lora.lora_up
    if (len(down.shape) != 2 or len(up.shape) != 2 or down.shape[0] != k or up.shape[1] != n
        or down.shape[1] != up.shape[0]):
      raise InputError(f"{name}: layer {path!r} is ({k}, {n}); its LoRA needs lora_down (K={k}, r)"
                       f" and lora_up (r, N={n}), got {tuple(down.shape)} and {tuple(up.shape)}")


def lora_rank(params: Any) -> dict[str, int]:
  """`{kernel path: rank}` of the low-rank branch of every `SVDQLinear` of `params`."""
  return {path: leaf.rank for path, leaf in named_leaves(params) if isinstance(leaf, SVDQLinear)}


def _join_branch(w: SVDQLinear, loras: list[tuple[jax.Array, LayerLoRA]]) -> SVDQLinear:
  """The SVDQLinear with each (strength, LoRA) concatenated onto its branch, in the branch dtype."""
  downs = [w.lora_down]
  ups = [w.lora_up]
  for strength, lora in loras:
    downs.append(jnp.asarray(lora.lora_down).astype(w.lora_down.dtype))
    factor = strength * jnp.float32(lora.scale)
    ups.append((factor * jnp.asarray(lora.lora_up, jnp.float32)).astype(w.lora_up.dtype))
  return dataclasses.replace(w, lora_down=jnp.concatenate(downs, axis=1),
                             lora_up=jnp.concatenate(ups, axis=0))


def _add_to_kernel(kernel: jax.Array, loras: list[tuple[jax.Array, LayerLoRA]]) -> jax.Array:
  """kernel + sum strength * scale * down @ up (reshaped to a conv kernel's HWIO shape), in
  float32, stored in the kernel's dtype."""
  total = jnp.asarray(kernel, jnp.float32)
  for strength, lora in loras:
    product = (jnp.asarray(lora.lora_down, jnp.float32) @ jnp.asarray(lora.lora_up, jnp.float32))
    total = total + (strength * jnp.float32(lora.scale)) * product.reshape(kernel.shape)
  return total.astype(kernel.dtype)


def apply_loras(params: Any, adapters: Sequence[Adapter], strengths: Any, *,
                max_rank: int | None = None) -> Any:
  """`params` with the LoRAs applied; a pure function (the input tree is not modified).

  Args:
    params: an nnx.State (e.g. `nnx.state(model)`) or a nested dict, float or quantized.
    adapters: one `{kernel path: LayerLoRA}` per LoRA (`convert.lora.load_loras`); a conv's
      LoRA acts on its kernel's matrix view (`matrix_shape`).
    strengths: one strength per adapter, an array (A,) or a sequence of numbers / 0-d arrays;
      traced under `jax.jit` like any array. 0 leaves a LoRA without effect (its rank stays).
    max_rank: the largest low-rank branch an SVDQLinear may end up with (the GPU kernel's limit,
      `pallas_kernels.svdq_linear.config.MAX_RANK`, when sampling on it); None: no limit (XLA).

  Returns:
    The same structure: each targeted SVDQLinear with rank r + sum of its LoRAs' ranks (factors
    in its branch dtype, bfloat16), each targeted plain (linear or conv) kernel with the LoRA
    products added.

  Raises:
    InputError: as many strengths as adapters are needed; a LoRA layer that is not a linear of
      `params` or whose factors do not fit it; a branch above `max_rank` (naming the layer).
  """
  strengths = jnp.asarray(strengths, jnp.float32).reshape(-1)
  if strengths.shape[0] != len(adapters):
    raise InputError(f"apply_loras: {len(adapters)} LoRAs need as many strengths, got "
                     f"{strengths.shape[0]}")
  shapes = {path: matrix_shape(shape) for path, shape in kernel_shapes(params).items()}
  by_layer: dict[str, list[tuple[jax.Array, LayerLoRA]]] = {}
  for i, adapter in enumerate(adapters):
    check_adapter(adapter, shapes, name=f"apply_loras: LoRA {i}")
    for path, lora in adapter.items():
      by_layer.setdefault(path, []).append((strengths[i], lora))

  def apply(path: str, leaf: Any) -> Any:
    loras = by_layer.get(path)
    if not loras:
      return leaf
    if not isinstance(leaf, SVDQLinear):
      return _add_to_kernel(leaf, loras)
    rank = leaf.rank + sum(int(lora.lora_down.shape[1]) for _, lora in loras)
    if max_rank is not None and rank > max_rank:
      raise InputError(f"apply_loras: layer {path!r} would get a low-rank branch of rank {rank} "
                       f"({leaf.rank} + the LoRAs'), above the limit {max_rank}; use fewer or "
                       "lower-rank LoRAs")
    return _join_branch(leaf, loras)

  return map_named_leaves(apply, params)


def init_lora_factors(shapes: Mapping[str, tuple[int, int]], rank: int, key: jax.Array
                      ) -> dict[str, dict[str, jax.Array]]:
  """Fresh LoRA factors for the layers of `shapes` (`{path: (K, N)}`), as PEFT initialises them:
  lora_down uniform in +-1/sqrt(K) (PEFT's Kaiming-uniform with a = sqrt(5)), lora_up zero, so
  the model starts as the base model. float32; the key of layer i is fold_in(key, i) in sorted
  path order."""
  if rank < 1:
    raise InputError(f"init_lora_factors: rank must be >= 1, got {rank}")
  factors = {}
  for i, path in enumerate(sorted(shapes)):
    k, n = shapes[path]
    bound = 1.0 / np.sqrt(k)
    down = jax.random.uniform(jax.random.fold_in(key, i), (k, rank), jnp.float32, -bound, bound)
    factors[path] = {"lora_down": down, "lora_up": jnp.zeros((rank, n), jnp.float32)}
  return factors


def with_lora_branches(params: Any, factors: LoRAFactors, scale: float) -> Any:
  """`params` with each kernel of `factors` wrapped in a `LoRAKernel` (a pure function).

  Raises:
    InputError: a path of `factors` that is not a linear layer of `params`, or factors whose
      shapes do not fit it.
  """
  check_adapter(adapter_of(factors, scale), linear_shapes(params), name="with_lora_branches")

  def wrap(path: str, leaf: Any) -> Any:
    layer = factors.get(path)
    if layer is None:
      return leaf
    return LoRAKernel(leaf, layer["lora_down"], layer["lora_up"], scale)

  return map_named_leaves(wrap, params)


def adapter_of(factors: LoRAFactors, scale: float) -> dict[str, LayerLoRA]:
  """The adapter `{path: LayerLoRA}` of trained factors, for `apply_loras` or writing a file."""
  return {path: LayerLoRA(layer["lora_down"], layer["lora_up"], scale)
          for path, layer in factors.items()}

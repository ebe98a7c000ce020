"""LoRA files -> adapters `{our kernel path: LayerLoRA}` for `svdq_jax.lora.apply_loras`.

Formats (detected per key, by the suffix of each tensor's name):

  diffusers / PEFT   `<module>.lora_A.weight` (r, K), `<module>.lora_B.weight` (N, r), optionally
                     `<module>.alpha`; prefixes "transformer.", "unet.", "base_model.model." (fal).
  kohya (sd-scripts) `lora_unet_<module>.lora_down.weight` (r, K), `.lora_up.weight` (N, r),
                     `.alpha`; also "lora_transformer_" and ComfyUI's "diffusion_model." prefixes.
  XLabs (FLUX.1)     `double_blocks.<i>.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` and
                     `single_blocks.<i>.processor.{qkv,proj}_lora.{down,up}.weight`.

`<module>` may be a diffusers module path (dots or, for kohya, underscores); for SDXL, a module
of the original (SGM / LDM) UNet, as kohya writes them (`input_blocks_4_1_transformer_blocks_0_
attn1_to_q`, see `_sdxl_sgm_targets`); for FLUX.1, a module of Black Forest Labs' original model
(`double_blocks.0.img_attn.qkv`, `single_blocks.0.linear1`, `final_layer.adaLN_modulation.1`,
...), as kohya, XLabs and fal write them. A fused BFL
projection is split onto our separate layers: `img_attn.qkv` onto to_q / to_k / to_v (the rows of
lora_up; lora_down is shared), a single block's `linear1` onto to_q / to_k / to_v / proj_mlp, and
`final_layer.adaLN_modulation.1` onto norm_out.linear with its (shift, scale) halves swapped to
diffusers' (scale, shift). Rank components whose lora_up part is all zero for a layer (a block-
diagonal qkv LoRA) are dropped from that layer, which changes nothing but the rank.

Convolutions (SDXL's ResNet, conv_in/out, down/upsamplers; kohya's LoCon "conv_dim" LoRAs and
PEFT's Conv2d LoRAs): lora_down a kernel (r, I, kh, kw), lora_up a 1x1 kernel (O, r, 1, 1); they
are applied in 16 bits to the conv's kernel (convs are never quantized), as
`svdq_jax.lora.apply_loras` describes.

Text encoders: a pipeline's LoRA file may hold LoRAs of its text encoders too, `text_encoder.` /
`text_encoder_2.` (diffusers/PEFT, transformers' `text_model.` module paths) or `lora_te1_` /
`lora_te2_` (`lora_te_`: the first) for kohya. `read_pipeline_lora` returns one adapter per
component; the components a pipeline does not apply LoRAs to are an error naming the first key.

`write_lora` writes an adapter (e.g. one trained by `pipelines.train_lora`) as a diffusers/PEFT
file: `transformer.<module>.lora_A.weight` (r, K) and `.lora_B.weight` (N, r) with PEFT's config
(r, lora_alpha, target_modules) in the `lora_adapter_metadata` entry, as diffusers'
`save_lora_weights` writes it. The scale is folded into lora_B and lora_alpha = r, so every
reader gets the same product, whether it reads the metadata or not (diffusers'
`load_lora_adapter` on a file path without `use_safetensors=True` does not).

Scaling, applied once (`LayerLoRA.scale`, used by `apply_loras` times the strength):
  scale = alpha / r, with r the module's rank (rows of its lora_down) and alpha from, in order,
  the module's `.alpha` tensor, the diffusers metadata `lora_adapter_metadata` (the component's
  `alpha_pattern` entry for the module, else its `lora_alpha`), else alpha = r (scale 1: a file
  without alpha means `W + B @ A`, as diffusers, PEFT and XLabs read it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.mapping import FLOAT_DTYPES
from convert.safetensors_io import CheckpointError, CheckpointReader, save_file
from svdq_jax.lora import Adapter, LayerLoRA, kernel_shapes, matrix_shape

MODEL_TYPES: tuple[str, ...] = ("flux", "pixart", "sdxl")
COMPONENT_PREFIX = {"flux": "transformer", "pixart": "transformer", "sdxl": "unet"}
"""The key prefix of the denoiser's LoRA in a diffusers pipeline's LoRA file, by model type."""
_SHOWN = 5  # unmatched keys named by the error

TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
# Key prefixes that name the denoiser, stripped before the module is looked up.
_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.diffusion_model.",
             "diffusion_model.", "lora_unet_", "lora_transformer_")
# Key prefixes of the text encoders' LoRAs (diffusers/PEFT, kohya) -> (component, the prefix of
# transformers' module paths after it, which our CLIP paths leave out).
_TEXT_ENCODER_PREFIXES = (("text_encoder_2.", "text_encoder_2", "text_model."),
                          ("text_encoder.", "text_encoder", "text_model."),
                          ("lora_te2_", "text_encoder_2", "text_model_"),
                          ("lora_te1_", "text_encoder", "text_model_"),
                          ("lora_te_", "text_encoder", "text_model_"))
# Tensor-name suffixes by format: (regex, format, role).
_SUFFIXES: tuple[tuple[re.Pattern, str, str], ...] = (
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "peft", "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "peft", "up"),
    (re.compile(r"\.lora_down\.weight$"), "kohya", "down"),
    (re.compile(r"\.lora_up\.weight$"), "kohya", "up"),
    (re.compile(r"\.processor\.[a-z_]+lora[12]?\.down\.weight$"), "xlabs", "down"),
    (re.compile(r"\.processor\.[a-z_]+lora[12]?\.up\.weight$"), "xlabs", "up"),
    (re.compile(r"\.alpha$"), "alpha", "alpha"),
)
# Adapter kinds that are not a low-rank product (name fragments -> what they are).
_UNSUPPORTED = {"lokr_w1": "LoKr (LyCORIS Kronecker product)", "lokr_w2": "LoKr",
                "hada_w1": "LoHa (LyCORIS Hadamard product)", "dora_scale": "DoRA",
                "lora_magnitude_vector": "DoRA", ".diff_b": "a bias difference (diff_b)",
                ".diff": "a full weight difference (diff)", "lora_B.bias": "a LoRA bias",
                "lora_up.bias": "a LoRA bias"}
_METADATA_KEY = "lora_adapter_metadata"


@dataclasses.dataclass(frozen=True)
class _Piece:
  """Columns [start, stop) of a (fused) module's output: our layer `path`'s from `offset` on."""

  path: str
  start: int
  stop: int
  offset: int = 0


def _full(path: str, n: int) -> tuple[_Piece, ...]:
  return (_Piece(path, 0, n),)


def _split(shapes: Mapping[str, tuple[int, int]], paths: Sequence[str]) -> tuple[_Piece, ...]:
  """A fused projection whose output is the concatenation of the layers `paths`, in order."""
  pieces, start = [], 0
  for path in paths:
    n = shapes[path][1]
    pieces.append(_Piece(path, start, start + n))
    start += n
  return tuple(pieces)


def _normalized(name: str) -> str:
  return name.replace(".", "_")


def _flux_bfl_targets(shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[_Piece, ...]]:
  """BFL (and XLabs) module names of FLUX.1 -> pieces of our layers, for the blocks present."""
  targets: dict[str, tuple[_Piece, ...]] = {}

  def add(name: str, paths: Sequence[str]) -> None:
    paths = [f"{p}/kernel" for p in paths]
    if all(p in shapes for p in paths):
      targets[_normalized(name)] = _split(shapes, paths)

  i = 0
  while f"transformer_blocks/{i}/attn/to_q/kernel" in shapes:
    ours, bfl = f"transformer_blocks/{i}", f"double_blocks_{i}"
    img_qkv = [f"{ours}/attn/to_{x}" for x in "qkv"]
    txt_qkv = [f"{ours}/attn/add_{x}_proj" for x in "qkv"]
    for name, paths in (
        ("img_attn_qkv", img_qkv), ("img_attn_proj", [f"{ours}/attn/to_out/0"]),
        ("img_mlp_0", [f"{ours}/ff/net/0/proj"]), ("img_mlp_2", [f"{ours}/ff/net/2"]),
        ("img_mod_lin", [f"{ours}/norm1/linear"]),
        ("txt_attn_qkv", txt_qkv), ("txt_attn_proj", [f"{ours}/attn/to_add_out"]),
        ("txt_mlp_0", [f"{ours}/ff_context/net/0/proj"]),
        ("txt_mlp_2", [f"{ours}/ff_context/net/2"]),
        ("txt_mod_lin", [f"{ours}/norm1_context/linear"]),
        ("processor_qkv_lora1", img_qkv), ("processor_proj_lora1", [f"{ours}/attn/to_out/0"]),
        ("processor_qkv_lora2", txt_qkv), ("processor_proj_lora2", [f"{ours}/attn/to_add_out"])):
      add(f"{bfl}_{name}", paths)
    i += 1
  i = 0
  while f"single_transformer_blocks/{i}/attn/to_q/kernel" in shapes:
    ours, bfl = f"single_transformer_blocks/{i}", f"single_blocks_{i}"
    qkv = [f"{ours}/attn/to_{x}" for x in "qkv"]
    for name, paths in (
        ("linear1", [*qkv, f"{ours}/proj_mlp"]), ("linear2", [f"{ours}/proj_out"]),
        ("modulation_lin", [f"{ours}/norm/linear"]),
        ("processor_qkv_lora", qkv), ("processor_proj_lora", [f"{ours}/proj_out"])):
      add(f"{bfl}_{name}", paths)
    i += 1
  for bfl, ours in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                    ("time_in", "time_text_embed/timestep_embedder"),
                    ("vector_in", "time_text_embed/text_embedder"),
                    ("guidance_in", "time_text_embed/guidance_embedder")):
    if bfl in ("img_in", "txt_in"):
      add(bfl, [ours])
    else:
      add(f"{bfl}_in_layer", [f"{ours}/linear_1"])
      add(f"{bfl}_out_layer", [f"{ours}/linear_2"])
  add("final_layer_linear", ["proj_out"])
  norm_out = "norm_out/linear/kernel"
  if norm_out in shapes:
    half = shapes[norm_out][1] // 2  # BFL: (shift, scale); diffusers: (scale, shift)
    targets["final_layer_adaLN_modulation_1"] = (_Piece(norm_out, 0, half, half),
                                                 _Piece(norm_out, half, 2 * half, 0))
  return targets


# SDXL: the modules inside a diffusers ResNet block -> the original UNet's ResBlock.
_SGM_RESNET = {"conv1": "in_layers/2", "time_emb_proj": "emb_layers/1", "conv2": "out_layers/3",
               "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks/0/0", "conv_out": "out/2",
            "time_embedding/linear_1": "time_embed/0", "time_embedding/linear_2": "time_embed/2",
            "add_embedding/linear_1": "label_emb/0/0", "add_embedding/linear_2": "label_emb/0/2"}


def _sgm_module_names(modules: set[str]) -> dict[str, str]:
  """SDXL: our (diffusers) module prefixes -> the original (SGM) UNet's, for the blocks present.

  The original UNet numbers its down path `input_blocks.<n>` (n = 0: conv_in; then one per ResNet
  layer of each down block, its ResNet at `.0` and its transformer at `.1`, and one per
  downsampler, `.0.op`), the mid block `middle_block.{0,1,2}` (ResNet, transformer, ResNet) and
  its up path `output_blocks.<n>` (one per ResNet layer of each up block; the block's upsampler
  follows the last layer's ResNet and transformer in the same entry).
  """
  def has(prefix: str) -> bool:
    return any(m.startswith(prefix + "/") for m in modules)

  def count(prefix: str) -> int:
    n = 0
    while has(f"{prefix}/{n}"):
      n += 1
    return n

  names: dict[str, str] = {}
  n = 1
  for i in range(count("down_blocks")):
    block = f"down_blocks/{i}"
    for j in range(count(f"{block}/resnets")):
      names[f"{block}/resnets/{j}"] = f"input_blocks/{n}/0"
      names[f"{block}/attentions/{j}"] = f"input_blocks/{n}/1"
      n += 1
    if has(f"{block}/downsamplers/0"):
      names[f"{block}/downsamplers/0/conv"] = f"input_blocks/{n}/0/op"
      n += 1
  for j, sgm in ((0, 0), (1, 2)):
    names[f"mid_block/resnets/{j}"] = f"middle_block/{sgm}"
  names["mid_block/attentions/0"] = "middle_block/1"
  n = 0
  for i in range(count("up_blocks")):
    block = f"up_blocks/{i}"
    layers = count(f"{block}/resnets")
    for j in range(layers):
      names[f"{block}/resnets/{j}"] = f"output_blocks/{n}/0"
      attention = has(f"{block}/attentions/{j}")
      names[f"{block}/attentions/{j}"] = f"output_blocks/{n}/1"
      if j == layers - 1 and has(f"{block}/upsamplers/0"):
        names[f"{block}/upsamplers/0/conv"] = f"output_blocks/{n}/{1 + attention}/conv"
      n += 1
  return names


def _sdxl_sgm_targets(shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[_Piece, ...]]:
  """SDXL: normalized original-UNet module names (kohya's SDXL LoRAs) -> our layers.

  As diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key` read them:
  the block numbering of `_sgm_module_names`; in a ResNet, in_layers.2 = conv1, emb_layers.1 =
  time_emb_proj, out_layers.3 = conv2, skip_connection = conv_shortcut; time_embed.{0,2} and
  label_emb.0.{0,2} are the time and "text_time" embeddings' linears, input_blocks.0.0 is
  conv_in and out.2 conv_out. A transformer's inner names are diffusers' own.
  """
  modules = {path.removesuffix("/kernel") for path in shapes}
  blocks = _sgm_module_names(modules)
  targets = {}
  for path, (_, n) in shapes.items():
    module = path.removesuffix("/kernel")
    sgm = _SGM_TOP.get(module)
    for ours, theirs in () if sgm else blocks.items():
      if module == ours or module.startswith(ours + "/"):
        inner = module[len(ours) + 1:]
        if "resnets/" in ours:
          inner = _SGM_RESNET.get(inner)  # None: no module of an original ResBlock
          if inner is None:
            break
        sgm = f"{theirs}/{inner}" if inner else theirs
        break
    if sgm is not None:
      targets[_normalized(sgm.replace("/", "."))] = _full(path, n)
  return targets


def lora_targets(model_type: str, shapes: Mapping[str, tuple[int, ...]], *,
                 component: str | None = None) -> dict[str, tuple[_Piece, ...]]:
  """Normalized module name ("." -> "_") -> the pieces of our layers its LoRA lands on.

  Every model: its diffusers (transformers, for a text encoder) module paths
  ("transformer_blocks_0_attn_to_q"). The denoiser of FLUX.1 also: the BFL / XLabs names; of
  SDXL: the original UNet's (see the module docstring).

  Args:
    model_type: "flux", "pixart" or "sdxl".
    shapes: `{kernel path: shape}` of the component's layers (`svdq_jax.lora.kernel_shapes`).
    component: the denoiser (None, or `COMPONENT_PREFIX[model_type]`) or a text encoder.
  """
  if model_type not in MODEL_TYPES:
    raise CheckpointError(f"LoRA: unknown model type {model_type!r}; known: {list(MODEL_TYPES)}")
  matrices = {path: matrix_shape(shape) for path, shape in shapes.items()}
  targets = {_normalized(path.removesuffix("/kernel").replace("/", ".")): _full(path, n)
             for path, (_, n) in matrices.items()}
  if component not in (None, COMPONENT_PREFIX[model_type]):
    return targets
  extra = {"flux": _flux_bfl_targets, "sdxl": _sdxl_sgm_targets}.get(model_type)
  if extra is not None:
    names = extra(matrices)
    clash = sorted(set(names) & set(targets))
    if clash:
      raise ValueError(f"lora_targets: original-model names {clash} are also diffusers names")
    targets |= names
  return targets


def _strip_prefix(module: str) -> str:
  for prefix in _PREFIXES:
    if module.startswith(prefix):
      return module[len(prefix):]
  return module


def _split_component(module: str, denoiser: str) -> tuple[str, str]:
  """(component, module path inside it) of a LoRA module name."""
  for prefix, component, inner in _TEXT_ENCODER_PREFIXES:
    if module.startswith(prefix):
      module = module[len(prefix):]
      return component, module[len(inner):] if module.startswith(inner) else module
  return denoiser, _strip_prefix(module)


def _classify(key: str) -> tuple[str, str, str] | None:
  """(module, format, role) of a tensor name, or None when it is no LoRA tensor we know."""
  for pattern, fmt, role in _SUFFIXES:
    match = pattern.search(key)
    if match:
      if fmt == "xlabs":  # the module is the processor's name: "double_blocks.0.processor.x"
        module = key[:match.start()] + match.group(0).rsplit(".", 2)[0]
        return module, fmt, role
      return key[:match.start()], fmt, role
  return None


def _metadata_alphas(metadata: Mapping[str, str], component: str, denoiser: str, *, name: str
                     ) -> tuple[float | None, dict]:
  """(lora_alpha, alpha_pattern) of diffusers' `lora_adapter_metadata` for a component (keys
  "unet.lora_alpha", "text_encoder.lora_alpha", ...; for the denoiser also "transformer." and a
  model-level file's "lora_alpha")."""
  raw = metadata.get(_METADATA_KEY)
  if raw is None:
    return None, {}
  try:
    config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{name}: metadata {_METADATA_KEY!r} is not JSON: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{name}: metadata {_METADATA_KEY!r} is not a JSON object")
  prefixes = ("", "transformer.", "unet.") if component == denoiser else (f"{component}.",)
  for prefix in prefixes:
    if f"{prefix}lora_alpha" in config:
      alpha = config[f"{prefix}lora_alpha"]
      pattern = config.get(f"{prefix}alpha_pattern") or {}
      if not isinstance(alpha, (int, float)) or not isinstance(pattern, dict):
        raise CheckpointError(f"{name}: metadata {_METADATA_KEY!r} has lora_alpha {alpha!r} and "
                              f"alpha_pattern {pattern!r}; expected a number and an object")
      return float(alpha), pattern
  return None, {}


def _pattern_alpha(module: str, default: float | None, pattern: Mapping[str, Any]
                   ) -> float | None:
  """PEFT's alpha_pattern rule: a pattern matches a module name ending in it ("(.*\\.)?pat$")."""
  for key, alpha in pattern.items():
    if re.fullmatch(rf"(.*\.)?(?:{key})", module):
      return float(alpha)
  return default


def _unsupported(keys: Sequence[str]) -> str | None:
  for key in keys:
    for fragment, what in _UNSUPPORTED.items():
      if fragment in key:
        return f"key {key!r} holds {what}, which is not a low-rank LoRA (only lora_A/lora_B, " \
               "lora_down/lora_up and XLabs down/up factors are supported)"
  return None


def _tensor(reader: CheckpointReader, key: str, *, name: str) -> np.ndarray:
  tensor = reader.get(key)
  if tensor.dtype not in FLOAT_DTYPES:
    raise CheckpointError(f"{name}: key {key!r} has dtype {tensor.dtype}, expected a float dtype")
  return tensor


def _layer_factors(down: np.ndarray, up: np.ndarray, piece_group: Sequence[_Piece], n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(lora_down (K, r'), lora_up (r', N)) of one layer from a module's factors down (r, K) and
  up (N_fused, r): its pieces of up's rows, the rank components it does not use dropped."""
  layer_up = np.zeros((down.shape[0], n), up.dtype)
  for piece in piece_group:
    layer_up[:, piece.offset:piece.offset + piece.stop - piece.start] = up[piece.start:piece.stop].T
  used = np.any(layer_up != 0, axis=1)
  if not used.all():
    return down[used].T, layer_up[used]
  return down.T, layer_up


def _factor_shapes(layer: tuple[int, ...], n_fused: int, down: tuple[int, ...],
                   up: tuple[int, ...]) -> bool:
  """Whether factors of shapes `down` and `up` fit a layer of kernel shape `layer`: a linear
  (K, N) takes (r, K) and (N_fused, r); a conv (kh, kw, I, O) takes (r, I, kh, kw) (or (r, I)
  when 1x1) and (O, r, 1, 1) (or (O, r))."""
  if len(down) < 2 or len(up) < 2 or up[:2] != (n_fused, down[0]):
    return False
  if len(layer) == 2:
    return len(down) == 2 and len(up) == 2 and down[1] == layer[0]
  kh, kw, i, _ = layer
  return (down[1:] in ((i, kh, kw), (i,) if (kh, kw) == (1, 1) else None)
          and up[2:] in ((1, 1), ()))


def _matrix_factors(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(down (r, K), up (N, r)) of a linear's or a conv's factors: a conv's down kernel
  (r, I, kh, kw) becomes (r, kh * kw * I) in HWIO order (`svdq_jax.lora.matrix_shape`)."""
  if down.ndim == 4:
    down = down.transpose(0, 2, 3, 1).reshape(down.shape[0], -1)
  return down, up.reshape(up.shape[0], up.shape[1])


def read_pipeline_lora(path: str | os.PathLike, model_type: str,
                       shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
                       ) -> dict[str, dict[str, LayerLoRA]]:
  """The adapters `{component: {our kernel path: LayerLoRA}}` of one LoRA file (safetensors).

  Args:
    path: the LoRA file.
    model_type: "flux", "pixart" or "sdxl" (which module names are known; see `lora_targets`).
    shapes: `{component: {kernel path: shape}}` of the components LoRAs may target (the denoiser,
      `COMPONENT_PREFIX[model_type]`, and optionally "text_encoder" / "text_encoder_2"): the
      layers of `svdq_jax.lora.kernel_shapes`, linear (K, N) or conv (kh, kw, I, O).

  Returns:
    One adapter per component of `shapes` (empty where the file has none for it), one LayerLoRA
    per targeted layer: factors (K, r) and (r, N) in the file's dtype (a conv's K is kh * kw * I),
    the scale alpha / r (see the module docstring). Two modules landing on one layer are
    concatenated.

  Raises:
    CheckpointError (an InputError), one line naming the file: not a safetensors file; a key of an
    unsupported kind (LoKr, LoHa, DoRA, diff) or of no known format; LoRAs of a component not in
    `shapes`; modules that match no layer of the model (a LoRA for another model; the first
    unmatched keys are named); a module without its down or up factor; factors whose shapes do
    not fit the layer.
  """
  name = str(path)
  if model_type not in MODEL_TYPES:
    raise CheckpointError(f"LoRA: unknown model type {model_type!r}; known: {list(MODEL_TYPES)}")
  denoiser = COMPONENT_PREFIX[model_type]
  targets = {component: lora_targets(model_type, component_shapes, component=component)
             for component, component_shapes in shapes.items()}
  with CheckpointReader(path) as reader:
    keys = list(reader.keys())
    if not keys:
      raise CheckpointError(f"{name}: holds no tensors (not a LoRA file)")
    problem = _unsupported(keys)
    if problem:
      raise CheckpointError(f"{name}: {problem}")
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
      parsed = _classify(key)
      if parsed is None:
        unknown.append(key)
        continue
      module, _, role = parsed
      modules.setdefault(module, {})[role] = key
    if unknown:
      raise CheckpointError(
          f"{name}: not a LoRA file of a known format (diffusers/PEFT lora_A/lora_B, kohya "
          f"lora_down/lora_up/alpha, XLabs processor down/up): keys {unknown[:_SHOWN]} "
          f"({len(unknown)} of {len(keys)})")
    located = {module: _split_component(module, denoiser) for module in modules}
    elsewhere = sorted(next(iter(modules[m].values())) for m, (c, _) in located.items()
                       if c not in targets)
    if elsewhere:
      component = located[_classify(elsewhere[0])[0]][0]
      raise CheckpointError(
          f"{name}: holds LoRAs of the {component}, which this pipeline does not apply LoRAs to "
          f"(only to {sorted(targets)}): first keys {elsewhere[:_SHOWN]}")
    unmatched = sorted(next(iter(modules[m].values())) for m, (c, inner) in located.items()
                       if _normalized(inner) not in targets[c])
    if unmatched:
      raise CheckpointError(
          f"{name}: {len(unmatched)} LoRA modules match no layer of the {model_type} model (a "
          f"LoRA for another model or component?): first keys {unmatched[:_SHOWN]}")
    alphas = {c: _metadata_alphas(reader.metadata, c, denoiser, name=name) for c in targets}
    adapters: dict[str, dict[str, LayerLoRA]] = {c: {} for c in targets}
    for module, roles in modules.items():
      if "down" not in roles or "up" not in roles:
        have = sorted(roles.values())
        raise CheckpointError(f"{name}: module {module!r} needs both its down and up factors, "
                              f"found only {have}")
      component, inner = located[module]
      pieces = targets[component][_normalized(inner)]
      layer_shape = tuple(shapes[component][pieces[0].path])
      down_shape, up_shape = reader.shape(roles["down"]), reader.shape(roles["up"])
      n_fused = max(p.stop for p in pieces)
      if not _factor_shapes(layer_shape, n_fused, tuple(down_shape), tuple(up_shape)):
        need = ((f"(r, {layer_shape[0]})", f"({n_fused}, r)") if len(layer_shape) == 2 else
                (f"(r, {layer_shape[2]}, {layer_shape[0]}, {layer_shape[1]})",
                 f"({n_fused}, r, 1, 1)"))
        raise CheckpointError(
            f"{name}: module {module!r} has factors {roles['down']!r} {down_shape} and "
            f"{roles['up']!r} {up_shape}; the model's layer needs {need[0]} and {need[1]}")
      down, up = _matrix_factors(_tensor(reader, roles["down"], name=name),
                                 _tensor(reader, roles["up"], name=name))
      rank = down.shape[0]
      alpha = _pattern_alpha(inner, *alphas[component])
      if "alpha" in roles:
        value = reader.get(roles["alpha"])
        if value.size != 1 or not np.isfinite(value).all():
          raise CheckpointError(f"{name}: key {roles['alpha']!r} must be one finite number, got "
                                f"shape {value.shape}")
        alpha = float(value.reshape(()))
      scale = 1.0 if alpha is None else alpha / rank
      by_layer: dict[str, list[_Piece]] = {}
      for piece in pieces:
        by_layer.setdefault(piece.path, []).append(piece)
      adapter = adapters[component]
      for layer, group in by_layer.items():
        n = matrix_shape(shapes[component][layer])[1]
        layer_down, layer_up = _layer_factors(down, up, group, n)
        lora = LayerLoRA(layer_down, layer_up, scale)
        adapter[layer] = lora if layer not in adapter else _concatenated(adapter[layer], lora)
  return adapters


def read_lora(path: str | os.PathLike, model_type: str,
              shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LayerLoRA]:
  """The adapter `{our kernel path: LayerLoRA}` of one LoRA file for a model's denoiser (the
  transformer or UNet): `read_pipeline_lora` with that one component, so a file that holds
  text-encoder LoRAs too is an error.

  Args:
    path: the LoRA file.
    model_type: "flux", "pixart" or "sdxl".
    shapes: `{kernel path: shape}` of the denoiser's layers (`svdq_jax.lora.kernel_shapes`;
      `linear_shapes` for the linear layers alone).
  """
  if model_type not in MODEL_TYPES:
    raise CheckpointError(f"LoRA: unknown model type {model_type!r}; known: {list(MODEL_TYPES)}")
  denoiser = COMPONENT_PREFIX[model_type]
  return read_pipeline_lora(path, model_type, {denoiser: shapes})[denoiser]


def _concatenated(a: LayerLoRA, b: LayerLoRA) -> LayerLoRA:
  """Two LoRAs of one layer as one: ranks concatenated, their scales folded into lora_up."""
  down = np.concatenate([np.asarray(a.lora_down, np.float32), np.asarray(b.lora_down, np.float32)],
                        axis=1)
  up = np.concatenate([a.scale * np.asarray(a.lora_up, np.float32),
                       b.scale * np.asarray(b.lora_up, np.float32)], axis=0)
  return LayerLoRA(down, up, 1.0)


def load_loras(model_type: str, loras: Sequence[tuple[str | os.PathLike, float]], params: Any
               ) -> tuple[list[Adapter], jax.Array]:
  """Reads LoRA files for a model: what a pipeline's `loras=[(path, strength), ...]` calls.

  Args:
    model_type: "flux", "pixart" or "sdxl".
    loras: (file, strength) pairs.
    params: the model's parameters (`nnx.state(transformer)`, float or quantized): the layers and
      shapes the files are checked against.

  Returns:
    (adapters, strengths): the arguments of `svdq_jax.lora.apply_loras(params, adapters,
    strengths)`; strengths a float32 array (A,).

  Raises:
    CheckpointError (an InputError) naming the file, as `read_lora`; a strength that is not a
    finite number.
  """
  shapes = kernel_shapes(params)
  adapters, strengths = [], []
  for path, strength in loras:
    strengths.append(lora_strength(path, strength))
    adapters.append(read_lora(path, model_type, shapes))
  return adapters, jnp.asarray(strengths, jnp.float32)


def lora_strength(path: str | os.PathLike, strength: Any) -> float:
  """The strength of a `(path, strength)` LoRA pair as a float.

  Raises:
    CheckpointError (an InputError) naming the file when it is not a finite number.
  """
  try:
    value = float(strength)
  except (TypeError, ValueError):
    value = float("nan")
  if not np.isfinite(value):
    raise CheckpointError(f"{path}: LoRA strength {strength!r} is not a finite number")
  return value


def parse_lora_spec(spec: str) -> tuple[Path, float]:
  """`FILE[:STRENGTH]` (the CLI's `--lora`) -> (file, strength); strength 1 when absent.

  The text after the last ":" is the strength when it parses as a number (so "C:\\x.safetensors"
  and "a:b.safetensors" stay paths).

  Raises:
    CheckpointError: the file does not exist, or the strength is not finite.
  """
  path, strength = spec, 1.0
  head, sep, tail = spec.rpartition(":")
  if sep and head:
    try:
      strength = float(tail)
      path = head
    except ValueError:
      pass
  if not np.isfinite(strength):
    raise CheckpointError(f"--lora {spec!r}: strength {tail!r} is not a finite number")
  if not Path(path).is_file():
    raise CheckpointError(f"--lora {spec!r}: no file {path!r}")
  return Path(path), strength


def write_lora(path: str | os.PathLike, adapter: Mapping[str, LayerLoRA], model_type: str, *,
               dtype: Any = np.float32) -> Path:
  """Writes an adapter as a diffusers/PEFT LoRA file (see the module docstring); atomically.

  Args:
    path: the .safetensors file to write.
    adapter: `{our kernel path: LayerLoRA}`, every layer with the same rank (PEFT's config
      holds one r); each layer's scale is folded into its lora_B.
    model_type: "flux", "pixart" or "sdxl" (the key prefix, `COMPONENT_PREFIX`).
    dtype: the factors' dtype in the file (float32, or e.g. ml_dtypes.bfloat16).

  Raises:
    InputError: an empty adapter, a path that is not a diffusers module's kernel, or layers
      of different ranks.
  """
  if model_type not in COMPONENT_PREFIX:
    raise CheckpointError(f"write_lora: unknown model type {model_type!r}; known: "
                          f"{sorted(COMPONENT_PREFIX)}")
  if not adapter:
    raise CheckpointError(f"{path}: write_lora got an empty adapter")
  ranks = {int(np.shape(lora.lora_down)[1]) for lora in adapter.values()}
  if len(ranks) != 1:
    raise CheckpointError(f"{path}: write_lora needs one rank for every layer, got ranks "
                          f"{sorted(ranks)}")
  prefix = COMPONENT_PREFIX[model_type]
  tensors, modules = {}, []
  for layer, lora in sorted(adapter.items()):
    if not layer.endswith("/kernel") or layer.endswith("proj_out_mlp/kernel"):
      raise CheckpointError(f"{path}: layer {layer!r} is not the kernel of a diffusers module")
    module = layer.removesuffix("/kernel").replace("/", ".")
    modules.append(module)
    tensors[f"{prefix}.{module}.lora_A.weight"] = np.asarray(lora.lora_down, np.float32).T.astype(
        dtype)
    up = np.float32(lora.scale) * np.asarray(lora.lora_up, np.float32)
    tensors[f"{prefix}.{module}.lora_B.weight"] = up.T.astype(dtype)
  rank = ranks.pop()
  config = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": rank,
            f"{prefix}.target_modules": modules, f"{prefix}.init_lora_weights": True,
            f"{prefix}.use_dora": False, f"{prefix}.lora_bias": False}
  save_file(tensors, path, metadata={"format": "pt",
                                     _METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
  return Path(path)

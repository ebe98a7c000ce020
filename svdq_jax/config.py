"""`QuantConfig`: what to quantize and how, with the named presets every table compares.

A `QuantConfig` holds the rules that choose layers (skip and weight-only patterns) and the
settings of the search (smoothing grid, rank, SVD iterations, seed); each quantized layer keeps only
its `QuantFormat` (`QuantConfig.layer_format`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from svdq_jax.config_base import DictConfig
from svdq_jax.errors import InputError
from svdq_jax.formats import (
    ACT_FORMATS,
    NVFP4_GROUP_SIZE,
    WEIGHT_FORMATS,
    ActFormat,
    QuantFormat,
    WeightFormat,
)

RESIDUAL_METHODS = ("rtn", "gptq")

# DeepCompressor's fast grid (num_grids 10): alpha = 0.1 ... 0.9. Each alpha gives two candidates,
# an activation-only one (AWQ-like) and a SmoothQuant one, plus "no smoothing" (DeepCompressor's
# smoothing search).
DEFAULT_SMOOTH_GRID = tuple(round(0.1 * i, 2) for i in range(1, 10))

# fnmatch patterns over "/"-joined state paths (`*` also matches "/"): layers kept in 16 bits.
# Embedders, the final norm/projection of FLUX and PixArt, SDXL time/add embeddings and the
# proj_in/proj_out of SDXL transformer blocks (DeepCompressor's skip list for FLUX and SDXL).
# In the UNet's transformer blocks the cross-attention key and value act on the text features and
# the ResNet blocks' time_emb_proj on the time embedding: 16-bit, as in Nunchaku's SDXL (its
# convolutions are 4-D kernels, never selected).
DEFAULT_SKIP = (
    "*embed*",
    "*embedder*",
    "norm_out/*",
    "proj_out/*",
    "adaln_single/*",
    "caption_projection/*",
    "*attentions/*/proj_in/*",
    "*attentions/*/proj_out/*",
    "*attentions/*/attn2/to_[kv]/*",
    "*resnets/*/time_emb_proj/*",
)

# The AdaLN modulation linears of FLUX: int4 weights, 16-bit activations (W4A16), as Nunchaku.
DEFAULT_WEIGHT_ONLY = (
    "*norm1/linear/*",
    "*norm1_context/linear/*",
    "single_transformer_blocks/*/norm/linear/*",
)


# Nunchaku's fused linears: the q/k/v projections of each attention (and the text stream's in
# FLUX's double blocks) are one linear with one smoothing factor and one low-rank branch there.
NUNCHAKU_FUSED = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
# The linears Nunchaku runs on shifted unsigned INT4 inputs: FLUX's MLP down-projections (after a
# GELU), and nothing else.
NUNCHAKU_SHIFTED = ("*ff/net/2/kernel", "*ff_context/net/2/kernel", "*proj_out_mlp/kernel")


@dataclasses.dataclass(frozen=True)
class QuantConfig(DictConfig):
  """How one linear layer (or, with the patterns, a whole model) is quantized.

  Attributes:
    weight_format: 4-/8-bit weight format, or None to keep weights 16-bit (the "bf16" baseline).
    act_format: activation format (dynamic, per token), or None for weight-only (W4A16).
    group_size: consecutive input channels sharing one scale (64 for INT4/NF4, 16 for NVFP4);
      None means one group over all of K (per output channel weights / per token activations).
    rank: rank r of the 16-bit low-rank branch (0: none).
    smooth: alpha grid of the smoothing search, or None for no smoothing.
    svd_iters: refinement iterations L = SVD_r(W - Q(W - L)) after the first SVD (early stop).
    residual: "rtn" (round to nearest) or "gptq" for the 4-bit residual.
    shift_activations: use unsigned INT4 with the +0.171875 shift on layers whose calibration
      inputs never go below GELU's minimum (the inputs of MLP down-projections).
    skip: fnmatch patterns of kernel paths that stay unquantized.
    weight_only: fnmatch patterns of kernel paths quantized INT4 g64 weight-only (W4A16).
    seed: seed of the randomized SVD (quantization is deterministic for a given seed).
    fused: groups of sibling linears that read the same input, by their names under a common
      parent (e.g. ("to_q", "to_k", "to_v")), each quantized as one layer (kernels concatenated
      along N): one smoothing factor, one low-rank branch (lora_down shared), one NVFP4 tensor
      scale, then split back into one SVDQLinear per linear (`split_outputs`). `NUNCHAKU_FUSED`
      is the layout Nunchaku's files need (`svdq-jax export-nunchaku`). A group applies only
      where all its linears are quantized alike and have the same in_features.
    shifted: fnmatch patterns of the kernel paths whose INT4 inputs are shifted, all others
      unshifted (`NUNCHAKU_SHIFTED` is Nunchaku's rule); None (default) decides per layer from the
      calibration data (`shift_activations`).
  """

  weight_format: WeightFormat | None = "int4"
  act_format: ActFormat | None = "int4"
  group_size: int | None = 64
  rank: int = 32
  smooth: tuple[float, ...] | None = DEFAULT_SMOOTH_GRID
  svd_iters: int = 8
  residual: Literal["rtn", "gptq"] = "rtn"
  shift_activations: bool = True
  skip: tuple[str, ...] = DEFAULT_SKIP
  weight_only: tuple[str, ...] = DEFAULT_WEIGHT_ONLY
  seed: int = 0
  fused: tuple[tuple[str, ...], ...] = ()
  shifted: tuple[str, ...] | None = None

  def __post_init__(self):
    for name in ("smooth", "skip", "weight_only", "shifted"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    if isinstance(self.fused, (list, tuple)):
      object.__setattr__(self, "fused", tuple(
          tuple(group) if isinstance(group, (list, tuple)) else group for group in self.fused))
    if not isinstance(self.fused, tuple) or any(
        not isinstance(group, tuple) or len(group) < 2 or len(set(group)) != len(group)
        or not all(isinstance(name, str) and name and "/" not in name for name in group)
        for group in self.fused):
      raise InputError(f"QuantConfig: fused must be groups of two or more distinct layer names "
                       f"(no '/'), got {self.fused!r}")
    if self.weight_format not in (*WEIGHT_FORMATS, None):
      raise InputError(f"QuantConfig: weight_format {self.weight_format!r} is not one of "
                       f"{WEIGHT_FORMATS} or None")
    if self.act_format not in (*ACT_FORMATS, None):
      raise InputError(f"QuantConfig: act_format {self.act_format!r} is not one of "
                       f"{ACT_FORMATS} or None")
    if self.act_format is not None and self.weight_format != self.act_format:
      raise InputError(f"QuantConfig: act_format {self.act_format!r} needs the same "
                       f"weight_format, got {self.weight_format!r}")
    if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
      raise InputError(f"QuantConfig: group_size must be a positive even number or None, "
                       f"got {self.group_size}")
    if self.weight_format == "nvfp4" and self.group_size != NVFP4_GROUP_SIZE:
      raise InputError(f"QuantConfig: NVFP4 needs group_size {NVFP4_GROUP_SIZE}, got "
                       f"{self.group_size}")
    if self.weight_format == "int8" and self.group_size is not None:
      raise InputError(f"QuantConfig: INT8 is per channel / per token (group_size None), "
                       f"got {self.group_size}")
    if self.rank < 0 or self.svd_iters < 0:
      raise InputError(f"QuantConfig: rank and svd_iters must be >= 0, got {self.rank}, "
                       f"{self.svd_iters}")
    if self.residual not in RESIDUAL_METHODS:
      raise InputError(f"QuantConfig: residual {self.residual!r} is not one of "
                       f"{RESIDUAL_METHODS}")
    if self.smooth is not None and (not self.smooth or any(not 0 < a < 1 for a in self.smooth)):
      raise InputError(f"QuantConfig: smooth must be a non-empty grid of alphas in (0, 1), "
                       f"got {self.smooth}")

  @classmethod
  def preset(cls, name: str = "svdquant-int4", **overrides: Any) -> QuantConfig:
    """The named configurations (the README lists them), optionally with fields replaced.

    "svdquant-int4" (default), "svdquant-nvfp4", "w4a4" (plain RTN), "smoothquant-w4a4",
    "nf4-w4a16", "w8a8", "bf16".

    Raises:
      InputError for an unknown name (the name is often a user's flag), listing the known ones.
    """
    if name not in PRESETS:
      raise InputError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  @property
  def quantizes_activations(self) -> bool:
    """True unless weight-only (W4A16 / W8A16): activations are quantized per token."""
    return self.act_format is not None

  @property
  def needs_calibration_data(self) -> bool:
    """True when quantization needs calibration activations (the smoothing search or GPTQ)."""
    return self.smooth is not None or self.residual == "gptq"

  def effective_group(self, in_features: int) -> int:
    """The group size along K for a layer with `in_features` inputs."""
    return in_features if self.group_size is None else self.group_size

  def layer_format(self, in_features: int, act_shift: float = 0.0) -> QuantFormat:
    """The format of a layer with `in_features` inputs quantized with this config.

    Raises:
      ValueError when this config quantizes nothing (weight_format None, the "bf16" preset).
    """
    if self.weight_format is None:
      raise ValueError("QuantConfig.layer_format: weight_format None keeps layers 16-bit")
    return QuantFormat(weight_format=self.weight_format, act_format=self.act_format,
                       group_size=self.effective_group(in_features), act_shift=act_shift)


PRESETS: dict[str, QuantConfig] = {
    "svdquant-int4": QuantConfig(),
    "svdquant-nvfp4": QuantConfig(weight_format="nvfp4", act_format="nvfp4", group_size=16,
                                  shift_activations=False),
    "w4a4": QuantConfig(rank=0, smooth=None, svd_iters=0, shift_activations=False),
    "smoothquant-w4a4": QuantConfig(rank=0, svd_iters=0, shift_activations=False),
    "nf4-w4a16": QuantConfig(weight_format="nf4", act_format=None, rank=0, smooth=None,
                             svd_iters=0, shift_activations=False, weight_only=()),
    "w8a8": QuantConfig(weight_format="int8", act_format="int8", group_size=None, rank=0,
                        svd_iters=0, shift_activations=False, weight_only=()),
    "bf16": QuantConfig(weight_format=None, act_format=None, group_size=None, rank=0, smooth=None,
                        svd_iters=0, shift_activations=False, weight_only=()),
}

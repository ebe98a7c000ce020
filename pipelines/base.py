"""What the text-to-image pipelines (FLUX.1, PixArt-Sigma, SDXL) share: reading and checking their
folder, loading its components, the denoiser the quantize workflow works on, the per-call LoRA
loader and the cache of compiled denoising loops."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from convert.safetensors_io import CheckpointError
from models.tokenizers import Tokenizer
from pipelines.folder import PipelineFolder
from pipelines.loras import LoRALoader


class TextToImagePipeline:
  """Base of the pipelines: a subclass names its diffusers class (`pipeline_class`), the
  attribute of its denoiser (`denoiser_name`: "transformer" or "unet") and its LoRA model type
  (`lora_model`, `pipelines.loras.LoRALoader`), and calls `_init_shared(vae)` in its `__init__`.
  """

  pipeline_class: ClassVar[str]
  denoiser_name: ClassVar[str]
  lora_model: ClassVar[str]

  def _init_shared(self, vae: nnx.Module) -> None:
    """Sets what every pipeline keeps besides its models: the VAE's downsampling factor, the
    compiled loops (`pipelines.loop.denoise`) and the LoRA loader of `loras=`."""
    self.vae_scale_factor = vae.config.downsample_factor
    self._runners: dict = {}
    self._loras = LoRALoader(self.lora_model)

  @property
  def denoiser(self) -> nnx.Module:
    """The model the quantize workflow calibrates and quantizes (the transformer or the UNet)."""
    return getattr(self, self.denoiser_name)

  @classmethod
  def read_folder(cls, path: str | os.PathLike | PipelineFolder) -> PipelineFolder:
    """The folder's record (`PipelineFolder.read`), checked to name this pipeline class.

    Raises:
      CheckpointError when the folder is not a pipeline folder or names another pipeline.
    """
    folder = PipelineFolder.read(path)
    if folder.pipeline != cls.pipeline_class:
      raise CheckpointError(f"{folder.path}: model_index.json names {folder.pipeline!r}, "
                            f"expected {cls.pipeline_class}")
    return folder


def load_components(folder: PipelineFolder, dtype: jnp.dtype | None,
                    models: Mapping[str, Any], tokenizers: Sequence[str] = ()
                    ) -> dict[str, Any]:
  """{name: component} of a pipeline folder: each of `models` ({subfolder: model class}) loaded
  with its `from_pretrained(folder / subfolder, dtype=dtype)`, and each tokenizer subfolder of
  `tokenizers` with `Tokenizer.from_pretrained`."""
  loaded = {name: model.from_pretrained(folder.path / name, dtype=dtype)
            for name, model in models.items()}
  loaded.update((name, Tokenizer.from_pretrained(folder.path / name)) for name in tokenizers)
  return loaded

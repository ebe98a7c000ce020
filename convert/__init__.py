"""Checkpoint conversion: diffusers / transformers safetensors <-> our orbax checkpoint format.

    convert(src, dst, model=None, dtype=None)     `svdq-jax convert SRC DST [--model NAME]`
    export_model(model, dst) / export_pipeline(pipe_or_folder, dst)
                                                  ours -> diffusers / transformers folders
    save_checkpoint(model, dst, *, model_type, config) / load_checkpoint(path, dtype=None)
    CheckpointReader, save_file                   numpy-only safetensors reading and writing
    CheckpointError                               a bad checkpoint (an svdq_jax.errors.InputError)

The per-model key mappings live in `convert/<model>.py`; `convert.registry` dispatches to them.
Heavy names (orbax, flax) are imported on first use (PEP 562), so `convert.CheckpointReader` stays
light.
"""

import importlib
from typing import Any

from convert.safetensors_io import CheckpointError, CheckpointReader, save_file

_LAZY = {"convert": "convert.api", "save_checkpoint": "convert.checkpoint",
         "load_checkpoint": "convert.checkpoint", "export_model": "convert.export",
         "export_pipeline": "convert.export"}

__all__ = ["CheckpointError", "CheckpointReader", "convert", "export_model", "export_pipeline",
           "load_checkpoint", "save_checkpoint", "save_file"]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'convert' has no attribute {name!r}")

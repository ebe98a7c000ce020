"""Test helper shared by the converter and model tests: damaging a saved checkpoint on purpose."""

from collections.abc import Callable
from pathlib import Path

import numpy as np

from convert.safetensors_io import CheckpointReader, save_file


def rewrite_safetensors(folder: Path, edit: Callable[[dict[str, np.ndarray]], object]) -> None:
  """Applies `edit(tensors)` in place to the one `.safetensors` file in `folder`.

  `tensors` maps keys to numpy arrays (bf16 and float8 through ml_dtypes); the file keeps its
  metadata. Used to build missing-key, unexpected-key, shape and dtype errors.
  """
  files = sorted(Path(folder).glob("*.safetensors"))
  assert len(files) == 1, f"expected one .safetensors file in {folder}, found {files}"
  with CheckpointReader(files[0]) as reader:
    tensors = {key: np.array(reader.get(key)) for key in reader.keys()}
    metadata = dict(reader.metadata)
  edit(tensors)
  save_file(tensors, files[0], metadata=metadata or None)

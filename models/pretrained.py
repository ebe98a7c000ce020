"""What every model's `from_pretrained` calls: the loader that a higher layer registers.

Models sit below `convert` (the safetensors reader, the key mappings, our checkpoint format), so
they cannot import it. `convert.loading` registers its `load_pretrained` here when it is imported
(`register_loader`); a program that imports only `models.flux` still finds it, because the
`svdq_jax.loaders` entry point group of the installed package (pyproject.toml) names it and
`load_pretrained` loads that group when nothing is registered yet.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

LOADER_GROUP = "svdq_jax.loaders"

Loader = Callable[..., Any]
"""`loader(path, model_type, dtype=None) -> nnx.Module` (see `convert.loading.load_pretrained`)."""

_loaders: list[Loader] = []


def register_loader(loader: Loader) -> None:
  """Makes `loader` the one `load_pretrained` calls (the latest registration wins)."""
  if loader in _loaders:
    _loaders.remove(loader)
  _loaders.append(loader)


def registered_loader() -> Loader:
  """The registered loader, after loading the `svdq_jax.loaders` entry points if there is none.

  Raises:
    RuntimeError when no loader is registered and no installed entry point provides one (the
    package is not installed and `convert` was never imported).
  """
  if not _loaders:
    for entry in sorted(metadata.entry_points(group=LOADER_GROUP), key=lambda e: e.name):
      register_loader(entry.load())
  if not _loaders:
    raise RuntimeError(f"from_pretrained: no checkpoint loader is registered; install svdq-jax "
                       f"(its {LOADER_GROUP!r} entry point) or import convert.loading first")
  return _loaders[-1]


def load_pretrained(path: str | os.PathLike, model_type: str, dtype: Any = None) -> Any:
  """Loads the `model_type` model ("flux", "pixart", "vae", "t5", "clip") from a component folder
  (diffusers / transformers, or a svdq-jax checkpoint) with the registered loader."""
  return registered_loader()(path, model_type, dtype=dtype)

"""Orbax checkpoints of a training run (LoRA training, the demo model's training): a dict of
pytrees saved under its step number (the newest two kept) and restored into the structure of a
template, so that an interrupted run resumes where it stopped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def flat_leaves(tree: Any) -> dict[str, Any]:
  """A pytree as {index: leaf}, the form the checkpoints store (restored against a template)."""
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def unflat_leaves(template: Any, flat: Mapping[str, Any]) -> Any:
  """The pytree of `template`'s structure from `flat_leaves`' {index: leaf}."""
  return jax.tree.unflatten(jax.tree.structure(template), [flat[k] for k in sorted(flat)])


def _manager(folder: Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(folder.absolute(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


def save_step(folder: Path, step: int, tree: dict[str, Any]) -> None:
  """Writes `tree` (arrays, or `flat_leaves` dicts of them) as checkpoint `step` of `folder`,
  keeping the newest two, and waits until it is on disk."""
  with _manager(folder) as manager:
    manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()


def restore_newest(folder: Path, template: dict[str, Any]) -> dict[str, Any] | None:
  """The newest checkpoint of `folder`, restored with the shapes and dtypes of `template` (what
  `save_step` was given); None when the folder holds none."""
  if not folder.exists():
    return None
  with _manager(folder) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))

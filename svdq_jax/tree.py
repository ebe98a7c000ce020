"""Named leaves of parameter trees: NNX modules, NNX `State`s and nested dicts.

Paths are the "/"-joined state paths, e.g. "transformer_blocks/0/attn/to_q/kernel", the names that
calibration statistics, skip patterns and converted checkpoints all use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax import nnx


def path_str(path: tuple) -> str:
  """"/"-joined path from a tuple of keys (strings, ints or jax key entries)."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def named_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
  """Yields (path, array) for every leaf of an nnx.Module / nnx.State (Variable values) or a
  nested Mapping of arrays."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  if isinstance(tree, nnx.State):
    for path, variable in nnx.to_flat_state(tree):
      yield path_str(path), variable.get_value()
    return
  yield from _named_mapping_leaves(tree, ())


def _named_mapping_leaves(tree: Any, prefix: tuple) -> Iterator[tuple[str, Any]]:
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      yield from _named_mapping_leaves(value, (*prefix, key))
  else:
    yield path_str(prefix), tree


def map_named_leaves(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """A copy of `tree` (nnx.State or nested Mapping) with every leaf replaced by fn(path, leaf).

  For a State the Variables are replaced (`Variable.replace`), never mutated, so the model the
  State came from is untouched.
  """
  if isinstance(tree, nnx.State):
    flat = [(path, variable.replace(value=fn(path_str(path), variable.get_value())))
            for path, variable in nnx.to_flat_state(tree)]
    return nnx.from_flat_state(flat)
  return _map_mapping(fn, tree, ())


def _map_mapping(fn: Callable[[str, Any], Any], tree: Any, prefix: tuple) -> Any:
  if isinstance(tree, Mapping):
    return {key: _map_mapping(fn, value, (*prefix, key)) for key, value in tree.items()}
  return fn(path_str(prefix), tree)

"""`calibrate`: per-linear activation statistics and samples, recorded while a model runs.

How layers are identified: `svdq_dot` (which every linear calls) reports (kernel, x) to the
recorder held in a context variable while `calibrate` runs. The recorder maps the kernel array's
identity to its state path, computed from the model's state before the run, so the statistics are
keyed by the same paths as `quantize_params` and the skip patterns
("transformer_blocks/0/attn/to_q/kernel"). The function must run eagerly (not under `jax.jit`):
activations must be concrete to be recorded. Outside `calibrate` the context variable is None and
`svdq_dot` does nothing more than a variable lookup at trace time.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax.errors import InputError
from svdq_jax.tree import named_leaves


@dataclasses.dataclass(frozen=True)
class ActivationStats:
  """What one linear layer saw during calibration.

  Attributes:
    minimum: (K,) float32, per-input-channel min x (detects inputs that follow a GELU).
    maximum: (K,) float32, per-input-channel max x (the exact span max |x + shift| = max x + shift
      of inputs that follow a GELU, which are >= -shift).
    samples: (T, K) float32, a uniform random sample of at most `max_samples` token rows
      (smoothing search and GPTQ).
    num_tokens: how many token rows were seen.
  """

  minimum: np.ndarray
  maximum: np.ndarray
  samples: np.ndarray
  num_tokens: int

  @property
  def absmax(self) -> np.ndarray:
    """(K,) float32, per-input-channel max |x| over all tokens (smoothing spans)."""
    return np.maximum(self.maximum, -self.minimum)


class _LayerRecord:
  """Running statistics of one layer; the sample keeps the rows with the largest random keys
  (a uniform sample without replacement of every row seen). Each layer draws its keys from its
  own generator, seeded by (seed, its path), so its sample depends only on the rows it saw and
  their order, not on which other layers ran in between (streamed calibration runs the layers
  block by block, `calibrate` step by step; both get the same samples)."""

  def __init__(self, in_features: int, rng: np.random.Generator):
    self.rng = rng
    self.minimum = np.full((in_features,), np.inf, np.float32)
    self.maximum = np.full((in_features,), -np.inf, np.float32)
    self.samples = np.zeros((0, in_features), np.float32)
    self.keys = np.zeros((0,), np.float64)
    self.num_tokens = 0

  def add(self, rows: np.ndarray, max_samples: int) -> None:
    self.minimum = np.minimum(self.minimum, rows.min(axis=0))
    self.maximum = np.maximum(self.maximum, rows.max(axis=0))
    self.num_tokens += rows.shape[0]
    keys = np.concatenate([self.keys, self.rng.random(rows.shape[0])])
    samples = np.concatenate([self.samples, rows])
    keep = np.sort(np.argsort(-keys)[:max_samples])
    self.keys, self.samples = keys[keep], samples[keep]

  def stats(self) -> ActivationStats:
    return ActivationStats(self.minimum, self.maximum, self.samples, self.num_tokens)


class Recorder:
  """Collects `ActivationStats` per kernel path from `svdq_dot` calls."""

  def __init__(self, paths_by_id: dict[int, str], max_samples: int, seed: int):
    self._paths_by_id = paths_by_id
    self._max_samples = max_samples
    self._seed = seed
    self._records: dict[str, _LayerRecord] = {}
    self.traced_calls = 0
    self.unknown_calls = 0

  def record(self, kernel: Any, x: jax.Array) -> None:
    """Adds the rows of x (..., K) to the statistics of the layer whose kernel this is."""
    if isinstance(x, jax.core.Tracer):
      self.traced_calls += 1
      return
    path = self._paths_by_id.get(id(kernel))
    if path is None:
      self.unknown_calls += 1
      return
    rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:  # e.g. an empty text sequence: nothing to add to the statistics
      return
    if not np.all(np.isfinite(rows)):
      raise InputError(f"calibrate: layer {path!r} received NaN or inf activations; "
                       "calibration needs finite inputs")
    record = self._records.get(path)
    if record is None:
      rng = np.random.default_rng([self._seed, zlib.crc32(path.encode())])
      record = self._records[path] = _LayerRecord(rows.shape[1], rng)
    record.add(rows, self._max_samples)

  def stats(self) -> dict[str, ActivationStats]:
    return {path: self._records[path].stats() for path in sorted(self._records)}


_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "svdq_jax_calibration_recorder", default=None)


def active_recorder() -> Recorder | None:
  """The recorder of the running `calibrate`, or None (the normal case)."""
  return _ACTIVE.get()


@contextlib.contextmanager
def recording(recorder: Recorder):
  """Makes `recorder` receive every `svdq_dot` call inside the block."""
  token = _ACTIVE.set(recorder)
  try:
    yield recorder
  finally:
    _ACTIVE.reset(token)


def calibrate(fn: Callable[[Any], Any], inputs: Iterable[Any], *, model: Any = None,
              max_samples: int = 256, seed: int = 0, progress: bool = True
              ) -> dict[str, ActivationStats]:
  """Runs fn(input) eagerly for each input and records every linear layer's input activations.

  Args:
    fn: a model function of one argument; an nnx.Module is used as its own `model`. For several
      arguments pass e.g. `lambda kw: model(**kw)`.
    inputs: the calibration inputs (an iterable; a list shows a complete progress bar).
    model: where the kernels live: an nnx.Module, an nnx.State or a nested dict of arrays (the
      ones fn uses). Required unless fn is an nnx.Module.
    max_samples: activation rows kept per layer (a uniform sample of all rows seen).
    seed: seed of the row sampling.
    progress: show a tqdm bar over the inputs.

  Returns:
    {kernel path: ActivationStats}, e.g. "transformer_blocks/0/attn/to_q/kernel".
  """
  if model is None:
    if not isinstance(fn, nnx.Module):
      raise ValueError("calibrate: pass model= (an nnx.Module, nnx.State or dict of arrays "
                       "holding the kernels fn uses) unless fn is an nnx.Module")
    model = fn
  if max_samples <= 0:
    raise InputError(f"calibrate: max_samples must be positive, got {max_samples}")
  paths_by_id = {id(leaf): path for path, leaf in named_leaves(model)
                 if getattr(leaf, "ndim", 0) == 2}
  recorder = Recorder(paths_by_id, max_samples, seed)
  with recording(recorder):
    for item in tqdm(inputs, desc="calibrate", disable=not progress, leave=False):
      fn(item)
  stats = recorder.stats()
  if not stats:
    reason = ("fn ran under jax.jit (activations were tracers); calibrate needs an eager run"
              if recorder.traced_calls else
              "no svdq_dot call used a kernel of `model`" if recorder.unknown_calls else
              "no svdq_dot call happened")
    raise ValueError(f"calibrate: nothing was recorded: {reason}")
  return stats

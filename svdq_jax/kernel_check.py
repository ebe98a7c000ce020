"""A once-per-process check of the fused Pallas kernels against the XLA reference.

The Mosaic GPU kernels are tested in the CPU interpreter and lowered for an abstract H100, but the
compiled code that runs on a given GPU (driver, ptxas, a new jax) is only seen there. So the first
time `svdq_dot` would run them for a kernel configuration (`KernelCase`: the block sizes
`select_config` picks, signed or shifted codes, the rank, x's dtype, compiled or interpreted), the
kernels run once on a small random problem of that configuration and are compared with the XLA
path (`svdq_jax.qlinear`):
  - kernel 1 (`quantize_activations`): codes and scales bit-exact with `quantize_activations`;
  - kernel 2 (`w4a4_gemm`) with unit scales: the integer group sums exact;
  - the fused `svdq_linear` against `xla_dot`, within the output dtype's rounding.
On a mismatch (or an error while compiling or running them) it warns once, naming the device and
the configuration, and marks the kernels failed for the process: "auto" uses the XLA path from
then on, for every layer, and an explicit impl="pallas" raises `KernelCheckError` (a named kernel
that cannot serve the case never falls back silently). Compiled and interpreted kernels are checked
and marked separately. SVDQ_JAX_SKIP_KERNEL_CHECK=1 in the environment turns the check off.

The check runs at trace time (where `svdq_dot` dispatches) on concrete arrays of its own, in a
thread of its own (outside the caller's trace), so it works inside `jax.jit` too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.svdq_linear as kernels
from pallas_kernels.svdq_linear import api as kernel_api
from pallas_kernels.svdq_linear.config import GROUP_SIZE, SVDQLinearConfig
from svdq_jax import qlinear
from svdq_jax.formats import QuantFormat
from svdq_jax.qlinear import SVDQLinear

SKIP_ENV = "SVDQ_JAX_SKIP_KERNEL_CHECK"
"""Set to 1 (any value but "", "0") to skip the check and trust the kernels."""


class KernelCheckError(RuntimeError):
  """The fused kernels gave wrong results on this device (an explicit impl="pallas")."""


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """What one check covers: everything the compiled kernels of one `svdq_dot` call depend on.

  Attributes:
    config: the block sizes of both kernels (`select_config` of the call's M, K, N and rank).
    act_shift: 0 for signed codes, else the shift of unsigned codes (a constant in kernel 1).
    rank: the low-rank width.
    x_dtype: the input dtype, which is also the output dtype (bf16, f32, ...).
    interpret: the Mosaic GPU interpreter instead of the compiled kernels.
  """

  config: SVDQLinearConfig
  act_shift: float
  rank: int
  x_dtype: str
  interpret: bool

  def describe(self) -> str:
    kind = "interpreted" if self.interpret else "compiled"
    codes = f"unsigned codes (act_shift {self.act_shift})" if self.act_shift else "signed codes"
    return (f"{kind} kernels, {self.config}, {codes}, rank {self.rank}, x {self.x_dtype}")


_LOCK = threading.Lock()
_CHECKED: set[KernelCase] = set()
_FAILURES: dict[bool, str] = {}  # interpret -> the first failure's message


def kernel_case(x: jax.Array, w: SVDQLinear, *, interpret: bool) -> KernelCase:
  """The `KernelCase` of `svdq_dot(x, w)` on the Pallas path."""
  m = math.prod(x.shape[:-1])
  config = kernels.select_config(m, w.in_features, w.out_features, w.rank)
  return KernelCase(config, float(w.act_shift), w.rank, jnp.dtype(x.dtype).name, interpret)


def skipped() -> bool:
  """True when SVDQ_JAX_SKIP_KERNEL_CHECK turns the check off."""
  return os.environ.get(SKIP_ENV, "") not in ("", "0")


def kernels_failed(x: jax.Array, w: SVDQLinear, *, interpret: bool = False) -> bool:
  """Whether the kernels are known wrong here: checks `kernel_case(x, w)` the first time it is
  seen (warning once on a mismatch) and returns True once any check of this mode has failed."""
  if skipped():
    return False
  case = kernel_case(x, w, interpret=interpret)
  with _LOCK:
    if interpret in _FAILURES:
      return True
    if case in _CHECKED:
      return False
    _CHECKED.add(case)
    failure = _run_check(case)
    if failure is None:
      return False
    message = (f"svdq_dot: the Pallas kernels failed their self-check on {_device_name(interpret)}"
               f" ({case.describe()}): {failure}; impl='auto' uses the XLA path from now on "
               f"(set {SKIP_ENV}=1 to skip the check)")
    _FAILURES[interpret] = message
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return True


def require_kernels(x: jax.Array, w: SVDQLinear, *, interpret: bool = False) -> None:
  """For an explicit Pallas `impl`: raises KernelCheckError when the kernels failed a check."""
  if kernels_failed(x, w, interpret=interpret):
    raise KernelCheckError(_FAILURES[interpret].replace(
        "impl='auto' uses the XLA path from now on", "use impl='xla' or 'auto'"))


def reset() -> None:
  """Forgets every check and failure (for tests)."""
  with _LOCK:
    _CHECKED.clear()
    _FAILURES.clear()


def _device_name(interpret: bool) -> str:
  device = jax.devices()[0]
  name = f"{device.device_kind} ({device.platform}:{device.id})"
  return f"the Mosaic GPU interpreter on {name}" if interpret else name


def _run_check(case: KernelCase) -> str | None:
  """Runs the three comparisons; the first mismatch (or error) as one line, or None.

  They run in a thread of their own: JAX's trace state is per thread, so the kernels execute
  there even when the caller is tracing a jitted function."""
  result: list[str | None] = []

  def run() -> None:
    try:
      result.append(_compare(case))
    except Exception as error:  # noqa: BLE001 (a kernel that does not compile or run has failed)
      first_line = str(error).splitlines()[0] if str(error) else ""
      result.append(f"{type(error).__name__}: {first_line}")

  thread = threading.Thread(target=run, name="svdq_jax-kernel-check")
  thread.start()
  thread.join()
  return result[0]


def _problem(case: KernelCase) -> tuple[jax.Array, SVDQLinear]:
  """A small random layer and input of `case`: one ragged row block, two output tiles, two K
  steps per split of kernel 1 and per step of kernel 2, one all-zero group."""
  cfg = case.config
  rng = np.random.default_rng(0)
  m = math.lcm(cfg.quantize.block_m, cfg.gemm.block_m) - 3
  k = 2 * GROUP_SIZE * math.lcm(cfg.quantize.k_splits, cfg.gemm.groups_per_step)
  n = 2 * cfg.gemm.block_n
  x = rng.standard_normal((m, k)).astype(np.float32)
  if case.act_shift:
    x = np.maximum(x, -case.act_shift)
  x[1, :GROUP_SIZE] = -case.act_shift  # a group whose scale is 0
  fmt = QuantFormat("int4", "int4", GROUP_SIZE, case.act_shift)
  w = SVDQLinear(
      qweight=jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
      wscales=jnp.asarray(rng.uniform(0.005, 0.02, (k // GROUP_SIZE, n)), jnp.bfloat16),
      wtscale=jnp.ones((), jnp.float32),
      smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
      lora_down=jnp.asarray(rng.standard_normal((k, case.rank)) * 0.1, jnp.bfloat16),
      lora_up=jnp.asarray(rng.standard_normal((case.rank, n)) * 0.1, jnp.bfloat16),
      bias=jnp.asarray(rng.standard_normal(n), jnp.float32),
      format=fmt, in_features=k, out_features=n)
  return jnp.asarray(x, case.x_dtype), w


def _compare(case: KernelCase) -> str | None:
  x, w = _problem(case)
  cfg, unsigned = case.config, case.act_shift != 0.0
  m, k = x.shape
  n = w.out_features
  x_kernel = x.astype(kernel_api.kernel_input_dtype(x.dtype))

  # Kernel 1: codes and scales bit-exact with the XLA path's quantization of the same x.
  packed, ascales, _ = kernels.quantize_activations(
      x_kernel, w.smooth, w.lora_down, act_shift=case.act_shift, interpret=case.interpret,
      config=cfg.quantize)
  codes = np.asarray(kernels.unpack_int4(packed, unsigned=unsigned))
  want_codes, want_scales = (np.asarray(a) for a in qlinear.quantize_activations(x, w))
  if not np.array_equal(codes, want_codes):
    return (f"kernel 1 gave {int(np.sum(codes != want_codes))} of {codes.size} activation codes "
            "unlike the XLA path")
  if not np.array_equal(np.asarray(ascales), want_scales):
    return "kernel 1 gave activation scales unlike the XLA path"

  # Kernel 2: with unit scales and no bias the output is the integer group sums, exact in f32.
  groups = k // GROUP_SIZE
  sums = kernels.w4a4_gemm(
      packed, jnp.ones((m, groups), jnp.float32), w.qweight, jnp.ones((groups, n), jnp.bfloat16),
      jnp.zeros((m, case.rank), jnp.float32), w.lora_up, None, act_shift=case.act_shift,
      out_dtype=jnp.float32, interpret=case.interpret, config=cfg.gemm)
  want_sums = codes.astype(np.int64) @ np.asarray(w.weight_codes(), np.int64).T
  if not np.array_equal(np.asarray(sums, np.float64), want_sums.astype(np.float64)):
    bad = int(np.sum(np.asarray(sums, np.float64) != want_sums))
    return f"kernel 2 gave {bad} of {want_sums.size} integer group sums wrong"

  # The fused op against xla_dot, within the output's rounding plus float32 summation order.
  got = np.asarray(kernels.svdq_linear(
      x_kernel, w.qweight, w.wscales, w.smooth, w.lora_down, w.lora_up, w.bias,
      act_shift=case.act_shift, out_dtype=x.dtype, interpret=case.interpret, config=cfg),
      np.float64)
  want = np.asarray(qlinear.xla_dot(x.astype(jnp.float32), w), np.float64)
  magnitude = (np.abs(codes * np.repeat(want_scales, GROUP_SIZE, axis=1))
               @ np.abs(np.asarray(w.dequantize_residual(), np.float64))
               + np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(
                   w.lora_down.astype(jnp.float32), np.float64)) @ np.abs(np.asarray(
                       w.lora_up.astype(jnp.float32), np.float64))
               + np.abs(np.asarray(w.bias, np.float64)))
  output_rounding = 2.0 ** -(jnp.finfo(x.dtype).nmant + 1)
  bound = output_rounding * np.abs(want) + 2.0 ** -14 * magnitude
  err = np.abs(got - want)
  if not np.all(err <= bound):
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    return (f"the fused kernels' output differs from the XLA path by {err[worst]:.3g} at "
            f"{tuple(int(i) for i in worst)} (allowed {bound[worst]:.3g})")
  return None


__all__ = ["SKIP_ENV", "KernelCase", "KernelCheckError", "kernel_case", "kernels_failed",
           "require_kernels", "reset", "skipped"]

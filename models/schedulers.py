"""Diffusion schedulers as pure functions, usable inside `lax.fori_loop` / `lax.scan`.

Each scheduler is a frozen dataclass holding the diffusers scheduler config it mirrors. The
schedule (timesteps and sigmas for a number of steps) is computed once on the host with numpy,
exactly as diffusers' `set_timesteps` does, and handed to the jitted loop as a `Schedule` pytree.
The per-step update `step(schedule, state, i, model_output, sample)` takes the step index `i` as
a (possibly traced) integer, so the whole denoising loop compiles to one program.

Implemented, matching diffusers 0.42:
  FlowMatchEulerScheduler   FlowMatchEulerDiscreteScheduler (FLUX, SD3), static `shift` or the
                            resolution-dependent shift `mu = calculate_shift(image_seq_len)`.
  DPMSolverMultistepScheduler  DPM-Solver++ of order 1 or 2 ("2M"), midpoint or heun, for epsilon,
                            v_prediction and sample models (PixArt-Sigma, SDXL).
  EulerDiscreteScheduler    deterministic Euler (s_churn = 0) for epsilon and v models (SDXL).
  EulerAncestralDiscreteScheduler  Euler ancestral (SDXL-Turbo, "trailing" spacing); its step
                            takes the fresh noise as an argument (`stochastic` schedulers).
Options a scheduler config asks for that are not implemented raise a ValueError naming them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Schedule:
  """The per-run schedule. timesteps: (N,) float32, the value fed to the model at step i;
  sigmas: (N+1,) float32, noise level before step i (the last one is the final level)."""

  timesteps: jax.Array
  sigmas: jax.Array

  @property
  def num_steps(self) -> int:
    """The number of denoising steps N (static: from the shape)."""
    return int(self.timesteps.shape[0])


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """FLUX's resolution-dependent shift `mu`, linear in the number of image tokens."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * slope + base_shift - slope * base_seq_len


def _config_fields(cls: type, cfg: dict, unsupported: tuple[str, ...]) -> dict[str, Any]:
  """The dataclass fields of `cls` found in a diffusers scheduler config.

  Raises ValueError when the config turns on an option in `unsupported` (any truthy value).
  """
  bad = {k: cfg[k] for k in unsupported if cfg.get(k)}
  if bad:
    raise ValueError(f"{cls.__name__}: scheduler options not supported: {bad}")
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}


def _check_choices(scheduler: Any, **allowed: tuple) -> None:
  """Raises ValueError naming the scheduler and field when a field is not one of its choices."""
  for name, choices in allowed.items():
    value = getattr(scheduler, name)
    if value not in choices:
      raise ValueError(f"{type(scheduler).__name__}: {name} {value!r} is not supported "
                       f"(one of {', '.join(map(repr, choices))})")


def _check_num_steps(num_inference_steps: int) -> None:
  if num_inference_steps < 1:
    raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")


def _spaced_timesteps(spacing: str, num_steps: int, num_train: int, last_timestep: int,
                      steps_offset: int, *, dpm: bool) -> np.ndarray:
  """Discrete training timesteps for inference, highest first (diffusers' `timestep_spacing`).

  The DPM-Solver and Euler schedulers space "linspace" and "leading" slightly differently; `dpm`
  selects the DPM-Solver variant. last_timestep: one past the highest timestep to use
  (`num_train` unless DPM-Solver's `lambda_min_clipped` cuts the top off).
  """
  if spacing == "linspace":
    if dpm:
      return np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    ratio = last_timestep // (num_steps + 1) if dpm else num_train // num_steps
    count = num_steps + 1 if dpm else num_steps
    t = (np.arange(0, count) * ratio).round()[::-1]
    t = (t[:-1] if dpm else t).astype(np.int64 if dpm else np.float32)
    return t + steps_offset
  if spacing == "trailing":
    ratio = num_train / num_steps
    t = np.arange(last_timestep, 0, -ratio).round()
    return t.astype(np.int64 if dpm else np.float32) - 1
  raise ValueError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """Noise level sigma = sqrt((1 - a) / a) of every training step (num_train,), float32."""
  return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def _append_final_sigma(sigmas: np.ndarray, train_sigmas: np.ndarray,
                        final_sigmas_type: str) -> np.ndarray:
  """`sigmas` with the level after the last step appended, float32: 0 ("zero") or the smallest
  training sigma ("sigma_min")."""
  last = float(train_sigmas[0]) if final_sigmas_type == "sigma_min" else 0.0
  return np.append(sigmas, last).astype(np.float32)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep of each sigma, by linear interpolation in log sigma."""
  log_sigma = np.log(np.maximum(sigmas, 1e-10))
  dists = log_sigma[None, :] - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high = low + 1
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
  return (1 - w) * low + w * high


def _karras(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) noise levels: uniform in sigma^(1/rho), highest first."""
  ramp = np.linspace(0, 1, num_steps)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


@dataclass(frozen=True)
class FlowMatchEulerScheduler:
  """Flow-matching Euler (rectified flow): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v.

  With `use_dynamic_shifting` (FLUX.1-dev) the sigmas are shifted by `mu` from the image token
  count, sigma' = e^mu / (e^mu + (1/sigma - 1)); otherwise by the static `shift`.
  """

  class_name: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"
  stochastic: ClassVar[bool] = False  # step takes no noise
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  time_shift_type: str = "exponential"

  @classmethod
  def from_dict(cls, cfg: dict) -> FlowMatchEulerScheduler:
    """From a diffusers `scheduler_config.json` dict."""
    fields = _config_fields(cls, cfg, (
        "invert_sigmas", "shift_terminal", "use_karras_sigmas",
        "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"))
    out = cls(**fields)
    _check_choices(out, time_shift_type=("exponential", "linear"))
    return out

  def schedule(self, num_inference_steps: int, *, image_seq_len: int | None = None) -> Schedule:
    """Timesteps and sigmas as FluxPipeline sets them: sigmas linspace(1, 1/N, N), then shifted.

    image_seq_len: the number of image tokens ((H/16) * (W/16) for FLUX); needed when
    `use_dynamic_shifting` is set.
    """
    _check_num_steps(num_inference_steps)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
    if self.use_dynamic_shifting:
      if image_seq_len is None:
        raise ValueError("FlowMatchEulerScheduler with use_dynamic_shifting needs image_seq_len")
      mu = calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                           self.base_shift, self.max_shift)
      scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
      sigmas = scale / (scale + (1 / sigmas - 1))
    else:
      sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
    sigmas = sigmas.astype(np.float32)
    timesteps = sigmas * np.float32(self.num_train_timesteps)
    return Schedule(jnp.asarray(timesteps), jnp.asarray(np.append(sigmas, np.float32(0))))

  def init_noise_sigma(self, schedule: Schedule) -> float:
    """Standard deviation of the initial noise: 1 (unit noise at the top of the schedule)."""
    return 1.0

  def init_state(self, sample: jax.Array) -> tuple:
    """No state between steps: an empty tuple."""
    return ()

  def scale_model_input(self, schedule: Schedule, i: jax.Array, sample: jax.Array) -> jax.Array:
    """The model sees the sample unscaled."""
    return sample

  def step(self, schedule: Schedule, state: tuple, i: jax.Array, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, tuple]:
    """One Euler step from noise level sigmas[i] to sigmas[i+1]; returns model_output's dtype."""
    dt = schedule.sigmas[i + 1] - schedule.sigmas[i]
    prev = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
    return prev.astype(model_output.dtype), state


@dataclass(frozen=True)
class _TrainingBetas:
  """The training noise schedule of the variance-preserving (DDPM-family) schedulers, with the
  diffusers config names; DPM-Solver and Euler extend it."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple | None = None

  def _alphas_cumprod(self) -> np.ndarray:
    """Cumulative product of (1 - beta) over training steps (num_train,), float32 as diffusers
    computes it."""
    steps, schedule = self.num_train_timesteps, self.beta_schedule
    if self.trained_betas is not None:
      betas = np.asarray(self.trained_betas, np.float32)
    elif schedule == "linear":
      betas = np.linspace(self.beta_start, self.beta_end, steps, dtype=np.float32)
    elif schedule == "scaled_linear":
      betas = np.square(np.linspace(self.beta_start**0.5, self.beta_end**0.5, steps,
                                    dtype=np.float32))
    elif schedule == "squaredcos_cap_v2":
      alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                        for i in range(steps)], np.float32)
    else:
      raise ValueError(f"{type(self).__name__}: beta_schedule {schedule!r} is not one of linear, "
                       "scaled_linear, squaredcos_cap_v2")
    return np.cumprod(1.0 - betas, dtype=np.float32)


def _x0_prediction(prediction_type: str, model_output: jax.Array, sample: jax.Array,
                   alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """The data prediction x0 from a model output, for variance-preserving noise levels."""
  if prediction_type == "epsilon":
    return (sample - sigma * model_output) / alpha
  if prediction_type == "v_prediction":
    return alpha * sample - sigma * model_output
  if prediction_type == "sample":
    return model_output
  raise ValueError(f"prediction_type {prediction_type!r} is not epsilon, v_prediction or sample")


@dataclass(frozen=True)
class DPMSolverMultistepScheduler(_TrainingBetas):
  """DPM-Solver++ (Lu et al. 2022) of order 1 or 2 over the data prediction, deterministic.

  The state carries the previous step's x0 prediction (for the second-order multistep update).
  """

  class_name: ClassVar[str] = "DPMSolverMultistepScheduler"
  stochastic: ClassVar[bool] = False  # step takes no noise
  solver_order: int = 2
  prediction_type: str = "epsilon"
  algorithm_type: str = "dpmsolver++"
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  euler_at_final: bool = False
  use_karras_sigmas: bool = False
  final_sigmas_type: str = "zero"
  lambda_min_clipped: float = -float("inf")
  timestep_spacing: str = "linspace"
  steps_offset: int = 0

  @classmethod
  def from_dict(cls, cfg: dict) -> DPMSolverMultistepScheduler:
    """From a diffusers `scheduler_config.json` dict."""
    fields = _config_fields(cls, cfg, (
        "thresholding", "use_exponential_sigmas", "use_beta_sigmas",
        "use_lu_lambdas", "use_flow_sigmas", "variance_type",
        "rescale_betas_zero_snr", "use_dynamic_shifting"))
    out = cls(**fields)
    _check_choices(out, algorithm_type=("dpmsolver++",), solver_order=(1, 2),
                   solver_type=("midpoint", "heun"), final_sigmas_type=FINAL_SIGMAS_TYPES,
                   prediction_type=("epsilon", "v_prediction", "sample"))
    return out

  def schedule(self, num_inference_steps: int, *, image_seq_len: int | None = None) -> Schedule:
    """Integer training timesteps (as float32) and the matching sigma = sqrt((1 - a) / a)."""
    _check_num_steps(num_inference_steps)
    alphas_cumprod = self._alphas_cumprod()
    lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))
    clipped = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
    timesteps = _spaced_timesteps(self.timestep_spacing, num_inference_steps,
                                  self.num_train_timesteps, self.num_train_timesteps - clipped,
                                  self.steps_offset, dpm=True)
    train_sigmas = _train_sigmas(alphas_cumprod)
    if self.use_karras_sigmas:
      sigmas = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), num_inference_steps)
      timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
      if self.beta_schedule != "squaredcos_cap_v2":
        timesteps = timesteps.round()
    else:
      sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = _append_final_sigma(sigmas, train_sigmas, self.final_sigmas_type)
    return Schedule(jnp.asarray(timesteps.astype(np.int64).astype(np.float32)),
                    jnp.asarray(sigmas))

  def init_noise_sigma(self, schedule: Schedule) -> float:
    """Standard deviation of the initial noise: 1 (unit noise at the top of the schedule)."""
    return 1.0

  def init_state(self, sample: jax.Array) -> jax.Array:
    """The previous x0 prediction (zeros before the first step), float32 like the sample."""
    return jnp.zeros(sample.shape, jnp.float32)

  def scale_model_input(self, schedule: Schedule, i: jax.Array, sample: jax.Array) -> jax.Array:
    """The model sees the sample unscaled."""
    return sample

  def step(self, schedule: Schedule, state: jax.Array, i: jax.Array, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One multistep update from sigmas[i] to sigmas[i+1]; returns (prev_sample, new state).

    First order at i = 0, and at the last step when `lower_order_final` (with fewer than 15
    steps), `euler_at_final` or a zero final sigma asks for it, as in diffusers.
    """
    n = schedule.num_steps
    def alpha_sigma(s):
      alpha = jax.lax.rsqrt(s * s + 1)
      return alpha, s * alpha

    alpha_s0, sigma_s0 = alpha_sigma(schedule.sigmas[i])
    alpha_t, sigma_t = alpha_sigma(schedule.sigmas[i + 1])
    alpha_s1, sigma_s1 = alpha_sigma(schedule.sigmas[jnp.maximum(i - 1, 0)])
    x0 = _x0_prediction(self.prediction_type, model_output.astype(jnp.float32),
                        sample.astype(jnp.float32), alpha_s0, sigma_s0)
    sample32 = sample.astype(jnp.float32)
    lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
    lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
    h = lambda_t - lambda_s0
    decay = alpha_t * (jnp.exp(-h) - 1.0)
    first = (sigma_t / sigma_s0) * sample32 - decay * x0
    final_low = self.euler_at_final or self.final_sigmas_type == "zero" or (
        self.lower_order_final and n < 15)
    use_first = (i == 0) | (self.solver_order == 1)
    if final_low:
      use_first = use_first | (i == n - 1)
    if self.solver_order == 1:
      prev = first
    else:
      r0 = (lambda_s0 - lambda_s1) / h
      d1 = (1.0 / r0) * (x0 - state)
      if self.solver_type == "midpoint":
        second = first - 0.5 * decay * d1
      else:
        second = first + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
      prev = jnp.where(use_first, first, second)
    return prev.astype(model_output.dtype), x0


class _KarrasSampler:
  """What the k-diffusion Euler samplers share: the initial noise level, no state between steps,
  and the input scaling sample / sqrt(sigma^2 + 1). Needs `timestep_spacing`."""

  timestep_spacing: str

  def init_noise_sigma(self, schedule: Schedule) -> float:
    """Standard deviation of the initial noise, from the largest sigma."""
    top = float(np.max(np.asarray(schedule.sigmas)))
    return top if self.timestep_spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)

  def init_state(self, sample: jax.Array) -> tuple:
    """No state between steps: an empty tuple."""
    return ()

  def scale_model_input(self, schedule: Schedule, i: jax.Array, sample: jax.Array) -> jax.Array:
    """sample / sqrt(sigma_i^2 + 1), the input scaling of the k-diffusion Euler sampler."""
    sigma = schedule.sigmas[i]
    return (sample / jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)


@dataclass(frozen=True)
class EulerDiscreteScheduler(_KarrasSampler, _TrainingBetas):
  """Deterministic Euler over Karras-style sigmas (k-diffusion), for epsilon and v models.

  The model input is scaled by 1 / sqrt(sigma^2 + 1) (`scale_model_input`); the initial noise by
  `init_noise_sigma`.
  """

  class_name: ClassVar[str] = "EulerDiscreteScheduler"
  stochastic: ClassVar[bool] = False  # step takes no noise
  prediction_type: str = "epsilon"
  interpolation_type: str = "linear"
  use_karras_sigmas: bool = False
  sigma_min: float | None = None
  sigma_max: float | None = None
  timestep_spacing: str = "linspace"
  timestep_type: str = "discrete"
  steps_offset: int = 0
  final_sigmas_type: str = "zero"

  @classmethod
  def from_dict(cls, cfg: dict) -> EulerDiscreteScheduler:
    """From a diffusers `scheduler_config.json` dict."""
    fields = _config_fields(cls, cfg, (
        "use_exponential_sigmas", "use_beta_sigmas",
        "rescale_betas_zero_snr"))
    out = cls(**fields)
    _check_choices(out, prediction_type=("epsilon", "v_prediction", "sample", "original_sample"),
                   interpolation_type=("linear", "log_linear"),
                   final_sigmas_type=FINAL_SIGMAS_TYPES, timestep_type=("discrete", "continuous"))
    return out

  def schedule(self, num_inference_steps: int, *, image_seq_len: int | None = None) -> Schedule:
    """Timesteps spaced as `timestep_spacing` says, sigmas interpolated from the training ones."""
    _check_num_steps(num_inference_steps)
    train_sigmas = _train_sigmas(self._alphas_cumprod())
    timesteps = _spaced_timesteps(self.timestep_spacing, num_inference_steps,
                                  self.num_train_timesteps, self.num_train_timesteps,
                                  self.steps_offset, dpm=False)
    if self.interpolation_type == "linear":
      sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    else:
      sigmas = np.exp(np.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]),
                                  num_inference_steps + 1, dtype=np.float32))
    if self.use_karras_sigmas:
      lo = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
      hi = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
      sigmas = _karras(lo, hi, num_inference_steps)
      timesteps = _sigma_to_t(sigmas, np.log(train_sigmas))
    sigmas = _append_final_sigma(sigmas, train_sigmas, self.final_sigmas_type)
    if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
      timesteps = 0.25 * np.log(sigmas[:-1])
    return Schedule(jnp.asarray(timesteps.astype(np.float32)), jnp.asarray(sigmas))

  def step(self, schedule: Schedule, state: tuple, i: jax.Array, model_output: jax.Array,
           sample: jax.Array) -> tuple[jax.Array, tuple]:
    """x_{i+1} = x_i + (x_i - x0) / sigma_i * (sigma_{i+1} - sigma_i); returns model dtype."""
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    sample32 = sample.astype(jnp.float32)
    out32 = model_output.astype(jnp.float32)
    if self.prediction_type in ("sample", "original_sample"):
      x0 = out32
    elif self.prediction_type == "epsilon":
      x0 = sample32 - sigma * out32
    else:
      x0 = out32 * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample32 / (sigma * sigma + 1)
    prev = sample32 + (sample32 - x0) / sigma * (sigma_next - sigma)
    return prev.astype(model_output.dtype), state


@dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(_KarrasSampler, _TrainingBetas):
  """Euler ancestral (k-diffusion's `sample_euler_ancestral`), SDXL-Turbo's sampler.

  Each step moves deterministically down to sigma_down and adds fresh noise of level sigma_up,
  with sigma_up^2 = sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2 and
  sigma_down^2 = sigma_{i+1}^2 - sigma_up^2. The noise is an argument of `step` (`stochastic`
  is True): the caller draws it from its own key, so that a jitted loop stays pure. Timesteps
  and sigmas as `EulerDiscreteScheduler` with linear interpolation (SDXL-Turbo: "trailing").
  """

  class_name: ClassVar[str] = "EulerAncestralDiscreteScheduler"
  stochastic: ClassVar[bool] = True
  prediction_type: str = "epsilon"
  timestep_spacing: str = "linspace"
  steps_offset: int = 0

  @classmethod
  def from_dict(cls, cfg: dict) -> EulerAncestralDiscreteScheduler:
    """From a diffusers `scheduler_config.json` dict."""
    fields = _config_fields(cls, cfg, ("rescale_betas_zero_snr",))
    out = cls(**fields)
    _check_choices(out, prediction_type=("epsilon", "v_prediction"),
                   timestep_spacing=("linspace", "leading", "trailing"))
    return out

  def schedule(self, num_inference_steps: int, *, image_seq_len: int | None = None) -> Schedule:
    """Timesteps spaced as `timestep_spacing` says, sigmas interpolated from the training ones,
    then a final 0."""
    _check_num_steps(num_inference_steps)
    train_sigmas = _train_sigmas(self._alphas_cumprod())
    timesteps = _spaced_timesteps(self.timestep_spacing, num_inference_steps,
                                  self.num_train_timesteps, self.num_train_timesteps,
                                  self.steps_offset, dpm=False)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = _append_final_sigma(sigmas, train_sigmas, "zero")
    return Schedule(jnp.asarray(timesteps.astype(np.float32)), jnp.asarray(sigmas))

  def step(self, schedule: Schedule, state: tuple, i: jax.Array, model_output: jax.Array,
           sample: jax.Array, *, noise: jax.Array | None = None) -> tuple[jax.Array, tuple]:
    """One ancestral step from sigmas[i] to sigmas[i+1].

    noise: standard normal, the shape of `sample` (required). Returns model_output's dtype.
    """
    if noise is None:
      raise ValueError("EulerAncestralDiscreteScheduler.step needs noise (a standard normal "
                       "array shaped like the sample)")
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    sample32 = sample.astype(jnp.float32)
    out32 = model_output.astype(jnp.float32)
    if self.prediction_type == "epsilon":
      x0 = sample32 - sigma * out32
    else:
      x0 = out32 * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample32 / (sigma * sigma + 1)
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    # sigma_down^2 = sigma_next^4 / sigma^2 is a difference of two nearly equal squares when
    # sigma_next << sigma (linspace's 999 -> 0 step): float32 rounding can make it negative
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    prev = sample32 + (sample32 - x0) / sigma * (sigma_down - sigma)
    prev = prev + noise.astype(jnp.float32) * sigma_up
    return prev.astype(model_output.dtype), state


Scheduler = (FlowMatchEulerScheduler | DPMSolverMultistepScheduler | EulerDiscreteScheduler
             | EulerAncestralDiscreteScheduler)
_BY_CLASS_NAME = {cls.class_name: cls for cls in (
    FlowMatchEulerScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler)}


def scheduler_from_config(cfg: dict) -> Scheduler:
  """The scheduler a diffusers `scheduler_config.json` names in `_class_name`."""
  name = cfg.get("_class_name")
  if name not in _BY_CLASS_NAME:
    raise ValueError(f"scheduler {name!r} is not supported (supported: {sorted(_BY_CLASS_NAME)})")
  return _BY_CLASS_NAME[name].from_dict(cfg)


def scheduler_to_config(scheduler: Scheduler) -> dict:
  """The diffusers `scheduler_config.json` of a scheduler (inverse of `scheduler_from_config`)."""
  fields = {f.name: getattr(scheduler, f.name) for f in dataclasses.fields(scheduler)}
  return {"_class_name": scheduler.class_name,
          **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

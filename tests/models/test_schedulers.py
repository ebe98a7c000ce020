"""Scheduler parity with diffusers: timesteps, sigmas and every step update of a whole run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import schedulers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity


def _run_ours(sched, schedule, model_outputs: np.ndarray, sample: np.ndarray) -> np.ndarray:
  """Our whole loop in one jitted `lax.scan`, fed precomputed model outputs (N, ...)."""

  @jax.jit
  def loop(schedule, outputs, x):
    def body(carry, inputs):
      x, state = carry
      i, out = inputs
      x_in = sched.scale_model_input(schedule, i, x)
      x, state = sched.step(schedule, state, i, out + 0.1 * x_in, x)
      return (x, state), x

    steps = jnp.arange(outputs.shape[0])
    (x, _), _ = jax.lax.scan(body, (x, sched.init_state(x)), (steps, outputs))
    return x

  return np.asarray(loop(schedule, jnp.asarray(model_outputs), jnp.asarray(sample)))


def _run_diffusers(ref, model_outputs: np.ndarray, sample: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(sample)
  for t, out in zip(ref.timesteps, model_outputs, strict=True):
    x_in = ref.scale_model_input(x, t) if hasattr(ref, "scale_model_input") else x
    x = ref.step(torch.from_numpy(out) + 0.1 * x_in, t, x).prev_sample
  return x.numpy()


def _check(sched, ref, schedule, num_steps: int) -> None:
  # Tolerances: both sides are float32; the training noise levels are a cumulative product over
  # 1000 betas, whose rounding differs between torch and numpy by a few float32 ulps.
  np.testing.assert_allclose(np.asarray(schedule.timesteps), ref.timesteps.float().numpy(),
                             rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(schedule.sigmas), ref.sigmas.float().numpy(),
                             rtol=5e-5, atol=1e-7)
  rng = np.random.default_rng(num_steps)
  sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
  outputs = rng.standard_normal((num_steps, 2, 4, 8, 8), dtype=np.float32)
  expected = _run_diffusers(ref, outputs, sample)
  got = _run_ours(sched, schedule, outputs, sample)
  err = np.abs(got - expected).max() / np.abs(expected).max()
  assert err <= 1e-5, f"relative error {err}"


FLOW_CONFIGS = [
    # FLUX.1-dev: resolution-dependent shift.
    dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
         base_image_seq_len=256, max_image_seq_len=4096),
    # FLUX.1-schnell: no shift.
    dict(shift=1.0, use_dynamic_shifting=False),
    # SD3: static shift.
    dict(shift=3.0),
    # Resolution-dependent shift, linear in mu.
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
]


@pytest.mark.parametrize("config", FLOW_CONFIGS)
@pytest.mark.parametrize("num_steps,image_seq_len", [(4, 256), (28, 4096), (7, 1024)])
def test_flow_match_euler_matches_diffusers(config, num_steps, image_seq_len):
  ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
  mu = None
  if config.get("use_dynamic_shifting"):
    mu = schedulers.calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
  ref.set_timesteps(sigmas=sigmas, mu=mu)
  sched = schedulers.scheduler_from_config(json.loads(ref.to_json_string()))
  assert isinstance(sched, schedulers.FlowMatchEulerScheduler)
  _check(sched, ref, sched.schedule(num_steps, image_seq_len=image_seq_len), num_steps)


def test_calculate_shift_matches_diffusers():
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  for n in (64, 256, 1024, 4096, 6000):
    assert schedulers.calculate_shift(n) == pytest.approx(calculate_shift(n), rel=1e-12)


DPM_CONFIGS = [
    # PixArt-Sigma.
    dict(beta_schedule="linear", prediction_type="epsilon"),
    # SDXL, "DPM++ 2M Karras", v-prediction variant.
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_type="heun",
         timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", lambda_min_clipped=-5.1,
         lower_order_final=False, final_sigmas_type="sigma_min", solver_order=1),
]


@pytest.mark.parametrize("config", DPM_CONFIGS)
@pytest.mark.parametrize("num_steps", [1, 5, 20])
def test_dpm_solver_matches_diffusers(config, num_steps):
  ref = diffusers.DPMSolverMultistepScheduler(**config)
  ref.set_timesteps(num_steps)
  sched = schedulers.scheduler_from_config(json.loads(ref.to_json_string()))
  assert isinstance(sched, schedulers.DPMSolverMultistepScheduler)
  _check(sched, ref, sched.schedule(num_steps), num_steps)


EULER_CONFIGS = [
    # SDXL base.
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         prediction_type="v_prediction", use_karras_sigmas=True),
    dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(prediction_type="epsilon", timestep_spacing="linspace", final_sigmas_type="sigma_min"),
    # Log-linear sigmas (one more than the steps, as diffusers makes them); EDM-style timesteps.
    dict(interpolation_type="log_linear"),
    dict(prediction_type="v_prediction", timestep_type="continuous"),
]


@pytest.mark.parametrize("config", EULER_CONFIGS)
@pytest.mark.parametrize("num_steps", [3, 25])
def test_euler_matches_diffusers(config, num_steps):
  ref = diffusers.EulerDiscreteScheduler(**config)
  ref.set_timesteps(num_steps)
  sched = schedulers.scheduler_from_config(json.loads(ref.to_json_string()))
  assert isinstance(sched, schedulers.EulerDiscreteScheduler)
  schedule = sched.schedule(num_steps)
  assert sched.init_noise_sigma(schedule) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
  _check(sched, ref, schedule, num_steps)


def test_bf16_step_keeps_dtype_and_stays_close():
  sched = schedulers.FlowMatchEulerScheduler(shift=3.0)
  schedule = sched.schedule(4)
  x = jax.random.normal(jax.random.key(0), (1, 16, 8), jnp.bfloat16)
  v = jax.random.normal(jax.random.key(1), (1, 16, 8), jnp.bfloat16)
  got, _ = sched.step(schedule, (), jnp.int32(1), v, x)
  assert got.dtype == jnp.bfloat16
  x64, v64 = np.asarray(x, np.float64), np.asarray(v, np.float64)
  sig = np.asarray(schedule.sigmas, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), x64 + (sig[2] - sig[1]) * v64,
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cfg,match", [
    ({"_class_name": "DDIMScheduler"}, "not supported"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
     "algorithm_type"),
    ({"_class_name": "DPMSolverMultistepScheduler", "thresholding": True}, "thresholding"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True},
     "stochastic_sampling"),
])
def test_unsupported_configs_are_rejected(cfg, match):
  with pytest.raises(ValueError, match=match):
    schedulers.scheduler_from_config(cfg)


def test_dynamic_shift_needs_image_seq_len():
  with pytest.raises(ValueError, match="image_seq_len"):
    schedulers.FlowMatchEulerScheduler(use_dynamic_shifting=True).schedule(4)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_unknown_final_sigmas_type_is_rejected_like_diffusers(name):
  ref = getattr(diffusers, name)(final_sigmas_type="sigma_max")
  with pytest.raises(ValueError, match="final_sigmas_type"):
    ref.set_timesteps(4)
  with pytest.raises(ValueError, match="final_sigmas_type"):
    schedulers.scheduler_from_config(json.loads(ref.to_json_string()))


# SDXL-Turbo's scheduler_config.json (stabilityai/sdxl-turbo): Euler ancestral, trailing spacing.
SDXL_TURBO_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            num_train_timesteps=1000, prediction_type="epsilon",
                            steps_offset=1, timestep_spacing="trailing")
ANCESTRAL_CONFIGS = [
    SDXL_TURBO_SCHEDULER,
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"),
    dict(timestep_spacing="linspace"),
]


@pytest.mark.parametrize("config", ANCESTRAL_CONFIGS, ids=["sdxl_turbo", "leading_v", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 20])
def test_euler_ancestral_matches_diffusers_given_the_same_noise(config, num_steps):
  """diffusers draws each step's noise from a torch generator; we draw the same numbers from an
  identically seeded generator and hand them to our step."""
  ref = diffusers.EulerAncestralDiscreteScheduler(**config)
  ref.set_timesteps(num_steps)
  sched = schedulers.scheduler_from_config(json.loads(ref.to_json_string()))
  assert isinstance(sched, schedulers.EulerAncestralDiscreteScheduler) and sched.stochastic
  schedule = sched.schedule(num_steps)
  np.testing.assert_allclose(np.asarray(schedule.timesteps), ref.timesteps.float().numpy(),
                             rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(schedule.sigmas), ref.sigmas.float().numpy(),
                             rtol=5e-5, atol=1e-7)
  assert sched.init_noise_sigma(schedule) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
  rng = np.random.default_rng(num_steps)
  shape = (2, 4, 8, 8)
  sample = rng.standard_normal(shape, dtype=np.float32)
  outputs = rng.standard_normal((num_steps, *shape), dtype=np.float32)
  theirs, noise_source = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
  x = torch.from_numpy(sample)
  for t, out in zip(ref.timesteps, outputs, strict=True):
    x_in = ref.scale_model_input(x, t)
    x = ref.step(torch.from_numpy(out) + 0.1 * x_in, t, x, generator=theirs).prev_sample
  noises = np.stack([torch.randn(shape, generator=noise_source).numpy()
                     for _ in range(num_steps)])
  step = jax.jit(lambda i, out, x, noise: sched.step(
      schedule, (), i, out + 0.1 * sched.scale_model_input(schedule, i, x), x, noise=noise)[0])
  got = jnp.asarray(sample)
  for i in range(num_steps):
    got = step(jnp.int32(i), jnp.asarray(outputs[i]), got, jnp.asarray(noises[i]))
  expected = x.numpy()
  err = np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()
  assert err <= 1e-5, f"relative error {err}"


def test_sdxl_turbo_euler_trailing_spacing_matches_diffusers():
  """SDXL-Turbo also runs with plain Euler and trailing spacing, 1 to 4 steps."""
  ref = diffusers.EulerDiscreteScheduler(**SDXL_TURBO_SCHEDULER)
  for num_steps in (1, 2, 3, 4):
    ref.set_timesteps(num_steps)
    sched = schedulers.scheduler_from_config(json.loads(ref.to_json_string()))
    assert isinstance(sched, schedulers.EulerDiscreteScheduler) and not sched.stochastic
    schedule = sched.schedule(num_steps)
    assert sched.init_noise_sigma(schedule) == pytest.approx(float(ref.init_noise_sigma),
                                                             rel=1e-6)
    _check(sched, ref, schedule, num_steps)


def test_euler_ancestral_needs_noise_and_rejects_zero_snr():
  sched = schedulers.EulerAncestralDiscreteScheduler()
  x = jnp.zeros((1, 4, 2, 2))
  with pytest.raises(ValueError, match="needs noise"):
    sched.step(sched.schedule(2), (), jnp.int32(0), x, x)
  with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
    schedulers.scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler",
                                      "rescale_betas_zero_snr": True})
  with pytest.raises(ValueError, match="prediction_type 'sample'"):
    schedulers.scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler",
                                      "prediction_type": "sample"})

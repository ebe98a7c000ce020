"""demo.train: seeded batches, a deterministic denoiser step, resume equal to an uninterrupted run.

Tiny configs on random data: no rendering, no VAE training.
"""

import jax
import numpy as np
import pytest
from PIL import Image

from demo import architecture, train
from demo.tokenizer import MAX_LENGTH

TINY = train.TrainConfig(steps=2, guidance_steps=2, guidance_dropout=0.5, batch=4, warmup=1,
                         checkpoint_every=2, vocab_size=32, width=64, double_blocks=1,
                         single_blocks=1, text_width=64, text_layers=1,
                         vae_channels=(8, 8, 8))


def test_batch_indices_are_seeded_permutations_per_epoch():
  n, batch = 10, 4
  stream = np.concatenate([train.batch_indices(3, s, n, batch) for s in range(5)])  # 2 epochs
  assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
  np.testing.assert_array_equal(stream[:4], train.batch_indices(3, 0, n, batch))
  assert not np.array_equal(stream[:10], stream[10:20])
  assert not np.array_equal(train.batch_indices(4, 0, n, batch), stream[:4])


def _fake_data(np_rng):
  n = 6
  ids = np_rng.integers(4, TINY.vocab_size, (n, MAX_LENGTH)).astype(np.int32)
  ids[:, 5] = architecture.EOS_ID
  images = np.zeros((n, 3, 32, 32), np.float32)
  mean = np_rng.normal(size=(n, 16, 8, 8)).astype(np.float32)
  std = np.full_like(mean, 0.1)
  empty = np.zeros(MAX_LENGTH, np.int32)
  return train.TrainingData([], images, ids, ids, (empty, empty)), mean, std


def _run(out, data, mean, std, deadline=None):
  out.mkdir(parents=True, exist_ok=True)
  vae = architecture.build_vae(TINY.configs(), 0)
  modules, steps = train.train_denoiser(TINY, data, mean, std, vae, out, deadline=deadline)
  losses = (out / "denoiser_loss.csv").read_text()
  return jax.tree.leaves(architecture.nnx.state(modules["transformer"])), steps, losses


@pytest.mark.slow
def test_denoiser_is_deterministic_and_resumes_exactly(tmp_path, np_rng):
  data, mean, std = _fake_data(np_rng)
  params_a, steps_a, losses_a = _run(tmp_path / "a", data, mean, std)
  params_b, _, losses_b = _run(tmp_path / "b", data, mean, std)
  assert steps_a == TINY.steps + TINY.guidance_steps
  assert len(losses_a.splitlines()) == TINY.steps + TINY.guidance_steps
  assert losses_a == losses_b  # same seed, same losses
  for a, b in zip(params_a, params_b, strict=True):
    np.testing.assert_array_equal(a, b)
  # Interrupted after the first step (a deadline already passed), then resumed to the end.
  _, stopped, _ = _run(tmp_path / "c", data, mean, std, deadline=0.0)
  assert stopped == 1
  params_c, steps_c, losses_c = _run(tmp_path / "c", data, mean, std)
  assert steps_c == TINY.steps + TINY.guidance_steps and losses_c == losses_a
  for a, c in zip(params_a, params_c, strict=True):
    np.testing.assert_array_equal(a, c)


def test_loss_curve_is_written_from_the_loss_logs(tmp_path):
  """loss.png: one panel per stage, drawn from the CSV logs run_loop writes (step,loss)."""
  (tmp_path / "vae_loss.csv").write_text("".join(f"{s},{1 / (s + 1)}\n" for s in range(50)))
  (tmp_path / "denoiser_loss.csv").write_text("".join(f"{s},{2 - s / 100}\n" for s in range(80)))
  path = train.plot_losses(tmp_path)
  image = np.asarray(Image.open(path).convert("L"))
  half = image.shape[1] // 2
  assert path == tmp_path / "loss.png"
  assert (image[:, :half] < 128).sum() > 100 and (image[:, half:] < 128).sum() > 100
  assert not np.array_equal(image[:, :half], image[:, half:2 * half])  # two different curves

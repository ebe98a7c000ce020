"""Two processes on JAX's multi-controller runtime (localhost, 4 virtual CPU devices each, jax's
gloo CPU collectives) sample the same PNGs, byte for byte, as one process with 8 devices.

`svdq-jax sample` runs in subprocesses: the device count and `jax.distributed.initialize` must
come before jax starts, and the test session's jax already runs on one CPU device.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import pipelines  # noqa: E402
from pipelines import distributed  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from tests.pipelines._pipeline_reference import save_tiny_flux_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"a {c} {a} in snow" for c in ("red", "blue", "green", "old") for a in ("cat", "dog")]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {key: value for key, value in os.environ.items()
         if not key.startswith("JAX_") or key == "JAX_PLATFORMS"}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _sample_args(folder: Path, out: Path) -> list[str]:
  args = [sys.executable, "-m", "cli", "sample", str(folder), "--out", str(out), "--quiet",
          "--seed", "3"]
  for prompt in PROMPTS:
    args += ["--prompt", prompt]
  return args


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
  folder = tmp_path_factory.mktemp("flux") / "tiny"
  save_tiny_flux_pipeline(folder)
  (folder / "sample_defaults.json").write_text(json.dumps(
      {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}))
  return folder


@pytest.mark.slow
def test_two_processes_write_the_pngs_of_one_process(tiny_folder, tmp_path):
  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  port = _free_port()
  procs = [subprocess.Popen(
      [*_sample_args(tiny_folder, tmp_path / "two" / "img.png"), "--coordinator",
       f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
      env=_env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  one = subprocess.run([*_sample_args(tiny_folder, tmp_path / "one" / "img.png"),
                        "--devices", "8"], env=_env(8), cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
  outputs = [proc.communicate(timeout=900) for proc in procs]
  for proc, (_, stderr) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, stderr[-3000:]
  assert one.returncode == 0, one.stderr[-3000:]
  # Each process wrote the PNGs of its own rows: 0-3 on process 0, 4-7 on process 1 (gloo
  # prints its connection lines on stdout too).
  written = [[Path(line).name for line in stdout.splitlines() if line.endswith(".png")]
             for stdout, _ in outputs]
  assert written == [[f"img_{i}.png" for i in range(4)], [f"img_{i}.png" for i in range(4, 8)]]
  names = sorted(p.name for p in (tmp_path / "one").iterdir())
  assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
  assert len(names) == 8
  for name in names:
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
  first, second = ((tmp_path / "one" / n).read_bytes() for n in ("img_0.png", "img_1.png"))
  assert first != second  # different prompts, different images


def test_initialize_checks_its_settings(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.requested()
  assert distributed.requested(num_processes=2)
  with pytest.raises(InputError, match="HOST:PORT"):
    distributed.initialize("localhost", 2, 0)
  with pytest.raises(InputError, match="outside 0..1"):
    distributed.initialize("localhost:1234", 2, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  assert distributed.requested()
  with pytest.raises(InputError, match="JAX_NUM_PROCESSES must be an integer"):
    distributed.initialize("localhost:1234")


def test_a_failed_png_write_leaves_no_file(tmp_path, monkeypatch):
  import numpy as np
  from PIL import Image

  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  real_save = Image.Image.save
  calls = []

  def failing_save(self, fp, *args, **kwargs):
    calls.append(fp)
    if len(calls) == 2:  # the second image: write a part of a PNG, then fail (a full disk)
      fp.write(b"\x89PNG\r\n\x1a\n partial")
      raise OSError(28, "No space left on device")
    return real_save(self, fp, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "save", failing_save)
  with pytest.raises(OSError, match="No space left"):
    pipelines.save_images(images, tmp_path / "out.png", prompts=["a", "b"], seed=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out_0.png"]  # complete; no out_1.png
  with Image.open(tmp_path / "out_0.png") as image:
    np.testing.assert_array_equal(np.asarray(image),
                                  np.round(images[0] * 255).astype(np.uint8))

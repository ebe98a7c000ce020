"""ptxas's resource counts for both Mosaic GPU kernels in the configurations select_config picks
for FLUX.1, without a GPU: registers, spills, local-memory traffic and shared memory on an H100.

benchmarks/kernel_resources.py lowers svdq_linear for an abstract H100 and compiles the two
kernels with the jax CUDA plugin's own Mosaic GPU compiler (MosaicGpuCompile, which runs ptxas for
sm_90a) over a stand-in libcuda.so.1. It runs in a subprocess: the stand-in must never be loaded
into the pytest process, where torch's CUDA build and jax would take it for the driver.

Where the compiler comes from:
- .venv/mosaic-compile, which `make test` installs (jax-cuda13-pjrt and jax-cuda13-plugin of
  jax's version, and nvdisasm; ptxas too where none is on PATH). It is kept out of site-packages:
  there, plain `import jax` would find the plugin and try to start a CUDA backend.
- else this interpreter's own packages, as on the GPU machines, whose jax[cuda13] has the plugin.
  The stand-in is loaded before anything opens the real driver, so the test runs the same there.
With neither the test fails and says how to install it, unless SVDQ_SKIP_KERNEL_RESOURCES=1 (for
a machine that cannot install the plugin) makes it skip.

The plugin runs the first ptxas on PATH; .venv/mosaic-compile/nvidia/cu13/bin goes first, and holds
ptxas only where `make test` found none (this image has CUDA 13.0's in /usr/local/bin).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pallas_kernels.svdq_linear import SVDQLinearConfig, select_config
from pallas_kernels.svdq_linear.config import (
    H100_SMEM_BYTES,
    REGISTERS_PER_THREAD,
    gemm_smem_bytes,
    padded_rank,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"
PLUGIN_SITE = ROOT / ".venv" / "mosaic-compile"
PLUGIN_LIBRARY = PLUGIN_SITE / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so"
SKIP_VARIABLE = "SVDQ_SKIP_KERNEL_RESOURCES"

RANK = 32
FF_UP_K, FF_UP_N = 3072, 12288
"""FLUX.1's double-block MLP up-projection (K, N); 4096 image tokens take the M > 512 pipeline
depth of select_config, 512 text tokens the M <= 512 one."""


def _ff_up_case(label: str, tokens: int, config: SVDQLinearConfig,
                x_dtype: str = "bfloat16") -> dict:
  """One case of the --cases file (KernelCase in dataclasses.asdict's layout)."""
  return {"label": label, "m": tokens, "k": FF_UP_K, "n": FF_UP_N, "act_shift": 0.0,
          "rank": RANK, "x_dtype": x_dtype, "config": dataclasses.asdict(config)}


IMAGE_TOKENS = select_config(4096, FF_UP_K, FF_UP_N, RANK)
TEXT_TOKENS = select_config(512, FF_UP_K, FF_UP_N, RANK)
WIDE_TILE = dataclasses.replace(IMAGE_TOKENS,
                                gemm=dataclasses.replace(IMAGE_TOKENS.gemm, block_n=256))
"""64 x 256 output tiles: the carry and two group accumulators take 3 x 128 f32 registers per
thread, more than the 255 it has, so ptxas spills."""

DEFAULTS = {"image tokens": IMAGE_TOKENS, "text tokens": TEXT_TOKENS}
CASES = [_ff_up_case("image tokens", 4096, IMAGE_TOKENS),
         _ff_up_case("text tokens", 512, TEXT_TOKENS),
         _ff_up_case("wide tile", 4096, WIDE_TILE),
         _ff_up_case("float32 input", 4096, IMAGE_TOKENS, "float32")]


def _compiler_arguments() -> list[str]:
  """kernel_resources.py's --plugin-site for the compiler found (see the module docstring), or a
  skip or failure saying why there is none."""
  if os.environ.get(SKIP_VARIABLE) == "1":
    pytest.skip(f"{SKIP_VARIABLE}=1")
  if PLUGIN_LIBRARY.is_file():
    return ["--plugin-site", str(PLUGIN_SITE)]
  if importlib.util.find_spec("jax_cuda13_plugin") is not None:
    return []
  pytest.fail(f"{PLUGIN_LIBRARY} is missing and this Python has no jax CUDA plugin: run `make "
              f"test` (in a checkout whose test install predates it: `rm .venv/.installed-test; "
              f"make venv-test`), or set {SKIP_VARIABLE}=1 where it cannot be installed")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
  """ptxas's report on each kernel of CASES, by (label, kernel): one kernel_resources.py run."""
  arguments = _compiler_arguments()
  workdir = tmp_path_factory.mktemp("kernel_resources")
  cases, output = workdir / "cases.json", workdir / "reports.json"
  cases.write_text(json.dumps(CASES))
  tools = PLUGIN_SITE / "nvidia" / "cu13" / "bin"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PATH": os.pathsep.join([str(tools), os.environ.get("PATH", "")])}
  run = subprocess.run(
      [sys.executable, str(SCRIPT), *arguments, "--cases", str(cases), "--json", str(output)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, f"kernel_resources.py: {run.stdout[-3000:]}\n{run.stderr[-3000:]}"
  return {(record["label"], record["kernel"]): record for record in json.loads(output.read_text())}


def _report(reports: dict[tuple[str, str], dict], label: str, kernel: str) -> dict:
  if (label, kernel) not in reports:
    pytest.fail(f"no ptxas report for {kernel} of {label!r}; got {sorted(reports.values())}")
  return reports[label, kernel]


def resource_violations(report: dict) -> list[str]:
  """The H100 limits one kernel's report breaks: failed compilation, more registers than a thread
  has, register spills, local loads or stores in the SASS (when nvdisasm read it), more shared
  memory than a CTA may have. Empty when it keeps to all of them."""
  if report["status"] != "ok":
    return [f"compilation: {report['status']}"]
  violations = []
  if report["registers"] > REGISTERS_PER_THREAD:
    violations.append(f"{report['registers']} registers > {REGISTERS_PER_THREAD}")
  if report["spill_store_bytes"] or report["spill_load_bytes"]:
    violations.append(f"spills {report['spill_store_bytes']} bytes stored, "
                      f"{report['spill_load_bytes']} loaded per thread")
  if report["local_loads"] or report["local_stores"]:
    violations.append(f"{report['local_loads']} LDL, {report['local_stores']} STL in the SASS")
  if report["smem_bytes"] > H100_SMEM_BYTES:
    violations.append(f"{report['smem_bytes']} bytes of SMEM > {H100_SMEM_BYTES}")
  return violations


@pytest.mark.parametrize("kernel", ["quantize", "gemm"])
@pytest.mark.parametrize("label", DEFAULTS)
def test_selected_configs_stay_within_h100_limits(reports, label, kernel):
  assert resource_violations(_report(reports, label, kernel)) == []


def test_float32_input_stays_within_h100_limits(reports):
  # Kernel 1 then reads f32 tiles and stores their bf16 hi and lo terms; kernel 2 writes f32.
  for kernel in ("quantize", "gemm"):
    assert resource_violations(_report(reports, "float32 input", kernel)) == [], kernel


@pytest.mark.parametrize("label", DEFAULTS)
def test_gemm_smem_bytes_is_the_launch_allocation(reports, label):
  # select_config counts CTAs per SM with gemm_smem_bytes: it must be the size the launch requests.
  estimate = gemm_smem_bytes(DEFAULTS[label].gemm, 2 * padded_rank(RANK))
  assert _report(reports, label, "gemm")["dynamic_smem_bytes"] == estimate


def test_image_tokens_config_lets_two_gemm_ctas_share_an_sm(reports):
  # What select_config's deepest pipeline for M > 512 is chosen for, by ptxas's registers and SMEM.
  assert _report(reports, "image tokens", "gemm")["ctas_per_sm"] >= 2


def test_a_spilling_tile_is_reported(reports):
  report = _report(reports, "wide tile", "gemm")
  assert report["spill_store_bytes"] > 0 and report["spill_load_bytes"] > 0
  assert any(v.startswith("spills") for v in resource_violations(report))
  if report["local_stores"] is not None:
    assert report["local_loads"] > 0 and report["local_stores"] > 0

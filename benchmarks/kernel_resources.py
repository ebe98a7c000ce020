"""Registers, spills and shared memory of the two Mosaic GPU kernels, from ptxas, without a GPU.

The deviceless lowering (`lower(lowering_platforms=("cuda",))`) stops at the serialized Mosaic GPU
module inside the `mosaic_gpu_v2` custom call; the rest (MLIR -> LLVM NVPTX -> PTX -> ptxas ->
cubin) runs in C++ in jaxlib's CUDA plugin when XLA instantiates the custom call. This script
runs that same compiler on the same module, on a machine without a GPU:

1. lower `svdq_linear` for an abstract H100 and take the module bytes of both custom calls
   (kernel 1 = quantize.py, kernel 2 = gemm_sm90.py) from the StableHLO;
2. hand each to `MosaicGpuCompile`, the C entry point of the plugin library
   (jax_plugins/xla_cuda13/xla_cuda_plugin.so); its only device queries are the compute
   capability of the current context and, after compilation, the module load. A stand-in
   libcuda.so.1 (compiled here from FAKE_DRIVER_SOURCE with `cc`) answers them: one device of
   compute capability 9.0 (so the target is sm_90a, as on an H100), and a module load that only
   keeps the cubin and the dynamic shared memory the kernel asks for;
3. with MOSAIC_GPU_DUMP_PTXAS / MOSAIC_GPU_DUMP_PTX set, the plugin prints the output of its own
   `ptxas -arch=sm_90a --warn-on-spills -v` and the PTX; the table is parsed from those, plus the
   local loads and stores in the cubin's SASS when nvdisasm is available.

Nothing runs on a GPU: the numbers are ptxas's static resource counts. SMEM is the dynamic shared
memory of the launch plus ptxas's static count. CTAs/SM is the occupancy those resources allow on
an H100 (65536 registers per SM in 256-register warp units, 233472 bytes of SMEM per SM with 1 KiB
reserved per CTA, 2048 threads, 32 CTAs).

Needs, besides this repository's venv: the jax CUDA plugin of the same version as jax
(jax-cuda13-plugin and jax-cuda13-pjrt 0.11.2, no GPU needed), a C compiler (`cc`), and ptxas on
PATH (the plugin runs the first ptxas it finds; CUDA 13's nvidia-cuda-nvcc wheel ships one);
optionally nvdisasm (the nvidia-cuda-nvdisasm wheel). `make test` installs the plugin and nvdisasm
(and ptxas where none is on PATH) into .venv/mosaic-compile: pass `--plugin-site
.venv/mosaic-compile` and put .venv/mosaic-compile/nvidia/cu13/bin first on PATH. Do not install
the plugin into the venv itself: plain `import jax` would then try to start a CUDA backend.

Usage: python benchmarks/kernel_resources.py [--plugin-site DIR] [--nvdisasm PATH] [--output FILE]
           [--cases CASES.json] [--json FILE]

`--cases` compiles given cases instead of the FLUX.1 table and the sweep, and `--json` writes
the reports in a form a program reads (tests/pallas_kernels/test_kernel_resources.py uses both).
Run it in its own process: the stand-in driver it loads would be the libcuda of any other code
in the process (torch's CUDA build, jax's own CUDA backend).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxlib.mlir import ir

from pallas_kernels.svdq_linear import (
  GemmConfig,
  QuantizeConfig,
  SVDQLinearConfig,
  select_config,
  svdq_linear,
)
from pallas_kernels.svdq_linear.config import ctas_per_sm_by_smem, round_up
from svdq_jax.quantizers import GELU_SHIFT

# The lowering must never initialize a CUDA backend: with the plugin installed and the stand-in
# driver loaded, jax would otherwise try to open a GPU client on it.
jax.config.update("jax_platforms", "cpu")

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
RANK = 32

FLUX_LAYERS = (
    # (what, tokens M, K, N, act_shift): FLUX.1 at 1024 x 1024 (4096 image, 512 text tokens; the
    # single blocks see both, 4608), the SVDQuant linears of the double and single blocks; the MLP
    # down-projections take unsigned INT4 codes of the GELU output shifted by GELU_SHIFT.
    ("double img q/k/v, out", 4096, 3072, 3072, 0.0),
    ("double img ff up", 4096, 3072, 12288, 0.0),
    ("double img ff down", 4096, 12288, 3072, GELU_SHIFT),
    ("double txt q/k/v, out", 512, 3072, 3072, 0.0),
    ("double txt ff up", 512, 3072, 12288, 0.0),
    ("double txt ff down", 512, 12288, 3072, GELU_SHIFT),
    ("single q/k/v", 4608, 3072, 3072, 0.0),
    ("single proj_mlp", 4608, 3072, 12288, 0.0),
    ("single proj_out", 4608, 15360, 3072, 0.0),
)
SWEEP_SHAPE = (4096, 3072, 12288)
"""The (M, K, N) of the configuration sweep: the double blocks' image MLP up-projection."""

FAKE_DRIVER_SOURCE = r"""
/* Stand-in for libcuda.so.1: one device of compute capability 9.0, module loads that only keep a
   copy of the cubin. Enough for Mosaic GPU's compiler (MosaicGpuCompile) to run without a GPU. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
int last_dynamic_smem_bytes = -1;
unsigned char *last_image = 0;
uint64_t last_image_bytes = 0;
static int handle;
static const char *message = "stand-in CUDA driver (no GPU)";

CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return 0; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = 0; return 0; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }
CUresult cuCtxGetCurrent(void **context) { *context = &handle; return 0; }
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  /* 75, 76: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, _MINOR */
  *value = attribute == 75 ? 9 : 0;
  return 0;
}
CUresult cuGetErrorString(CUresult error, const char **text) { *text = message; return 0; }
CUresult cuGetErrorName(CUresult error, const char **text) { *text = message; return 0; }
/* The size of an ELF64 image: the end of its section or program header table, whichever is last. */
static uint64_t elf_bytes(const unsigned char *elf) {
  uint64_t phoff, shoff;
  uint16_t phentsize, phnum, shentsize, shnum;
  if (memcmp(elf, "\177ELF", 4) != 0 || elf[4] != 2) return 0;
  memcpy(&phoff, elf + 0x20, 8);
  memcpy(&shoff, elf + 0x28, 8);
  memcpy(&phentsize, elf + 0x36, 2);
  memcpy(&phnum, elf + 0x38, 2);
  memcpy(&shentsize, elf + 0x3a, 2);
  memcpy(&shnum, elf + 0x3c, 2);
  uint64_t ph_end = phoff + (uint64_t)phentsize * phnum;
  uint64_t sh_end = shoff + (uint64_t)shentsize * shnum;
  return ph_end > sh_end ? ph_end : sh_end;
}
CUresult cuModuleLoadData(void **module, const void *image) {
  free(last_image);
  last_image_bytes = elf_bytes(image);
  last_image = malloc(last_image_bytes ? last_image_bytes : 1);
  memcpy(last_image, image, last_image_bytes);
  *module = &handle;
  return 0;
}
CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
  *function = &handle;
  return 0;
}
CUresult cuFuncSetAttribute(void *function, int attribute, int value) {
  /* 8: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, what the launch will ask for */
  if (attribute == 8) last_dynamic_smem_bytes = value;
  return 0;
}
CUresult cuModuleUnload(void *module) { return 0; }
"""

# H100 (sm_90) limits for the occupancy column.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, per warp
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """One lowering: a FLUX.1 layer shape with a configuration of both kernels, a low-rank width
  (the kernels pad it with `padded_rank`) and the input dtype (kernel 1 reads float32 inputs as
  float32, and the output has the input's dtype)."""

  label: str
  m: int
  k: int
  n: int
  act_shift: float
  config: SVDQLinearConfig
  rank: int = RANK
  x_dtype: str = "bfloat16"


KERNELS = ("quantize", "gemm")
"""The Mosaic GPU kernels of `svdq_linear` in program order: kernel 1 (quantize.py, activation
quantization and x @ lora_down) and kernel 2 (gemm_sm90.py); also the SVDQLinearConfig fields
that configure them."""


@dataclasses.dataclass(frozen=True)
class PtxasReport:
  """What the plugin's compile of one Mosaic GPU module printed, parsed.

  Attributes:
    status: "ok", or why compilation failed (the first error line).
    registers: 32-bit registers per thread (ptxas "Used N registers").
    stack_bytes: per-thread stack frame (local memory that is not spilling, e.g. indexed arrays).
    spill_store_bytes, spill_load_bytes: per-thread register spills to local memory.
    static_smem_bytes: shared memory ptxas sees declared in the PTX.
    dynamic_smem_bytes: shared memory the launch requests (Mosaic GPU allocates SMEM dynamically).
    threads: threads per CTA (the PTX's .maxntid).
    messages: ptxas's numbered notes and warnings (e.g. C7519: wgmma waits it had to insert).
    local_loads, local_stores: LDL / STL instructions in the SASS (nvdisasm of the cubin), the
      local-memory traffic behind the stack and spill bytes; None without nvdisasm.
  """

  status: str
  registers: int | None = None
  stack_bytes: int | None = None
  spill_store_bytes: int | None = None
  spill_load_bytes: int | None = None
  static_smem_bytes: int | None = None
  dynamic_smem_bytes: int | None = None
  threads: int | None = None
  messages: tuple[str, ...] = ()
  local_loads: int | None = None
  local_stores: int | None = None

  @property
  def smem_bytes(self) -> int | None:
    """Shared memory per CTA: the launch's dynamic bytes plus ptxas's static count."""
    if self.static_smem_bytes is None or self.dynamic_smem_bytes is None:
      return None
    return self.static_smem_bytes + max(self.dynamic_smem_bytes, 0)

  def ctas_per_sm(self) -> int | None:
    """CTAs one H100 SM can hold with these registers, SMEM and threads."""
    if self.registers is None or self.smem_bytes is None or not self.threads:
      return None
    per_warp = round_up(self.registers * 32, REGISTER_ALLOCATION_UNIT)
    warps = round_up(self.threads, 32) // 32
    by_registers = REGISTERS_PER_SM // (per_warp * warps)
    return min(by_registers, ctas_per_sm_by_smem(self.smem_bytes),
               MAX_THREADS_PER_SM // self.threads, MAX_CTAS_PER_SM)


@dataclasses.dataclass(frozen=True)
class CaseResult:
  """ptxas's report on each kernel of one case, or why the lowering rejected the case.

  Attributes:
    case: the lowered case.
    reports: one PtxasReport per name of KERNELS; empty when the lowering rejected the case.
    rejected: the lowering's error (first line), or None.
  """

  case: KernelCase
  reports: dict[str, PtxasReport]
  rejected: str | None = None


def flux_cases() -> list[KernelCase]:
  """The FLUX.1 layers with the configuration `select_config` picks for each."""
  return [KernelCase(label, m, k, n, shift, select_config(m, k, n, RANK))
          for label, m, k, n, shift in FLUX_LAYERS]


def sweep_cases() -> list[KernelCase]:
  """Alternatives to the selected configuration at SWEEP_SHAPE: kernel 2's output tile width,
  groups per step, carrier and barrier mode, and kernel 1's row block and pipeline depth."""
  m, k, n = SWEEP_SHAPE
  chosen = select_config(m, k, n, RANK)
  cases = []
  for carrier in ("s8", "e4m3"):
    for block_n in (64, 128, 256):
      for groups_per_step in (1, 2, 4):
        gemm = dataclasses.replace(chosen.gemm, block_n=block_n, groups_per_step=groups_per_step,
                                   carrier=carrier)
        cases.append(KernelCase("sweep", m, k, n, 0.0, dataclasses.replace(chosen, gemm=gemm)))
  gemm = dataclasses.replace(chosen.gemm, manual_barriers=True)
  cases.append(KernelCase("sweep", m, k, n, 0.0, dataclasses.replace(chosen, gemm=gemm)))
  gemm = dataclasses.replace(chosen.gemm, block_m=128, groups_per_step=1)
  cases.append(KernelCase("sweep", m, k, n, 0.0, dataclasses.replace(chosen, gemm=gemm)))
  for block_m, steps in ((128, 2), (64, 3)):
    quantize = dataclasses.replace(chosen.quantize, block_m=block_m, max_concurrent_steps=steps)
    cases.append(KernelCase("sweep", m, k, n, 0.0, dataclasses.replace(chosen, quantize=quantize)))
  return cases


def describe_quantize(config: QuantizeConfig) -> str:
  """Kernel 1's configuration in a table cell."""
  return f"bm{config.block_m} ksplit{config.k_splits} stages{config.max_concurrent_steps}"


def describe_gemm(config: GemmConfig) -> str:
  """Kernel 2's configuration in a table cell: tile, pipeline stages, groups per step, carrier."""
  text = (f"{config.block_m}x{config.block_n} stages{config.max_concurrent_steps} "
          f"g{config.groups_per_step} {config.carrier}")
  return text + (" manual-barriers" if config.manual_barriers else "")


def lower_modules(case: KernelCase) -> list[bytes]:
  """The serialized Mosaic GPU modules of `svdq_linear` for `case`, in program order (kernel 1,
  kernel 2), exactly as the custom calls carry them to XLA."""
  m, k, n, r = case.m, case.k, case.n, case.rank
  shapes = [((m, k), jnp.dtype(case.x_dtype)), ((n, k // 2), jnp.uint8),
            ((k // 64, n), jnp.bfloat16), ((k,), jnp.float32), ((k, r), jnp.bfloat16),
            ((r, n), jnp.bfloat16), ((n,), jnp.float32)]
  structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  fn = lambda *a: svdq_linear(*a, act_shift=case.act_shift, config=case.config)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
    lowered = jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))
  modules: list[bytes] = []

  def visit(operation: ir.Operation) -> None:
    for region in operation.regions:
      for block in region.blocks:
        for child in block.operations:
          op = child.operation
          if (op.name == "stablehlo.custom_call" and
              ir.StringAttr(op.attributes["call_target_name"]).value == "mosaic_gpu_v2"):
            backend_config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            modules.append(ir.StringAttr(backend_config["module"]).value_bytes)
          visit(op)

  visit(lowered.compiler_ir("stablehlo").operation)
  return modules


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
  """Redirects the process's stdout and stderr file descriptors (the plugin writes there from
  C++) into a temporary file; the list it yields holds that text after the block."""
  captured: list[str] = []
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
      yield captured
    finally:
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])
      sink.seek(0)
      captured.append(sink.read().decode(errors="replace"))


class MosaicCompiler:
  """The CUDA plugin's Mosaic GPU compiler, loaded in this process over the stand-in driver."""

  def __init__(self, plugin_site: Path | None, workdir: Path, nvdisasm: str | None):
    plugin_library, runtime_library = _plugin_paths(plugin_site)
    self._workdir = workdir
    self._nvdisasm = nvdisasm
    driver = workdir / "libcuda.so.1"
    source = workdir / "fake_libcuda.c"
    source.write_text(FAKE_DRIVER_SOURCE)
    if shutil.which("cc") is None:
      raise SystemExit("kernel_resources: no C compiler `cc` on PATH (it builds the stand-in "
                       "libcuda.so.1)")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o",
                    str(driver), str(source)], check=True)
    # Loaded globally under its soname first, so that the plugin's dlopen("libcuda.so.1") gets it.
    self._driver = ctypes.CDLL(str(driver), mode=ctypes.RTLD_GLOBAL)
    self._dynamic_smem = ctypes.c_int.in_dll(self._driver, "last_dynamic_smem_bytes")
    self._image = ctypes.c_void_p.in_dll(self._driver, "last_image")
    self._image_bytes = ctypes.c_uint64.in_dll(self._driver, "last_image_bytes")
    plugin = ctypes.CDLL(str(plugin_library))
    self._compile = plugin.MosaicGpuCompile
    self._compile.argtypes = [ctypes.c_char_p, ctypes.c_int]
    self._compile.restype = ctypes.POINTER(ctypes.c_void_p)
    self._unload = plugin.MosaicGpuUnload
    self._unload.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    self._unload.restype = None
    # Read by the plugin at each compile: the JIT-compiled host code links the runtime library.
    os.environ["MOSAIC_GPU_RUNTIME_LIB_PATH"] = str(runtime_library)
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    os.environ["MOSAIC_GPU_DUMP_PTX"] = "1"

  def compile(self, module: bytes) -> PtxasReport:
    """Compiles one serialized Mosaic GPU module as the custom call would, and reports."""
    self._dynamic_smem.value = -1
    self._image_bytes.value = 0
    with captured_output() as output:
      compiled = self._compile(module, len(module))
    if compiled:
      self._unload(compiled)
    report = parse_report(output[0], bool(compiled), self._dynamic_smem.value)
    if compiled and self._nvdisasm and self._image_bytes.value:
      cubin = self._workdir / "kernel.cubin"
      cubin.write_bytes(ctypes.string_at(self._image.value, self._image_bytes.value))
      sass = subprocess.run([self._nvdisasm, "-c", str(cubin)], capture_output=True, text=True,
                            check=True).stdout
      report = dataclasses.replace(report, local_loads=len(re.findall(r"\bLDL\b", sass)),
                                   local_stores=len(re.findall(r"\bSTL\b", sass)))
    return report


def _plugin_paths(plugin_site: Path | None) -> tuple[Path, Path]:
  """xla_cuda_plugin.so and libmosaic_gpu_runtime.so, from `plugin_site` (a site-packages folder)
  or from the packages importable here."""
  if plugin_site is not None:
    candidates = (plugin_site / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so",
                  plugin_site / "jax_cuda13_plugin" / "libmosaic_gpu_runtime.so")
  else:
    try:
      pjrt = importlib.util.find_spec("jax_plugins.xla_cuda13")
    except ModuleNotFoundError:  # no jax_plugins namespace at all
      pjrt = None
    plugin = importlib.util.find_spec("jax_cuda13_plugin")
    if pjrt is None or plugin is None or not pjrt.origin or not plugin.origin:
      raise SystemExit("kernel_resources: the jax CUDA plugin is not installed here; "
                       "pip install jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 "
                       "(or pass --plugin-site with the site-packages that holds them)")
    candidates = (Path(pjrt.origin).parent / "xla_cuda_plugin.so",
                  Path(plugin.origin).parent / "libmosaic_gpu_runtime.so")
  for path in candidates:
    if not path.is_file():
      raise SystemExit(f"kernel_resources: {path} is missing (needs jax-cuda13-plugin and "
                       f"jax-cuda13-pjrt {jax.__version__})")
  return candidates


def _int(pattern: str, text: str) -> int | None:
  found = re.search(pattern, text)
  return int(found.group(1)) if found else None


def parse_report(output: str, compiled: bool, dynamic_smem_bytes: int) -> PtxasReport:
  """Reads ptxas's -v lines and the PTX's .maxntid from what the plugin printed."""
  registers = _int(r"Used (\d+) registers", output)
  if registers is None:
    errors = [line.strip() for line in output.splitlines()
              if not line[:1].isspace() and re.search(r"error|fatal|failed", line, re.IGNORECASE)]
    return PtxasReport(status="failed: " + (errors[0] if errors else "no ptxas output"))
  frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                    output)
  messages = set()
  for line in output.splitlines():
    found = re.match(r"ptxas (info|warning)\s*: (\(C\d+\) .*)|ptxas (warning)\s*: (.*)", line)
    if found:
      message = found.group(2) or found.group(4)
      message = re.sub(r"( in)? (around|at) line \d+| in (the )?function '[^']*'", "", message)
      messages.add(re.sub(r", \d+ bytes spill stores, \d+ bytes spill loads", "", message).strip())
  status = "ok" if compiled else "ptxas ok, host JIT failed"
  return PtxasReport(
      status=status, registers=registers,
      stack_bytes=int(frame.group(1)) if frame else None,
      spill_store_bytes=int(frame.group(2)) if frame else None,
      spill_load_bytes=int(frame.group(3)) if frame else None,
      static_smem_bytes=_int(r"(\d+) bytes smem", output),
      dynamic_smem_bytes=dynamic_smem_bytes if dynamic_smem_bytes >= 0 else None,
      threads=_int(r"\.maxntid (\d+)", output), messages=tuple(sorted(messages)))


def tool_version(tool: str) -> str:
  """'path: release X, VY' of a CUDA command-line tool."""
  version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
  found = re.search(r"release [^\n]*", version)
  return f"{tool}: {found.group(0) if found else version.strip()}"


def kernel_revision() -> str:
  """The last commit that changed the kernels, with "+ uncommitted changes" when they differ."""
  root = Path(__file__).resolve().parents[1]
  git = ["git", "-C", str(root)]
  commit = subprocess.run([*git, "log", "-1", "--format=%h", "--", "pallas_kernels"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
  dirty = subprocess.run([*git, "status", "--porcelain", "pallas_kernels"], capture_output=True,
                         text=True).stdout.strip()
  return commit + (" + uncommitted changes" if dirty else "")


def _cell(value: int | None) -> str:
  return "-" if value is None else str(value)


COLUMNS = (f"{'layer':<22} {'M':>5} {'K':>6} {'N':>6}  {'kernel':<8} {'config':<36} "
           f"{'regs':>4} {'stack':>5} {'spill st/ld':>11} {'LDL/STL':>7} {'SMEM':>7} "
           f"{'CTA/SM':>6}  status  notes")


def _row_start(case: KernelCase, kernel: str, config: str) -> str:
  return f"{case.label:<22} {case.m:>5} {case.k:>6} {case.n:>6}  {kernel:<8} {config:<36} "


def _message_code(message: str) -> str:
  """A short name for a ptxas message in the table: its C-number, or "spill"/"warn"."""
  found = re.match(r"\((C\d+)\)", message)
  if found:
    return found.group(1)
  return "spill" if "spilled" in message else "warn"


def compile_cases(cases: list[KernelCase], compiler: MosaicCompiler) -> list[CaseResult]:
  """Lowers each case and compiles both of its kernels; a kernel whose configuration, shape, rank
  and input dtype were already compiled is not compiled again. A case the lowering rejects (e.g.
  for its shared memory) is a result with `rejected` set, not an error."""
  results: list[CaseResult] = []
  compiled: dict[tuple, PtxasReport] = {}
  for case in cases:
    try:
      modules = lower_modules(case)
    except Exception as error:
      reason = re.sub(r"\w+Config\([^)]*\)", "config", str(error).strip().splitlines()[0])
      results.append(CaseResult(case, {}, reason.split(";")[0]))
      continue
    if len(modules) != len(KERNELS):
      raise SystemExit(f"kernel_resources: expected {len(KERNELS)} Mosaic GPU kernels in "
                       f"svdq_linear for {case}, found {len(modules)}")
    reports = {}
    for kernel, module in zip(KERNELS, modules, strict=True):
      key = (kernel, case.m, case.k, case.n, case.act_shift, case.rank, case.x_dtype,
             getattr(case.config, kernel))
      if key not in compiled:
        compiled[key] = compiler.compile(module)
      reports[kernel] = compiled[key]
    results.append(CaseResult(case, reports))
  return results


def load_cases(path: Path) -> list[KernelCase]:
  """The cases of a JSON file: a list of objects in `dataclasses.asdict(KernelCase)`'s layout
  (label, m, k, n, act_shift, rank, x_dtype and config, which holds the fields of QuantizeConfig
  under "quantize" and of GemmConfig under "gemm"); rank and x_dtype may be left out (RANK,
  "bfloat16")."""
  try:
    specs = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise SystemExit(f"kernel_resources: cannot read the cases of {path}: {error}") from None
  cases = []
  for index, spec in enumerate(specs):
    try:
      fields = dict(spec)
      config = fields.pop("config")
      config = SVDQLinearConfig(quantize=QuantizeConfig(**config["quantize"]),
                                gemm=GemmConfig(**config["gemm"]))
      cases.append(KernelCase(config=config, **fields))
    except (KeyError, TypeError, ValueError) as error:
      raise SystemExit(f"kernel_resources: case {index} of {path} is not a KernelCase in "
                       f"dataclasses.asdict's layout: {error!r}") from None
  return cases


def json_records(results: list[CaseResult]) -> list[dict]:
  """One JSON object per kernel of each case: the case's label, shape and rank, the kernel's
  name in KERNELS, the PtxasReport fields and its smem_bytes and ctas_per_sm; a rejected case
  gives one object with kernel "both" and the status "lowering rejected: <reason>"."""
  records = []
  for result in results:
    case = result.case
    head = {"label": case.label, "m": case.m, "k": case.k, "n": case.n, "rank": case.rank}
    if result.rejected is not None:
      records.append({**head, "kernel": "both", "status": f"lowering rejected: {result.rejected}"})
    for kernel, report in result.reports.items():
      records.append({**head, "kernel": kernel, **dataclasses.asdict(report),
                      "smem_bytes": report.smem_bytes, "ctas_per_sm": report.ctas_per_sm()})
  return records


def resource_rows(results: list[CaseResult], notes: dict[str, str]) -> list[str]:
  """One table row per kernel of each case (a kernel already listed under the same label is not
  repeated); `notes` collects the text of each ptxas message code."""
  rows: list[str] = []
  listed: set[tuple] = set()
  for result in results:
    case = result.case
    configs = {"quantize": describe_quantize(case.config.quantize),
               "gemm": describe_gemm(case.config.gemm)}
    if result.rejected is not None:
      rows.append(_row_start(case, "both", configs["gemm"]) +
                  f"lowering rejected: {result.rejected}")
      continue
    for kernel, report in result.reports.items():
      key = (case.label, kernel, case.m, case.k, case.n, case.act_shift, configs[kernel])
      if key in listed:
        continue
      listed.add(key)
      codes = []
      for message in report.messages:
        codes.append(_message_code(message))
        notes.setdefault(codes[-1], message)
      spills = f"{_cell(report.spill_store_bytes)}/{_cell(report.spill_load_bytes)}"
      local = f"{_cell(report.local_loads)}/{_cell(report.local_stores)}"
      row = (_row_start(case, kernel, configs[kernel]) +
             f"{_cell(report.registers):>4} {_cell(report.stack_bytes):>5} {spills:>11} {local:>7} "
             f"{_cell(report.smem_bytes):>7} {_cell(report.ctas_per_sm()):>6}  {report.status}  "
             + ",".join(codes))
      rows.append(row.rstrip())
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--plugin-site", type=Path,
                      help="site-packages holding jax-cuda13-plugin and jax-cuda13-pjrt "
                           "(default: this interpreter's)")
  parser.add_argument("--nvdisasm", default=shutil.which("nvdisasm"),
                      help="nvdisasm to count the SASS local loads and stores with (default: the "
                           "one on PATH; without it the LDL/STL column is '-')")
  parser.add_argument("--output", type=Path, help="also write the table to this file")
  parser.add_argument("--cases", type=Path,
                      help="compile only the cases of this JSON file (a list of KernelCase in "
                           "dataclasses.asdict's layout, see load_cases) instead of the FLUX.1 "
                           "layers and the sweep")
  parser.add_argument("--json", type=Path,
                      help="also write one JSON object per compiled kernel to this file "
                           "(json_records)")
  args = parser.parse_args(argv)
  m, k, n = SWEEP_SHAPE
  if args.cases:
    sections = [(f"Cases of {args.cases}", load_cases(args.cases))]
  else:
    sections = [
        ("FLUX.1 layers (1024 x 1024), configurations chosen by select_config", flux_cases()),
        (f"Alternatives at M={m} K={k} N={n} (variants of the selected configuration)",
         sweep_cases())]
  ranks = ", ".join(str(rank) for rank in sorted({c.rank for _, cases in sections for c in cases}))
  ptxas = shutil.which("ptxas")
  if ptxas is None:
    raise SystemExit("kernel_resources: no ptxas on PATH (the plugin runs the first one found)")

  lines = [
      "# ptxas output, no GPU run: the Mosaic GPU modules of svdq_linear, lowered for an abstract",
      f"# H100, compiled by jaxlib's CUDA plugin (MosaicGpuCompile, jax {jax.__version__}) over a "
      "stand-in driver",
      f"# that reports sm_90 (target sm_90a); {tool_version(ptxas)}",
      "# SASS: " + (tool_version(args.nvdisasm) if args.nvdisasm else "no nvdisasm, not read"),
      "# regs: per thread; stack, spill st/ld: bytes per thread (local memory); LDL/STL: local",
      "# load/store instructions in the SASS; SMEM: bytes per CTA, dynamic (launch) + static;",
      "# CTA/SM: the H100 occupancy those allow.",
      f"# quantize = kernel 1, gemm = kernel 2; rank {ranks}, bf16 activations and output.",
      f"# pallas_kernels/svdq_linear at {kernel_revision()}.",
  ]
  notes: dict[str, str] = {}
  results: list[CaseResult] = []
  with tempfile.TemporaryDirectory(prefix="kernel_resources_") as workdir:
    compiler = MosaicCompiler(args.plugin_site, Path(workdir), args.nvdisasm)
    for title, cases in sections:
      section = compile_cases(cases, compiler)
      results += section
      lines += ["", f"## {title}", COLUMNS, "-" * len(COLUMNS)]
      lines += resource_rows(section, notes)
  lines += ["", "# ptxas messages (notes column):"]
  lines += [f"#   {code}: {message}" for code, message in sorted(notes.items())]
  text = "\n".join(lines)
  print(text)
  if args.output:
    args.output.write_text(text + "\n")
  if args.json:
    args.json.write_text(json.dumps(json_records(results), indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The Mosaic GPU kernels of the fused SVDQuant linear against the jnp references: interpreted on
CPU (natively on a Hopper GPU), and lowered for an abstract H100 (deviceless) to catch layout,
swizzle and shared-memory errors that the interpreter does not check."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.svdq_linear import (
    GemmConfig,
    QuantizeConfig,
    SVDQLinearConfig,
    is_supported,
    quantize_activations,
    quantize_activations_reference,
    select_config,
    svdq_linear,
    svdq_linear_reference,
    w4a4_gemm,
    w4a4_gemm_reference,
)
from pallas_kernels.svdq_linear.config import (
    ACCUMULATOR_REGISTER_BUDGET,
    H100_SMEM_BYTES,
    gemm_accumulator_registers,
    gemm_smem_bytes,
    padded_rank,
)

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
SHIFT = 0.171875
ON_HOPPER = is_supported()
INTERPRET = not ON_HOPPER  # the same tests run the compiled kernels when a Hopper GPU is present
SMALL = SVDQLinearConfig(QuantizeConfig(64, 2), GemmConfig(64, 128))


@pytest.fixture(autouse=True)
def _reset_interpreter():
  """After a failure inside an interpreted kernel the interpreter's global state must be reset."""
  yield
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

  interpret_pallas_call.reset_gpu_interpret_mode_state()


def _linear_operands(rng, lead, k, n, rank, *, bias=True, act_shift=0.0,
                     x_dtype=ml_dtypes.bfloat16):
  x = rng.standard_normal((*lead, k)).astype(x_dtype)
  if act_shift:
    x = np.maximum(x, -act_shift).astype(x_dtype)
  return dict(
      x=jnp.asarray(x),
      qweight=jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
      wscales=jnp.asarray(rng.uniform(0.005, 0.02, (k // 64, n)), jnp.bfloat16),
      smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
      lora_down=jnp.asarray(rng.standard_normal((k, rank)) * 0.1, jnp.bfloat16),
      lora_up=jnp.asarray(rng.standard_normal((rank, n)) * 0.1, jnp.bfloat16),
      bias=jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None,
  )


def _assert_within_bf16_rounding(got, want):
  """Both sides are roundings of f32 values that agree to ~1e-6: at most one bf16 ulp apart."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6 * np.abs(want).max())


def _assert_fused_close(got, ops, act_shift):
  """The fused op must agree with the reference to bf16 output rounding, up to the low-rank
  activations' error: f32 summation order plus the hi/lo bf16 split (< 2^-16 relative each),
  bounded here by 2^-14 * |x @ lora_down| @ |lora_up|."""
  want = svdq_linear_reference(**ops, act_shift=act_shift, out_dtype=jnp.float32)
  k = ops["x"].shape[-1]
  _, _, lora_act = quantize_activations_reference(
      ops["x"].reshape(-1, k), ops["smooth"], ops["lora_down"], act_shift=act_shift)
  low_rank_err = (np.abs(np.asarray(lora_act)) * 2**-14) @ np.abs(
      np.asarray(ops["lora_up"], np.float32))
  relative = 2**-7 if got.dtype == jnp.bfloat16 else 1e-5
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  output_rounding = relative * np.abs(want) + 1e-6 * np.abs(want).max()
  err = np.abs(got - want)
  assert np.all(err <= output_rounding + low_rank_err.reshape(want.shape)), float(np.max(err))


# ---------------------------------------------------------------- kernel 1, interpreted


@pytest.mark.parametrize(
    "m,k,rank,act_shift,config,x_dtype",
    [
        (64, 128, 32, 0.0, QuantizeConfig(block_m=64), ml_dtypes.bfloat16),
        (100, 256, 16, SHIFT, QuantizeConfig(block_m=64, k_splits=2),  # ragged M, split K
         ml_dtypes.bfloat16),
        (130, 192, 20, 0.0, QuantizeConfig(block_m=128, k_splits=2),   # K pad, rank pad
         ml_dtypes.bfloat16),
        (100, 256, 32, SHIFT, QuantizeConfig(block_m=64, k_splits=2), np.float32),  # f32 x
        (64, 128, 0, 0.0, QuantizeConfig(block_m=64), np.float32),     # f32 x, no low rank
    ],
)
def test_quantize_kernel_matches_reference(np_rng, m, k, rank, act_shift, config, x_dtype):
  ops = _linear_operands(np_rng, (m,), k, 64, rank, act_shift=act_shift, x_dtype=x_dtype)
  ops["x"] = ops["x"].at[1, :64].set(-act_shift)  # a group that quantizes to scale 0
  codes, ascales, lora_act = quantize_activations(
      ops["x"], ops["smooth"], ops["lora_down"], act_shift=act_shift, interpret=INTERPRET,
      config=config)
  ref_codes, ref_ascales, ref_lora = quantize_activations_reference(
      ops["x"], ops["smooth"], ops["lora_down"], act_shift=act_shift)
  assert codes.shape == (m, k // 2) and codes.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref_codes))
  np.testing.assert_array_equal(np.asarray(ascales), np.asarray(ref_ascales))
  assert float(ascales[1, 0]) == 0.0
  np.testing.assert_allclose(np.asarray(lora_act), np.asarray(ref_lora), rtol=1e-5, atol=1e-5)
  if x_dtype == np.float32:
    # The kernel quantized the f32 values themselves: rounding x to bf16 first gives other codes.
    rounded_codes, _, _ = quantize_activations_reference(
        ops["x"].astype(jnp.bfloat16), ops["smooth"], ops["lora_down"], act_shift=act_shift)
    assert np.any(np.asarray(codes) != np.asarray(rounded_codes))


@pytest.mark.skipif(ON_HOPPER, reason="race detection is a feature of the CPU interpreter")
def test_kernels_have_no_smem_races(np_rng):
  """The interpreter's race detector sees every SMEM access of both kernels (TMA, wgmma, regs)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

  params = plgpu.InterpretGPUParams(detect_races=True)
  ops = _linear_operands(np_rng, (64,), 256, 128, 16)
  quantized = quantize_activations(ops["x"], ops["smooth"], ops["lora_down"], interpret=params,
                                   config=SMALL.quantize)
  jax.block_until_ready(quantized)
  assert not interpret_pallas_call.get_races().races_found
  for config in (SMALL.gemm, GemmConfig(64, 128, manual_barriers=True)):
    y = w4a4_gemm(*quantized[:2], ops["qweight"], ops["wscales"], quantized[2], ops["lora_up"],
                  ops["bias"], interpret=params, config=config)
    jax.block_until_ready(y)
    assert not interpret_pallas_call.get_races().races_found, config


# ---------------------------------------------------------------- kernel 2, interpreted


def _gemm_operands(rng, m, k, n, rank, unsigned):
  groups = k // 64
  return dict(
      codes=jnp.asarray(rng.integers(0, 256, (m, k // 2)), jnp.uint8),
      ascales=jnp.asarray(rng.uniform(0.01, 0.05, (m, groups)), jnp.float32),
      qweight=jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
      wscales=jnp.asarray(rng.uniform(0.01, 0.05, (groups, n)), jnp.bfloat16),
      lora_act=jnp.asarray(rng.standard_normal((m, rank)), jnp.float32),
      lora_up=jnp.asarray(rng.standard_normal((rank, n)) * 0.1, jnp.bfloat16),
      bias=jnp.asarray(rng.standard_normal(n), jnp.float32),
  )


@pytest.mark.parametrize(
    "m,k,n,rank,unsigned,apply_gelu,out_dtype,config",
    [
        (64, 128, 128, 32, False, False, jnp.bfloat16,
         GemmConfig(64, 128, magic_int_to_float=False)),
        (100, 192, 192, 16, True, False, jnp.bfloat16, GemmConfig(64, 128)),   # ragged M, N
        (70, 128, 64, 32, False, True, jnp.float32,
         GemmConfig(128, 64, groups_per_step=1, carrier="e4m3")),
        (64, 256, 128, 16, True, True, jnp.bfloat16,
         GemmConfig(64, 128, 3, groups_per_step=4, carrier="e4m3")),
        (64, 512, 128, 16, False, False, jnp.float32,
         GemmConfig(64, 128, 3, groups_per_step=1, manual_barriers=True)),
    ],
)
def test_gemm_kernel_matches_reference(np_rng, m, k, n, rank, unsigned, apply_gelu, out_dtype,
                                       config):
  ops = _gemm_operands(np_rng, m, k, n, rank, unsigned)
  y = w4a4_gemm(**ops, act_shift=SHIFT if unsigned else 0.0, apply_gelu=apply_gelu,
                out_dtype=out_dtype, interpret=INTERPRET, config=config)
  ref = w4a4_gemm_reference(**ops, unsigned_acts=unsigned, apply_gelu=apply_gelu,
                            out_dtype=jnp.float32)
  assert y.shape == (m, n) and y.dtype == out_dtype
  if out_dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
  else:
    _assert_within_bf16_rounding(y, ref)


def test_gemm_integer_part_is_exact(np_rng):
  """With unit scales, no low-rank term and no bias the f32 output is the exact integer sum."""
  m, k, n = 64, 256, 64
  ops = _gemm_operands(np_rng, m, k, n, 16, False)
  ops.update(ascales=jnp.ones_like(ops["ascales"]), wscales=jnp.ones_like(ops["wscales"]),
             lora_act=jnp.zeros_like(ops["lora_act"]), bias=None)
  y = w4a4_gemm(**ops, out_dtype=jnp.float32, interpret=INTERPRET, config=GemmConfig(64, 64))
  ref = w4a4_gemm_reference(**ops, out_dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
  assert np.all(np.asarray(y) == np.round(np.asarray(y)))


# ---------------------------------------------------------------- the fused op, interpreted


@pytest.mark.parametrize(
    "lead,k,n,rank,act_shift,bias,out_dtype",
    [
        ((2, 37), 256, 192, 32, 0.0, True, None),            # batch dims, ragged M and N
        ((50,), 192, 128, 16, SHIFT, False, jnp.float32),     # K = 3 groups, shifted codes
        ((70,), 128, 64, 0, 0.0, True, jnp.float32),          # rank 0: plain W4A4
        ((1,), 64, 64, 8, 0.0, False, None),                  # one token, one group, rank 8
    ],
)
def test_svdq_linear_matches_reference_under_jit(np_rng, lead, k, n, rank, act_shift, bias,
                                                 out_dtype):
  ops = _linear_operands(np_rng, lead, k, n, rank, bias=bias, act_shift=act_shift)
  run = jax.jit(functools.partial(svdq_linear, act_shift=act_shift, out_dtype=out_dtype,
                                  interpret=INTERPRET, config=SMALL))
  y = run(**ops)
  assert y.shape == (*lead, n) and y.dtype == (out_dtype or jnp.bfloat16)
  _assert_fused_close(y, ops, act_shift)


def test_svdq_linear_reads_float32_input_as_float32(np_rng):
  """An f32 x is quantized from its own values (the reference quantizes f32, not bf16(x)) and its
  low-rank product keeps about 16 bits of x; the output is f32."""
  ops = _linear_operands(np_rng, (33,), 128, 128, 32, act_shift=SHIFT, x_dtype=np.float32)
  y = svdq_linear(**ops, act_shift=SHIFT, interpret=INTERPRET, config=SMALL)
  assert y.dtype == jnp.float32
  _assert_fused_close(y, ops, SHIFT)


def test_svdq_linear_with_zero_tokens(np_rng):
  ops = _linear_operands(np_rng, (0,), 128, 64, 16)
  y = svdq_linear(**ops, interpret=INTERPRET, config=SMALL)
  assert y.shape == (0, 64) and y.dtype == jnp.bfloat16


def test_svdq_linear_under_shard_map(np_rng):
  """Batch-sharded data parallelism over the local devices (interpreted on CPU)."""
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  ops = _linear_operands(np_rng, (2 * len(jax.devices()), 20), 128, 128, 16)
  weights = [ops[name] for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up",
                                    "bias")]
  sharded = jax.jit(jax.shard_map(
      lambda x, *w: svdq_linear(x, *w, interpret=INTERPRET, config=SMALL), mesh=mesh,
      in_specs=(P("data"),) + (P(),) * 6, out_specs=P("data")))
  x = jax.device_put(ops["x"], NamedSharding(mesh, P("data")))
  weights = [jax.device_put(w, NamedSharding(mesh, P())) for w in weights]
  y = sharded(x, *weights)
  assert y.shape == ops["x"].shape[:-1] + (128,)
  _assert_fused_close(y, ops, 0.0)


# ---------------------------------------------------------------- deviceless lowering (sm_90)


def _lower_for_h100(fn, *args, mesh_shape=(), axis_names=()):
  mesh = jax.sharding.AbstractMesh(mesh_shape, axis_names, abstract_device=H100)
  structs = [a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(a.shape, a.dtype)
             for a in args]
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("act_shift,x_dtype", [(0.0, ml_dtypes.bfloat16), (SHIFT, np.float32)])
def test_quantize_kernel_lowers_for_h100(np_rng, act_shift, x_dtype):
  ops = _linear_operands(np_rng, (256,), 512, 64, 32, x_dtype=x_dtype)
  text = _lower_for_h100(
      functools.partial(quantize_activations, act_shift=act_shift,
                        config=QuantizeConfig(block_m=128, k_splits=2, max_concurrent_steps=3)),
      ops["x"], ops["smooth"], ops["lora_down"])
  assert "mosaic_gpu" in text


@pytest.mark.parametrize(
    "carrier,unsigned,apply_gelu,out_dtype,block_m,block_n,manual_barriers",
    [
        ("s8", False, False, jnp.bfloat16, 128, 256, False),
        ("s8", True, True, jnp.float32, 64, 128, False),
        ("e4m3", False, True, jnp.bfloat16, 128, 128, False),
        ("e4m3", True, False, jnp.float16, 64, 256, False),
        ("s8", False, True, jnp.bfloat16, 64, 256, True),
        ("e4m3", True, False, jnp.bfloat16, 128, 128, True),
    ],
)
def test_gemm_kernel_lowers_for_h100(np_rng, carrier, unsigned, apply_gelu, out_dtype, block_m,
                                     block_n, manual_barriers):
  ops = _gemm_operands(np_rng, 256, 512, 512, 32, unsigned)
  config = GemmConfig(block_m, block_n, max_concurrent_steps=2, carrier=carrier,
                      manual_barriers=manual_barriers)
  assert gemm_smem_bytes(config) <= H100_SMEM_BYTES
  text = _lower_for_h100(
      lambda *a: w4a4_gemm(*a, act_shift=SHIFT if unsigned else 0.0, apply_gelu=apply_gelu,
                           out_dtype=out_dtype, config=config),
      *ops.values())
  assert "mosaic_gpu" in text


def _after_dialect_lowering(monkeypatch, fn, *args):
  """`fn` lowered for an H100 down to the instructions Mosaic GPU hands to LLVM (after its dialect
  lowering, which is where the automatic barriers are inserted), as text; one kernel only."""
  from jax.experimental.mosaic.gpu import dialect_lowering

  modules = []
  lower = dialect_lowering.lower_mgpu_dialect

  def lower_and_keep(module, *lower_args, **lower_kwargs):
    lower(module, *lower_args, **lower_kwargs)
    modules.append(str(module))

  monkeypatch.setattr(dialect_lowering, "lower_mgpu_dialect", lower_and_keep)
  _lower_for_h100(fn, *args)
  [text] = modules
  return text


def _gemm_main_loop_after_dialect_lowering(monkeypatch, config):
  """Kernel 2's K loop body after dialect lowering, from its start to its last wgmma wait."""
  ops = _gemm_operands(np.random.default_rng(0), 64, 512, 128, 16, False)
  text = _after_dialect_lowering(
      monkeypatch, lambda *a: w4a4_gemm(*a, config=config), *ops.values())
  first_wgmma = text.index("wgmma.mma_async")
  loop_start = text.rindex("scf.for", 0, first_wgmma)
  return text[loop_start:text.index("wgmma.wait_group.sync.aligned 0;", first_wgmma)]


SMEM_STORE = re.compile(r"llvm\.store .*!llvm\.ptr<3>")
WARPGROUP_BARRIER = "bar.sync $0, 128;"


def test_gemm_carrier_stores_wait_for_every_threads_wgmmas_with_auto_barriers(monkeypatch):
  """Each step stores the widened tiles into a_s/b_s, which the previous step's wgmmas of all four
  warps read; a thread's wgmma wait covers only its own share. With one carrier slot the next
  step's stores are safe only behind a warpgroup barrier, which Pallas's automatic barriers put
  before every SMEM store: the loop body must start with one before its first store (every thread
  reaches it only after the previous iteration's `wait_group 0`). Checked on the instruction
  order the lowering emits, not on a run: the interpreter cannot see intra-warpgroup timing."""
  body = _gemm_main_loop_after_dialect_lowering(monkeypatch, GemmConfig(64, 128))
  first_store = SMEM_STORE.search(body).start()
  assert WARPGROUP_BARRIER in body[:first_store]


def test_gemm_manual_barriers_double_buffer_the_carrier_tiles(monkeypatch):
  """Without automatic barriers the step's commit_smem must be its only barrier, so a step's stores
  may start while other warps still run the previous step's wgmmas: they must go to the other
  carrier slot. Checks the instruction order (no barrier before the stores, one between the stores
  and the wgmmas) and, in the kernel's jaxpr, that the carrier refs have two slots and every
  store into them is indexed by (pipeline step) mod 2. Like the test above it inspects the
  program, it cannot observe the race itself."""
  config = GemmConfig(64, 128, manual_barriers=True)
  body = _gemm_main_loop_after_dialect_lowering(monkeypatch, config)
  stores = [match.start() for match in SMEM_STORE.finditer(body)]
  first_wgmma = body.index("wgmma.mma_async")
  assert stores and stores[-1] < first_wgmma
  assert WARPGROUP_BARRIER not in body[:stores[0]]
  assert body.count(WARPGROUP_BARRIER, stores[-1], first_wgmma) == 1
  assert body.count(WARPGROUP_BARRIER) == 1

  ops = _gemm_operands(np.random.default_rng(0), 64, 256, 128, 16, False)
  jaxpr = str(jax.make_jaxpr(lambda *a: w4a4_gemm(*a, config=config, interpret=True))(
      *ops.values()))
  carrier_stores = re.findall(r":i8\[(?:64|128),64\], \w+(?:\{[^}]*\})*\[(\w+),:,:,:\]", jaxpr)
  assert len(carrier_stores) == 2 * config.groups_per_step  # a and b tile of each group
  for slot in carrier_stores:
    assert re.search(rf"\b{slot}:i32\[\] = rem \w+ 2:i32\[\]", jaxpr), slot


def test_quantize_kernel_refills_the_x_tile_after_every_threads_wgmma(monkeypatch, np_rng):
  """Kernel 1's x tile is read by the x @ lora_down wgmma of all four warps and then refilled by a
  TMA copy that one thread issues: each refill after the step's wgmma wait must come after a
  warpgroup barrier (Pallas's automatic one before every TMA copy). Checked on the lowered
  instruction order, as for kernel 2."""
  ops = _linear_operands(np_rng, (64,), 512, 64, 32)
  text = _after_dialect_lowering(
      monkeypatch, functools.partial(quantize_activations, config=QuantizeConfig(64, 1, 2)),
      ops["x"], ops["smooth"], ops["lora_down"])
  wait = text.index("wgmma.wait_group.sync.aligned 0;", text.index("wgmma.mma_async"))
  refills = [match.start() for match in re.finditer(r"cp\.async\.bulk\.tensor\.shared", text)
             if match.start() > wait]
  assert refills
  previous = wait
  for refill in refills:
    assert WARPGROUP_BARRIER in text[previous:refill]
    previous = refill


@pytest.mark.parametrize("config,rank,out_dtype", [
    (GemmConfig(64, 128, 4), 32, jnp.bfloat16),
    (GemmConfig(64, 128, 2, manual_barriers=True), 64, jnp.float32),
    (GemmConfig(128, 256, 2, groups_per_step=1), 16, jnp.bfloat16),
    (GemmConfig(64, 128, 2, groups_per_step=1), 192, jnp.bfloat16),
    (GemmConfig(64, 128, 3), 32, jnp.bfloat16),
    (GemmConfig(64, 64, 3, groups_per_step=4), 0, jnp.float32),
])
def test_gemm_smem_bytes_matches_the_lowering(monkeypatch, config, rank, out_dtype):
  """gemm_smem_bytes is the dynamic shared memory the lowering allocates, to the byte (each buffer
  starts at a 1 KiB boundary; one mbarrier per stage and the epilogue's)."""
  ops = _gemm_operands(np.random.default_rng(0), 128, 1024, 256, rank, False)
  text = _after_dialect_lowering(
      monkeypatch, lambda *a: w4a4_gemm(*a, config=config, out_dtype=out_dtype), *ops.values())
  [allocated] = re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", text)
  counted = gemm_smem_bytes(config, 2 * padded_rank(rank), jnp.dtype(out_dtype).itemsize)
  assert int(allocated) == counted


def test_rank_beyond_kernel_2_shared_memory_is_a_clear_error():
  """Rank 192 fits with the default tiles; 224 and 256 (kernel 1 takes up to 256) do not."""
  m, k, n = 256, 512, 256

  def lower(rank):
    shapes = [((m, k), jnp.bfloat16), ((n, k // 2), jnp.uint8), ((k // 64, n), jnp.bfloat16),
              ((k,), jnp.float32), ((k, rank), jnp.bfloat16), ((rank, n), jnp.bfloat16),
              ((n,), jnp.float32)]
    return _lower_for_h100(svdq_linear, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])

  assert lower(192).count("mosaic_gpu") >= 2
  for rank in (224, 256):
    with pytest.raises(ValueError, match=r"w4a4_gemm_kernel: .* shared memory, more than the"):
      lower(rank)


def test_gemm_rescales_each_group_while_later_wgmmas_run(np_rng):
  """The interpreter cannot see this: reading a group accumulator with `acc[...]` waits for all
  pending wgmmas, so group g must be loaded with wait_n = (groups after g) to overlap them."""
  ops = _gemm_operands(np_rng, 64, 256, 128, 16, False)
  jaxpr = str(jax.make_jaxpr(
      lambda *a: w4a4_gemm(*a, config=GemmConfig(64, 128, groups_per_step=4),
                           interpret=INTERPRET))(*ops.values()))
  waits = set(re.findall(r"wgmma_accumulator_deref_p\[wait_n=(\d+)\]", jaxpr))
  assert {"3", "2", "1", "0"} <= waits


@pytest.mark.parametrize(
    "m,k,n,rank", [(4096, 3072, 12288, 32), (256, 15360, 3072, 32), (1000, 3072, 3072, 0)])
def test_svdq_linear_lowers_for_flux_shapes(m, k, n, rank):
  """Default configs at FLUX.1 shapes (incl. ragged tokens) fit the H100's SMEM and lower."""
  shapes = [((m, k), jnp.bfloat16), ((n, k // 2), jnp.uint8), ((k // 64, n), jnp.bfloat16),
            ((k,), jnp.float32), ((k, rank), jnp.bfloat16), ((rank, n), jnp.bfloat16),
            ((n,), jnp.float32)]
  structs = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  text = _lower_for_h100(lambda *a: svdq_linear(*a, apply_gelu=True), *structs)
  assert text.count("mosaic_gpu") >= 2


@pytest.mark.parametrize("rank", [40, 48])
def test_svdq_linear_lowers_with_ranks_off_the_swizzle_widths(rank):
  """The stacked hi/lo low-rank operand (block, 2 * rank) bf16 must span 64 bytes or a multiple of
  128 for its SMEM swizzle; the wrapper pads the rank so that it does."""
  m, k, n = 256, 512, 256
  shapes = [((m, k), jnp.bfloat16), ((n, k // 2), jnp.uint8), ((k // 64, n), jnp.bfloat16),
            ((k,), jnp.float32), ((k, rank), jnp.bfloat16), ((rank, n), jnp.bfloat16),
            ((n,), jnp.float32)]
  text = _lower_for_h100(svdq_linear, *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
  assert text.count("mosaic_gpu") >= 2


def test_svdq_linear_lowers_inside_shard_map_on_two_h100s():
  mesh = jax.sharding.AbstractMesh((2,), ("data",), abstract_device=H100)
  k, n, rank = 256, 256, 32

  def struct(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  structs = [struct((4, 100, k), jnp.bfloat16, P("data")),
             struct((n, k // 2), jnp.uint8, P()), struct((k // 64, n), jnp.bfloat16, P()),
             struct((k,), jnp.float32, P()), struct((k, rank), jnp.bfloat16, P()),
             struct((rank, n), jnp.bfloat16, P()), struct((n,), jnp.float32, P())]
  sharded = jax.shard_map(lambda x, *w: svdq_linear(x, *w), mesh=mesh,
                          in_specs=(P("data"),) + (P(),) * 6, out_specs=P("data"))
  text = _lower_for_h100(sharded, *structs, mesh_shape=(2,), axis_names=("data",))
  assert "mosaic_gpu" in text


# ---------------------------------------------------------------- contract and errors


def test_is_supported_matches_the_platform():
  device = jax.devices()[0]
  hopper = device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"
  assert is_supported() == hopper


def test_select_config_gives_valid_tiles_for_flux_shapes():
  for m in (1, 256, 1024, 4096):
    for k, n in ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)):
      config = select_config(m, k, n)
      assert (k // 64) % config.quantize.k_splits == 0
      assert n % config.gemm.block_n == 0
      assert gemm_smem_bytes(config.gemm) <= H100_SMEM_BYTES
      # One warpgroup holds the carry and the group accumulators: within CUDA's 255 registers
      # per thread, with room left for everything else (else the tile spills on the GPU).
      assert gemm_accumulator_registers(config.gemm) <= ACCUMULATOR_REGISTER_BUDGET < 255


@pytest.mark.parametrize("rank", [16, 32, 64, 128])
def test_select_config_keeps_two_ctas_per_sm_for_many_tokens(rank):
  """Large M gets the deepest pipeline with which two CTAs of kernel 2 share an SM's 228 KiB
  (ranks up to 32); where even two stages leave room for one CTA only, two stages."""
  def two_ctas_fit(gemm):
    per_cta = gemm_smem_bytes(gemm, 2 * padded_rank(rank)) + 1024  # the per-CTA reservation
    return 2 * per_cta <= 228 * 1024

  for k, n in ((3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)):
    gemm = select_config(4096, k, n, rank).gemm
    stages = {s: dataclasses.replace(gemm, max_concurrent_steps=s) for s in (2, 3, 4)}
    if rank <= 32:
      assert two_ctas_fit(gemm) and gemm.max_concurrent_steps >= 3, (k, n, gemm)
    else:
      assert not two_ctas_fit(stages[2]) and gemm.max_concurrent_steps == 2, (k, n, gemm)
    if gemm.max_concurrent_steps < 4:
      assert not two_ctas_fit(stages[gemm.max_concurrent_steps + 1]), (k, n, gemm)
    assert select_config(256, k, n, rank).gemm.max_concurrent_steps == 2


def test_bad_inputs_raise_clear_errors(np_rng):
  ops = _linear_operands(np_rng, (8,), 128, 64, 16)
  wide = _linear_operands(np_rng, (8,), 128, 64, 264)
  with pytest.raises(ValueError, match="rank 264.*at most 256"):
    svdq_linear(**wide, interpret=INTERPRET)
  with pytest.raises(ValueError, match="group_size 64"):
    svdq_linear(**ops, group_size=16, interpret=INTERPRET)
  with pytest.raises(ValueError, match="wscales has shape"):
    svdq_linear(**{**ops, "wscales": ops["wscales"][:1]}, interpret=INTERPRET)
  with pytest.raises(ValueError, match="multiple of 64"):
    svdq_linear(ops["x"][:, :96], ops["qweight"][:, :48], ops["wscales"][:1], ops["smooth"][:96],
                ops["lora_down"][:96], ops["lora_up"], ops["bias"], interpret=INTERPRET)
  with pytest.raises(ValueError, match="uint8"):
    svdq_linear(**{**ops, "qweight": ops["qweight"].astype(jnp.int8)}, interpret=INTERPRET)
  with pytest.raises(ValueError, match="block_n"):
    GemmConfig(block_n=512)
  with pytest.raises(ValueError, match="carrier"):
    GemmConfig(carrier="int4")
  with pytest.raises(ValueError, match="groups_per_step"):
    GemmConfig(groups_per_step=3)
  with pytest.raises(ValueError, match="manual_barriers.*max_concurrent_steps >= 2"):
    GemmConfig(max_concurrent_steps=1, manual_barriers=True)

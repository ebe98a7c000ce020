"""convert.lora: LoRA files in the diffusers/PEFT, kohya and XLabs formats, against diffusers.

The reference is diffusers and peft: the PEFT files are written by peft's
`get_peft_model_state_dict` and diffusers' `save_lora_weights`; the kohya and XLabs files are
built here from the same factors by the naming rules of sd-scripts (BFL module names, "." -> "_",
`lora_down`/`lora_up`/`alpha`) and XLabs (`double_blocks.i.processor.qkv_lora1.down.weight`,
...), and each is checked to give, loaded by diffusers' own `FluxPipeline.load_lora_weights`,
the output of the peft model. Our output from every file must then match diffusers' (float
parameters, so the comparison is tight).
"""

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, PixArtTransformer2DModel
from diffusers.loaders.lora_conversion_utils import (
  _convert_non_diffusers_lora_to_diffusers,
  _maybe_map_sgm_blocks_to_diffusers,
)
from flax import nnx
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _flux_reference import TINY, make_inputs, perturb_, reference_forward  # noqa: E402

from convert.lora import (  # noqa: E402
  load_loras,
  lora_targets,
  parse_lora_spec,
  read_lora,
  write_lora,
)
from convert.safetensors_io import CheckpointError  # noqa: E402
from models.flux import FluxTransformer  # noqa: E402
from models.pixart import PixArtSigmaTransformer  # noqa: E402
from models.unet_sdxl import UNetSDXL, UNetSDXLConfig  # noqa: E402
from svdq_jax import QuantConfig, quantize_linear  # noqa: E402
from svdq_jax.errors import InputError  # noqa: E402
from svdq_jax.lora import LayerLoRA, apply_loras, kernel_shapes, linear_shapes  # noqa: E402
from svdq_jax.qlinear import xla_dot  # noqa: E402
from svdq_jax.tree import map_named_leaves, named_leaves  # noqa: E402

pytestmark = pytest.mark.parity
RANK, ALPHA = 4, 8.0
D = TINY["num_attention_heads"] * TINY["attention_head_dim"]
# The FLUX layers XLabs LoRAs cover: the double blocks' attention projections, the single blocks'
# q/k/v and output projection.
XLABS_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "proj_out"]


def _linear_names(model: torch.nn.Module) -> list[str]:
  return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def _peft_lora(base_state, targets, seed, alpha=ALPHA):
  """A FLUX transformer with a random (nonzero) peft LoRA on `targets`, and its LoRA factors."""
  torch.manual_seed(seed)
  model = FluxTransformer2DModel(**TINY).eval()
  model.load_state_dict(base_state)
  config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
  model.add_adapter(config)
  with torch.no_grad():  # peft's random init gives large B; keep the LoRA a perturbation
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.mul_(0.5)
  return model, config, get_peft_model_state_dict(model)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
  """The tiny base model (saved for ours), LoRA files in each format, and diffusers' outputs."""
  folder = tmp_path_factory.mktemp("lora_flux")
  torch.manual_seed(0)
  base = FluxTransformer2DModel(**TINY).eval()
  perturb_(base, 1)
  base.save_pretrained(folder / "transformer")
  base_state = {k: v.clone() for k, v in base.state_dict().items()}
  inputs = make_inputs(TINY)
  files, peft_out = {}, {}

  # diffusers/PEFT with alpha in the metadata (diffusers' save_lora_weights), on every linear.
  model, config, sd = _peft_lora(base_state, _linear_names(base), seed=2)
  FluxPipeline.save_lora_weights(folder / "peft", transformer_lora_layers=sd,
                                 transformer_lora_adapter_metadata=config.to_dict())
  files["peft"] = folder / "peft" / "pytorch_lora_weights.safetensors"
  peft_out["all"] = reference_forward(model, inputs)
  factors = {k.removesuffix(".lora_A.weight"): (v, sd[k.replace("lora_A", "lora_B")])
             for k, v in sd.items() if k.endswith("lora_A.weight")}
  scale = ALPHA / RANK

  # The same LoRA with one `.alpha` tensor per module and no metadata.
  alpha_sd = {f"transformer.{k}": v.contiguous() for k, v in sd.items()}
  alpha_sd |= {f"transformer.{m}.alpha": torch.tensor(ALPHA) for m in factors}
  save_file(alpha_sd, folder / "peft_alpha_keys.safetensors")
  files["peft_alpha_keys"] = folder / "peft_alpha_keys.safetensors"

  # kohya (sd-scripts' FLUX names): fused projections get the concatenated lora_down, a
  # block-diagonal lora_up and alpha times the number of parts (alpha / rank unchanged).
  def fused(parts, *, swap=False):
    downs = [factors[p][0] for p in parts]
    ups = [factors[p][1] for p in parts]
    down, up = torch.cat(downs), torch.block_diag(*ups)
    if swap:  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
      up = torch.cat([up[up.shape[0] // 2:], up[:up.shape[0] // 2]])
    return down, up, torch.tensor(ALPHA * len(parts))

  kohya = {}
  for i in range(TINY["num_layers"]):
    blk = f"transformer_blocks.{i}"
    names = {"img_attn_qkv": [f"{blk}.attn.to_{x}" for x in "qkv"],
             "img_attn_proj": [f"{blk}.attn.to_out.0"], "img_mlp_0": [f"{blk}.ff.net.0.proj"],
             "img_mlp_2": [f"{blk}.ff.net.2"], "img_mod_lin": [f"{blk}.norm1.linear"],
             "txt_attn_qkv": [f"{blk}.attn.add_{x}_proj" for x in "qkv"],
             "txt_attn_proj": [f"{blk}.attn.to_add_out"],
             "txt_mlp_0": [f"{blk}.ff_context.net.0.proj"],
             "txt_mlp_2": [f"{blk}.ff_context.net.2"],
             "txt_mod_lin": [f"{blk}.norm1_context.linear"]}
    kohya |= {f"double_blocks_{i}_{k}": fused(v) for k, v in names.items()}
  for i in range(TINY["num_single_layers"]):
    blk = f"single_transformer_blocks.{i}"
    kohya[f"single_blocks_{i}_linear1"] = fused(
        [f"{blk}.attn.to_{x}" for x in "qkv"] + [f"{blk}.proj_mlp"])
    kohya[f"single_blocks_{i}_linear2"] = fused([f"{blk}.proj_out"])
    kohya[f"single_blocks_{i}_modulation_lin"] = fused([f"{blk}.norm.linear"])
  for bfl, ours in (("img_in", "x_embedder"), ("txt_in", "context_embedder")):
    kohya[bfl] = fused([ours])
  for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                    ("guidance_in", "guidance_embedder")):
    kohya[f"{bfl}_in_layer"] = fused([f"time_text_embed.{ours}.linear_1"])
    kohya[f"{bfl}_out_layer"] = fused([f"time_text_embed.{ours}.linear_2"])
  # diffusers reads no alpha for the final layer: its scale is folded into lora_up (alpha = rank).
  for bfl, ours, swap in (("final_layer_linear", "proj_out", False),
                          ("final_layer_adaLN_modulation_1", "norm_out.linear", True)):
    down, up, _ = fused([ours], swap=swap)
    kohya[bfl] = (down, up * scale, torch.tensor(float(RANK)))
  kohya_sd = {f"lora_unet_{name}.{part}": t.contiguous()
              for name, (down, up, alpha) in kohya.items()
              for part, t in (("lora_down.weight", down), ("lora_up.weight", up), ("alpha", alpha))}
  save_file(kohya_sd, folder / "kohya.safetensors")
  files["kohya"] = folder / "kohya.safetensors"
  # What diffusers' kohya reader reads of it: the blocks without `linear1` (it splits linear1 by
  # FLUX.1's widths, 3072, ..., not the tiny model's; and it leaves the embedders' and the final
  # layer's LoRAs without the "transformer." prefix, so its loader drops them).
  save_file({k: v for k, v in kohya_sd.items()
             if "_blocks_" in k and "_linear1." not in k},
            folder / "kohya_blocks.safetensors")
  files["kohya_blocks"] = folder / "kohya_blocks.safetensors"

  # XLabs: its own LoRA on the layers XLabs covers; no alpha (scale folded into lora_up).
  targets = [n for n in _linear_names(base)
             if any(n.endswith(t) for t in XLABS_TARGETS) and "blocks." in n]
  model, _, sd = _peft_lora(base_state, targets, seed=3)
  peft_out["xlabs"] = reference_forward(model, inputs)
  x_factors = {k.removesuffix(".lora_A.weight"): (v, sd[k.replace("lora_A", "lora_B")] * scale)
               for k, v in sd.items() if k.endswith("lora_A.weight")}
  xlabs = {}

  def put(name, parts):
    """Fused parts as one module of rank 3 * RANK; a single part is padded to that rank with
    zero components (the same LoRA): diffusers scales a file without alpha by r_most_common / r,
    which for mixed ranks is not XLabs' rule (no alpha: no scaling)."""
    down = torch.cat([x_factors[p][0] for p in parts])
    up = torch.block_diag(*[x_factors[p][1] for p in parts])
    pad = 3 * RANK - down.shape[0]
    down = torch.cat([down, torch.zeros(pad, down.shape[1])])
    up = torch.cat([up, torch.zeros(up.shape[0], pad)], dim=1)
    xlabs[f"{name}.down.weight"], xlabs[f"{name}.up.weight"] = down.contiguous(), up.contiguous()

  for i in range(TINY["num_layers"]):
    blk, proc = f"transformer_blocks.{i}", f"double_blocks.{i}.processor"
    put(f"{proc}.qkv_lora1", [f"{blk}.attn.to_{x}" for x in "qkv"])
    put(f"{proc}.qkv_lora2", [f"{blk}.attn.add_{x}_proj" for x in "qkv"])
    put(f"{proc}.proj_lora1", [f"{blk}.attn.to_out.0"])
    put(f"{proc}.proj_lora2", [f"{blk}.attn.to_add_out"])
  for i in range(TINY["num_single_layers"]):
    blk, proc = f"single_transformer_blocks.{i}", f"single_blocks.{i}.processor"
    put(f"{proc}.qkv_lora", [f"{blk}.attn.to_{x}" for x in "qkv"])
    put(f"{proc}.proj_lora", [f"{blk}.proj_out"])
  save_file(xlabs, folder / "xlabs.safetensors")
  files["xlabs"] = folder / "xlabs.safetensors"

  # A second PEFT LoRA without alpha (scale 1), for two LoRAs at once.
  model, config, sd = _peft_lora(base_state, _linear_names(base), seed=4, alpha=RANK)
  save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()},
            folder / "second.safetensors")
  files["second"] = folder / "second.safetensors"
  peft_out["second"] = reference_forward(model, inputs)

  def diffusers_out(loras):
    """diffusers' output with `loras` = [(file, strength)], loaded by its FluxPipeline."""
    model = FluxTransformer2DModel(**TINY).eval()
    model.load_state_dict(base_state)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    names = []
    for i, (file, _) in enumerate(loras):
      pipe.load_lora_weights(str(file), adapter_name=f"lora{i}")
      names.append(f"lora{i}")
    if names:
      pipe.set_adapters(names, [s for _, s in loras])
    return reference_forward(model, inputs)

  ours_model = FluxTransformer.from_pretrained(folder / "transformer")
  return {"files": files, "peft_out": peft_out, "diffusers_out": diffusers_out,
          "model": ours_model, "inputs": inputs, "factors": factors, "base_state": base_state}


_FORWARDS = {}


def _ours(model, loras, inputs, model_type="flux"):
  """Our model's output with `loras` applied to its (float) parameters; one jitted forward per
  model, taking the parameters as an argument."""
  graphdef, state = nnx.split(model)
  if id(model) not in _FORWARDS:
    _FORWARDS[id(model)] = jax.jit(lambda st, kw: nnx.merge(graphdef, st)(**kw))
  adapters, strengths = load_loras(model_type, loras, state)
  merged = apply_loras(state, adapters, strengths)
  return np.asarray(_FORWARDS[id(model)](merged, {k: jnp.asarray(v) for k, v in inputs.items()}))


def _ours_adapter(model, adapter, inputs):
  """Our model's output with an in-memory adapter applied at strength 1."""
  graphdef, state = nnx.split(model)
  merged = apply_loras(state, [adapter], [1.0])
  return np.asarray(_FORWARDS[id(model)](merged, {k: jnp.asarray(v) for k, v in inputs.items()}))


def _close(ours, ref):
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref)))


@pytest.mark.parametrize("fmt", ["peft", "peft_alpha_keys", "kohya"])
def test_every_linear_lora_in_each_format_matches_peft(flux, fmt):
  _close(_ours(flux["model"], [(flux["files"][fmt], 1.0)], flux["inputs"]),
         flux["peft_out"]["all"])


@pytest.mark.parametrize("fmt", ["peft", "peft_alpha_keys", "kohya_blocks"])
def test_each_format_matches_diffusers_loader(flux, fmt):
  ref = flux["diffusers_out"]([(flux["files"][fmt], 1.0)])
  if fmt != "kohya_blocks":
    _close(ref, flux["peft_out"]["all"])  # diffusers reads the file as the LoRA it was made from
  _close(_ours(flux["model"], [(flux["files"][fmt], 1.0)], flux["inputs"]), ref)


def test_xlabs_lora_matches_diffusers(flux):
  ref = flux["diffusers_out"]([(flux["files"]["xlabs"], 1.0)])
  _close(ref, flux["peft_out"]["xlabs"])
  _close(_ours(flux["model"], [(flux["files"]["xlabs"], 1.0)], flux["inputs"]), ref)


def test_strengths_and_two_loras_match_diffusers(flux):
  peft, second = flux["files"]["peft"], flux["files"]["second"]
  base = _ours(flux["model"], [], flux["inputs"])
  np.testing.assert_array_equal(_ours(flux["model"], [(peft, 0.0)], flux["inputs"]), base)
  _close(base, flux["diffusers_out"]([]))
  _close(_ours(flux["model"], [(peft, 0.5)], flux["inputs"]),
         flux["diffusers_out"]([(peft, 0.5)]))
  both = [(peft, 0.7), (second, 0.4)]
  _close(_ours(flux["model"], both, flux["inputs"]), flux["diffusers_out"](both))


def test_fused_qkv_lora_keeps_only_each_layers_rank(flux):
  """The block-diagonal kohya qkv gives each of to_q/k/v its own rank-4 part, not rank 12."""
  shapes = linear_shapes(nnx.state(flux["model"]))
  adapter = read_lora(flux["files"]["kohya"], "flux", shapes)
  assert set(adapter) == set(shapes)
  assert adapter["transformer_blocks/0/attn/to_q/kernel"].lora_down.shape == (D, RANK)
  assert adapter["single_transformer_blocks/1/proj_mlp/kernel"].lora_up.shape == (RANK, 4 * D)
  assert adapter["transformer_blocks/0/attn/to_q/kernel"].scale == ALPHA / RANK


def _write(path, tensors, metadata=None):
  save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, path,
            metadata=metadata)
  return path


@pytest.mark.parametrize("keys, message", [
    ({"foo.weight": (D, D)}, "not a LoRA file of a known format .*'foo.weight'"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (RANK, D),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (D, RANK)},
     "1 LoRA modules match no layer of the flux model .*first keys "
     r"\['lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight'\]"),
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (RANK, D),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (D, RANK)},
     "match no layer of the flux model .*attn1.to_q"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": (4, 4)}, "LoKr"),
    ({"transformer.x_embedder.lora_A.weight": (RANK, TINY["in_channels"])},
     "needs both its down and up factors, found only"),
    ({"transformer.x_embedder.lora_A.weight": (RANK, 7),
      "transformer.x_embedder.lora_B.weight": (D, RANK)},
     r"the model's layer needs \(r, 16\) and \(32, r\)"),
    ({}, "holds no tensors"),
])
def test_bad_files_are_one_line_input_errors(flux, tmp_path, keys, message):
  file = _write(tmp_path / "bad.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
  with pytest.raises(InputError, match=message) as error:
    load_loras("flux", [(file, 1.0)], nnx.state(flux["model"]))
  assert "\n" not in str(error.value) and str(file) in str(error.value)


def test_bad_paths_strengths_and_specs(flux, tmp_path):
  state = nnx.state(flux["model"])
  with pytest.raises(CheckpointError, match="missing.safetensors"):
    load_loras("flux", [(tmp_path / "missing.safetensors", 1.0)], state)
  with pytest.raises(CheckpointError, match="strength 'x' is not a finite number"):
    load_loras("flux", [(flux["files"]["peft"], "x")], state)
  with pytest.raises(CheckpointError, match="unknown model type 'sd3'"):
    load_loras("sd3", [(flux["files"]["peft"], 1.0)], state)
  peft = str(flux["files"]["peft"])
  assert parse_lora_spec(peft) == (Path(peft), 1.0)
  assert parse_lora_spec(f"{peft}:0.75") == (Path(peft), 0.75)
  with pytest.raises(CheckpointError, match="no file"):
    parse_lora_spec(str(tmp_path / "nope.safetensors:0.5"))
  with pytest.raises(CheckpointError, match="not a finite number"):
    parse_lora_spec(f"{peft}:nan")


# PixArt-Sigma: diffusers has no LoRA loader for it; the reference is the peft-injected model.
PIXART_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                   num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                   norm_type="ada_norm_single", caption_channels=32,
                   use_additional_conditions=False)


def test_pixart_lora_in_peft_and_kohya_formats(tmp_path):
  torch.manual_seed(0)
  base = PixArtTransformer2DModel(**PIXART_TINY).eval()
  with torch.no_grad():
    for p in base.parameters():
      p.add_(0.05 * torch.randn_like(p))
  base.save_pretrained(tmp_path / "transformer")
  targets = _linear_names(base)
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
  model = inject_adapter_in_model(config, base)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.mul_(0.3)
  sd = get_peft_model_state_dict(model)
  FluxPipeline.save_lora_weights(tmp_path / "peft", transformer_lora_layers=sd,
                                 transformer_lora_adapter_metadata=config.to_dict())
  modules = [k.removesuffix(".lora_A.weight") for k in sd if k.endswith("lora_A.weight")]
  kohya = {}
  for m in modules:
    name = "lora_unet_" + m.replace(".", "_")
    kohya[f"{name}.lora_down.weight"] = sd[f"{m}.lora_A.weight"]
    kohya[f"{name}.lora_up.weight"] = sd[f"{m}.lora_B.weight"]
    kohya[f"{name}.alpha"] = torch.tensor(ALPHA)
  _write(tmp_path / "kohya.safetensors", kohya)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  captions = rng.standard_normal((2, 5, 32)).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(captions),
                timestep=torch.from_numpy(t),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.numpy()
  ours_model = PixArtSigmaTransformer.from_pretrained(tmp_path / "transformer")
  inputs = {"hidden_states": x, "encoder_hidden_states": captions, "timestep": t}
  base_out = _ours(ours_model, [], inputs, "pixart")
  assert np.max(np.abs(base_out - ref)) > 1e-2 * np.max(np.abs(ref))  # the LoRA is visible
  for file in (tmp_path / "peft" / "pytorch_lora_weights.safetensors",
               tmp_path / "kohya.safetensors"):
    _close(_ours(ours_model, [(file, 1.0)], inputs, "pixart"), ref)
  with pytest.raises(InputError, match="match no layer of the pixart model"):
    flux_file = _write(tmp_path / "flux.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(RANK, 16),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(48, RANK)})
    load_loras("pixart", [(flux_file, 1.0)], nnx.state(ours_model))


def test_jax_arrays_are_accepted_as_strengths(flux):
  state = nnx.state(flux["model"])
  adapters, strengths = load_loras("flux", [(flux["files"]["peft"], 1.0)], state)
  merged = apply_loras(state, adapters, jnp.asarray([0.25]))
  assert jax.tree.structure(merged) == jax.tree.structure(state)
  assert strengths.dtype == jnp.float32 and strengths.shape == (1,)


def test_kohya_qkv_lora_on_a_quantized_model_is_the_float_product_on_the_branch(flux):
  """File -> quantized layer: to_q of a fused kohya qkv LoRA, against the peft factors of to_q."""
  config = QuantConfig.preset(group_size=16, smooth=None, svd_iters=1, rank=8,
                              shift_activations=False)
  path = "transformer_blocks/1/attn/to_q/kernel"
  quantized = map_named_leaves(  # one layer quantized (enough, and fast)
      lambda p, leaf: quantize_linear(leaf, None, None, config) if p == path else leaf,
      nnx.state(flux["model"]))
  adapters, strengths = load_loras("flux", [(flux["files"]["kohya"], 0.5)], quantized)
  merged = apply_loras(quantized, adapters, strengths)
  base, lora = dict(named_leaves(quantized))[path], dict(named_leaves(merged))[path]
  assert base.rank == 8 and lora.rank == 8 + RANK  # only to_q's part of the 3 * RANK qkv LoRA
  a, b = (t.double().numpy() for t in flux["factors"]["transformer_blocks.1.attn.to_q"])
  x = np.random.default_rng(0).standard_normal((6, D)).astype(np.float32)
  delta = 0.5 * (ALPHA / RANK) * (x @ a.T) @ b.T
  bound = 3 * 2.0**-8 * 0.5 * (ALPHA / RANK) * (np.abs(x) @ np.abs(a.T)) @ np.abs(b.T) + 1e-5
  got = np.float64(xla_dot(jnp.asarray(x), lora)) - np.float64(xla_dot(jnp.asarray(x), base))
  np.testing.assert_array_less(np.abs(got - delta), bound)
  assert np.max(np.abs(delta) - bound) > 0


def test_written_lora_loads_in_diffusers_and_reads_back(flux, tmp_path):
  """write_lora's file, on the block linears and the 16-bit embedder and final projection, gives
  in diffusers (FluxTransformer2DModel.load_lora_adapter, through peft) what it gives here."""
  shapes = linear_shapes(nnx.state(flux["model"]))
  rng = np.random.default_rng(11)
  rank, scale = 3, 0.75
  layers = [p for p in shapes if "blocks/" in p and "norm" not in p]
  layers += ["x_embedder/kernel", "proj_out/kernel"]
  adapter = {p: LayerLoRA(0.3 * rng.standard_normal((shapes[p][0], rank)).astype(np.float32),
                          0.3 * rng.standard_normal((rank, shapes[p][1])).astype(np.float32),
                          scale) for p in layers}
  file = write_lora(tmp_path / "trained.safetensors", adapter, "flux")
  back = read_lora(file, "flux", shapes)
  assert set(back) == set(adapter)
  for path, lora in adapter.items():
    np.testing.assert_array_equal(back[path].lora_down, lora.lora_down)
    np.testing.assert_array_equal(back[path].lora_up, np.float32(scale) * lora.lora_up)
    assert back[path].scale == 1.0  # folded into lora_up

  model = FluxTransformer2DModel(**TINY).eval()
  model.load_state_dict(flux["base_state"])
  base = reference_forward(model, flux["inputs"])
  model.load_lora_adapter(str(file), prefix="transformer", adapter_name="trained")
  ref = reference_forward(model, flux["inputs"])
  assert np.abs(ref - base).max() > 0.05 * np.abs(base).max()  # the LoRA is visible
  _close(_ours(flux["model"], [(file, 1.0)], flux["inputs"]), ref)
  _close(_ours_adapter(flux["model"], adapter, flux["inputs"]), ref)  # the adapter itself
  with pytest.raises(InputError, match="one rank for every layer"):
    write_lora(tmp_path / "mixed.safetensors", {**adapter, layers[0]: LayerLoRA(
        np.zeros((shapes[layers[0]][0], 1)), np.zeros((1, shapes[layers[0]][1])), 1.0)}, "flux")


def test_sdxl_original_unet_names_are_the_ones_diffusers_reads():
  """Every layer of SDXL base (abstract shapes) under its kohya / original-UNet name, as we map
  it, is the module diffusers' own kohya reader (`_maybe_map_sgm_blocks_to_diffusers`, then
  `_convert_non_diffusers_lora_to_diffusers`) puts that LoRA on."""
  config = UNetSDXLConfig()
  shapes = kernel_shapes(nnx.state(nnx.eval_shape(lambda: UNetSDXL(config, rngs=nnx.Rngs(0)))))
  ours = {name: pieces[0].path.removesuffix("/kernel").replace("/", ".")
          for name, pieces in lora_targets("sdxl", shapes).items()
          if name.startswith(("input_blocks", "middle_block", "output_blocks", "out_",
                              "time_embed_", "label_emb"))}
  assert len(ours) == len(shapes)  # every linear and conv has an original name
  kohya = {f"lora_unet_{name}.lora_{part}.weight": torch.zeros(1)
           for name in ours for part in ("down", "up")}
  mapped = _maybe_map_sgm_blocks_to_diffusers(kohya, SimpleNamespace(layers_per_block=2))
  converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
  theirs = set()
  for key in converted:
    if key.endswith("down.weight"):  # unet.<module>[.processor.to_q_lora | .lora].down.weight
      module = re.sub(r"(\.lora|_lora)\.down\.weight$", "", key.removeprefix("unet."))
      module = module.replace(".processor.", ".").replace("to_out", "to_out.0")
      theirs.add(module)
  assert theirs == set(ours.values())

"""Device memory of one LoRA training step at FLUX.1's width: bf16 base vs svdquant-int4 base.

XLA's own account (`compiled.memory_analysis()`) of `pipelines.train_lora`'s training step
(forward, backward through `svdq_dot`, AdamW update), compiled for abstract inputs, so nothing is
allocated: the arguments (the frozen transformer, the LoRA, the optimizer state, the batch) and
the temporaries (activations kept for the backward pass, per-layer dequantized weights, ...).
The transformer has FLUX.1-dev's width (3072, 24 heads of 128) and, per row, D double and S single
blocks (`--blocks D,S ...`; the whole model has 19 and 38): the difference between rows is what
blocks add. The LoRA is rank 16 on the default targets (every attention and MLP linear of the
blocks); batch 1 with `--tokens` image tokens (1024 for 512x512) and 512 text tokens.

Usage: python benchmarks/lora_training_memory.py [--blocks 1,1 2,2 --tokens 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from models.flux import FluxConfig, FluxTransformer
from pipelines.train_lora import LoRATrainConfig, make_step, target_shapes, tree_bytes
from svdq_jax import QuantConfig, quantize_params
from svdq_jax.lora import init_lora_factors


def step_memory(preset: str, config: FluxConfig, tokens: int, text_tokens: int) -> dict:
  """The compiled training step's memory for the transformer quantized with `preset`."""
  model = nnx.eval_shape(lambda: FluxTransformer(config, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0)))
  if preset != "bf16":
    nnx.update(model, quantize_params(nnx.state(model), None, QuantConfig.preset(preset),
                                      progress=False))
  train = LoRATrainConfig(rank=16, max_sequence_length=text_tokens)
  side = int(round(tokens ** 0.5)) * 2
  step, optimizer = make_step(model, train, (side, side))
  factors = jax.eval_shape(lambda: init_lora_factors(target_shapes(model, train.targets),
                                                     train.rank, jax.random.key(0)))
  opt_state = jax.eval_shape(optimizer.init, factors)
  base = nnx.state(model)
  sds = jax.ShapeDtypeStruct
  batch = (sds((1, tokens, config.in_channels), jnp.float32),
           sds((1, text_tokens, config.joint_attention_dim), jnp.bfloat16),
           sds((1, config.pooled_projection_dim), jnp.bfloat16),
           jax.eval_shape(lambda: jax.random.key(0)))
  started = time.time()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(factors, opt_state, base,
                                                         *batch).compile()
  analysis = compiled.memory_analysis()
  return {"base": tree_bytes(base), "lora": tree_bytes(factors) + tree_bytes(opt_state),
          "arguments": analysis.argument_size_in_bytes, "temps": analysis.temp_size_in_bytes,
          "compile_s": time.time() - started}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", nargs="+", default=["1,1", "2,2"], metavar="D,S",
                      help="double,single block counts, one row each")
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--text-tokens", type=int, default=512)
  args = parser.parse_args(argv)
  print(f"# LoRA training step memory (XLA memory_analysis), jax {jax.__version__} on "
        f"{jax.default_backend()}; FLUX.1-dev width, rank-16 LoRA, batch 1, {args.tokens} image "
        f"+ {args.text_tokens} text tokens; GB = 1e9 bytes")
  print(f"{'blocks':8s}{'base':16s}{'transformer GB':>16s}{'LoRA+Adam GB':>14s}"
        f"{'arguments GB':>14s}{'temporaries GB':>16s}{'compile s':>11s}")
  for blocks in args.blocks:
    double, single = (int(n) for n in blocks.split(","))
    config = dataclasses.replace(FluxConfig.dev(), num_layers=double, num_single_layers=single)
    for preset in ("bf16", "svdquant-int4"):
      m = step_memory(preset, config, args.tokens, args.text_tokens)
      print(f"{double}+{single:<6d}{preset:16s}{m['base'] / 1e9:16.3f}{m['lora'] / 1e9:14.3f}"
            f"{m['arguments'] / 1e9:14.3f}{m['temps'] / 1e9:16.3f}{m['compile_s']:11.0f}",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Image quality of the demo model under every quantization preset (the SVDQuant paper's Table 1,
on the emoji model trained here).

    python benchmarks/demo_quality.py                      # the packaged demo/emoji_flux
    python benchmarks/demo_quality.py --model DIR --prompts 32 --steps 20

The measurement is `demo.quality.measure`, the one `svdq-jax demo` makes: the float model and
each preset sample the same evaluation prompts with the same seeds; per preset the transformer's
bytes, PSNR and an LPIPS-like distance against the float model's images, an FID-like Frechet
distance to the real renders and the prompt accuracy (both from the shipped emoji classifier), and
seconds per image. Prints the markdown table and writes it, with the settings, to
benchmarks/results/demo_quality.md and demo_quality.json (`--results DIR` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

from demo import data, quality, sampling

RESULTS = Path(__file__).resolve().parent / "results"


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default=str(quality.DEFAULT_MODEL),
                      help="demo FluxPipeline folder (default: the packaged demo/emoji_flux)")
  parser.add_argument("--classifier", default=str(quality.DEFAULT_CLASSIFIER),
                      help="emoji classifier folder (default: the packaged one)")
  parser.add_argument("--presets", default=",".join(quality.ALL_PRESETS),
                      help="comma-separated presets (default: all)")
  parser.add_argument("--prompts", type=int, default=len(data.EVAL_PROMPTS),
                      help=f"how many of the {len(data.EVAL_PROMPTS)} evaluation prompts "
                      "(default: all)")
  parser.add_argument("--steps", type=int, default=sampling.NUM_STEPS,
                      help="denoising steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--results", type=Path, default=RESULTS,
                      help="folder of demo_quality.md / .json (default: benchmarks/results)")
  return parser.parse_args()


def main() -> None:
  args = _parse()
  presets = quality.check_presets([p.strip() for p in args.presets.split(",") if p.strip()])
  if not 1 <= args.prompts <= len(data.EVAL_PROMPTS):
    raise SystemExit(f"--prompts must be 1 to {len(data.EVAL_PROMPTS)}, got {args.prompts}")
  start = time.perf_counter()
  judge = quality.Judge.load(args.classifier)
  report = quality.measure(args.model, judge, presets=presets,
                           prompts=data.EVAL_PROMPTS[:args.prompts], seed=args.seed,
                           num_steps=args.steps)
  wall = time.perf_counter() - start
  table = quality.format_table(report.results)
  machine = (f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.machine()}, "
             f"{len(jax.devices())} device(s)")
  settings = {**report.settings, "machine": machine, "wall_seconds": round(wall, 1)}
  note = (f"{len(report.prompts)} evaluation prompts, seed {args.seed}, {args.steps} steps; "
          f"calibration: {len(settings['calibration_prompts'])} training names, "
          f"{settings['calibration_steps']} steps each; {machine}; {wall:.0f} s in all.")
  print(table)
  print(note)
  args.results.mkdir(parents=True, exist_ok=True)
  (args.results / "demo_quality.md").write_text(
      f"# python benchmarks/demo_quality.py\n\n{table}\n\n{note}\n", encoding="utf-8")
  (args.results / "demo_quality.json").write_text(json.dumps(
      {"settings": settings, "results": [r.to_json() for r in report.results]}, indent=2) + "\n",
      encoding="utf-8")


if __name__ == "__main__":
  main()

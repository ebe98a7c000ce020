"""A long sampling run in one process: 100 prompts in a row, one call each, on the shipped demo
model (demo/emoji_flux, its sample_defaults.json settings), printing the resident memory and the
number of XLA compilations every 10 prompts.

What it shows: the pipeline compiles its functions once per shape (the first prompt) and later
calls reuse them; resident memory settles after the first calls instead of growing per prompt.
Compilations are counted with a `jax.monitoring` listener on jax's backend-compile event (one
event per XLA compilation); resident memory is this process's RSS from /proc (Linux).

Usage: python benchmarks/long_run_memory.py [--prompts 100] [--every 10] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax

import pipelines
from demo import data
from pipelines.folder import PipelineFolder

DEFAULT_MODEL = Path(data.__file__).resolve().parent / "emoji_flux"
# jax records this event once per XLA compilation (jax/_src/dispatch.py BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def resident_bytes() -> int:
  """This process's resident set size now (/proc/self/statm: pages)."""
  pages = int(Path("/proc/self/statm").read_text().split()[1])
  return pages * os.sysconf("SC_PAGE_SIZE")


class CompileCounter:
  """Counts XLA backend compilations from jax.monitoring events."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
      self.count += 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default=str(DEFAULT_MODEL), help="FluxPipeline folder")
  parser.add_argument("--prompts", type=int, default=100, help="prompts, one call each")
  parser.add_argument("--every", type=int, default=10, help="report every this many prompts")
  parser.add_argument("--steps", type=int, default=None,
                      help="denoising steps (default: the folder's sample_defaults.json)")
  args = parser.parse_args()
  counter = CompileCounter()
  folder = PipelineFolder.read(args.model)
  settings = dict(folder.sample_defaults)
  if args.steps is not None:
    settings["num_inference_steps"] = args.steps
  pipe = pipelines.load_pipeline(folder)
  loaded_rss = resident_bytes()
  prompts = [data.EVAL_PROMPTS[i % len(data.EVAL_PROMPTS)] for i in range(args.prompts)]
  print(f"# {folder.path.name}, {args.prompts} prompts, one call each, seeds 0..{args.prompts - 1}"
        f"; settings {settings}")
  print(f"# jax {jax.__version__} on {jax.default_backend()}; RSS after loading "
        f"{loaded_rss / 2**20:.1f} MiB")
  print(f"{'prompts':>8s}{'RSS MiB':>10s}{'compilations':>14s}{'new':>6s}{'s/prompt':>10s}")
  reported, rss_at, first_call_compiles = 0, {}, None
  start = time.perf_counter()
  for index, prompt in enumerate(prompts, 1):
    pipe([prompt], seed=index - 1, **settings)
    if index == 1:
      first_call_compiles = counter.count
    if index % args.every == 0 or index == args.prompts:
      rss_at[index] = resident_bytes()
      elapsed = (time.perf_counter() - start) / index
      print(f"{index:8d}{rss_at[index] / 2**20:10.1f}{counter.count:14d}"
            f"{counter.count - reported:6d}{elapsed:10.2f}", flush=True)
      reported = counter.count
  later = counter.count - first_call_compiles
  marks = sorted(rss_at)
  first, last = marks[0], marks[-1]
  growth = (rss_at[last] - rss_at[first]) / 2**20
  print(f"# compilations: {first_call_compiles} during prompt 1, {later} during prompts "
        f"2-{args.prompts}")
  print(f"# RSS: {rss_at[first] / 2**20:.1f} MiB after prompt {first}, "
        f"{rss_at[last] / 2**20:.1f} MiB after prompt {last} ({growth:+.1f} MiB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

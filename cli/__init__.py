"""The `svdq-jax` command line (`cli.main.main`); `python -m cli` runs it too.

OpenBLAS (the LAPACK behind jax's CPU decompositions) runs single-threaded unless the user set
OPENBLAS_NUM_THREADS: the QRs and SVDs of the quantization's smoothing search are small, and a
threaded OpenBLAS waiting for busy cores spent many times their CPU time
(benchmarks/svd_algorithm.py). It is read when the library loads, so it is set before any import.

`cli.commands` (the subcommands, which load jax and the models) is imported on first use, so that
`svdq-jax --help` and a bad flag answer without loading them.
"""

import importlib
import os
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def __getattr__(name: str) -> Any:
  """`cli.commands`, imported on first access (PEP 562)."""
  if name != "commands":
    raise AttributeError(f"module 'cli' has no attribute {name!r}")
  return importlib.import_module("cli.commands")

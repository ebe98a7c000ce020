"""The `svdq-jax` command line (`cli.main.main`); `python -m cli` runs it too.

OpenBLAS (the LAPACK behind jax's CPU decompositions) runs single-threaded unless the user set
OPENBLAS_NUM_THREADS: the QRs and SVDs of the quantization's smoothing search are small, and a
threaded OpenBLAS waiting for busy cores spent many times their CPU time
(benchmarks/svd_algorithm.py). It is read when the library loads, so it is set before any import.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

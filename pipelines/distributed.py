"""Several processes (hosts) on JAX's multi-controller runtime: `jax.distributed.initialize`.

Every process runs the same program (`svdq-jax sample ... --coordinator HOST:PORT
--num-processes N --process-id I`, or the environment below) and calls `initialize` before any
other jax call; `jax.devices()` then lists the devices of all processes, and sampling runs
data-parallel over all of them (`models.sharding`). On CPU the cross-process collectives are
jax's gloo TCP collectives (`jax_cpu_collectives_implementation`, "gloo" by default in jax
0.11.2; "mpi" is the other choice); on GPUs, NCCL.

Where the settings come from, first found wins:
  coordinator address  the argument, else JAX_COORDINATOR_ADDRESS (read by jax itself), else
                       cluster auto-detection (Slurm, Open MPI, Kubernetes, Cloud TPU; jax's).
  process count, id    the arguments, else JAX_NUM_PROCESSES / JAX_PROCESS_ID (read here; jax
                       reads no such variables), else cluster auto-detection.
jax itself also reads JAX_COORDINATOR_BIND_ADDRESS, JAX_LOCAL_DEVICE_IDS and, under a detected
cluster, JAX_COORDINATOR_PORT.
"""

from __future__ import annotations

import os

import jax

from svdq_jax.errors import InputError

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if text is None or not text.strip():
    return None
  try:
    return int(text)
  except ValueError:
    raise InputError(f"environment variable {name} must be an integer, got {text!r}") from None


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> bool:
  """Whether a multi-process run is asked for, by arguments or the environment variables."""
  return any(v is not None for v in (coordinator, num_processes, process_id)) or any(
      os.environ.get(name) for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
  """`jax.distributed.initialize` with the settings of the module docstring.

  coordinator: "HOST:PORT" of process 0's coordinator service (every process names the same).
  num_processes, process_id: N and this process's I in 0..N-1.

  Raises:
    InputError for a coordinator address without a port, a process id outside 0..N-1, or
    settings that neither the arguments, the environment nor a detected cluster give.
  """
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  address = coordinator or os.environ.get(ENV_COORDINATOR)
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise InputError(f"coordinator address {address!r} must be HOST:PORT")
  if num_processes is not None and num_processes < 1:
    raise InputError(f"the process count must be >= 1, got {num_processes}")
  if None not in (num_processes, process_id) and not 0 <= process_id < num_processes:
    raise InputError(f"process id {process_id} is outside 0..{num_processes - 1}")
  try:
    jax.distributed.initialize(address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  except ValueError as e:  # jax's message for a missing setting, when no cluster is detected
    raise InputError(f"multi-process setup: {e} (give --coordinator, --num-processes and "
                     f"--process-id, or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
                     f"{ENV_PROCESS_ID})") from e

#!/usr/bin/env bash
# One GPU session in one command: the kernel tests compiled (not interpreted), the kernel table,
# the kernel 2 config sweep and FLUX.1-dev sampling, each written to
# $OUT/results/<device>/<part>.txt (benchmarks/results/<device>/ when OUT is unset).
#
#   bash benchmarks/gpu_session.sh [--dry-run] [PART ...]     PART: tests kernels sweep sampling
#
# Run from anywhere; it works in the repository root with $PYTHON (default python3),
# PYTHONPATH=. and JAX_PLATFORMS=cuda,cpu (tests/conftest.py would otherwise pick the CPU, where
# the kernel tests run interpreted; and a GPU that fails to start is an error, not a CPU fallback).
# Python's output is unbuffered, so that a part stopped by its limit keeps what it printed.
# Every part runs under its own time limit and a failing or timed-out part does not stop the
# next; the summary at the end (also summary.txt) says which parts failed, and the exit status is
# 1 if any did. The limits keep all parts within 9 minutes (TOTAL_SECONDS); the last
# part gets what is left. That may not be enough for FLUX.1-dev's build, quantization and
# compilation, or for the compilations of the sweep: a part that timed out keeps its partial output
# and can be run on its own (`bash benchmarks/gpu_session.sh sampling`) with the whole budget.
# --dry-run prints the commands, limits and output files without running anything.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export JAX_PLATFORMS=cuda,cpu PYTHONUNBUFFERED=1
TOTAL_SECONDS=${TOTAL_SECONDS:-530}
START=$SECONDS

dry_run=0
parts=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    tests | kernels | sweep | sampling) parts+=("$arg") ;;
    *) echo "gpu_session.sh: unknown argument '$arg' (parts: tests kernels sweep sampling;" \
         "option: --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -eq 0 ] && parts=(tests kernels sweep sampling)

# Seconds per part; the last part run gets whatever remains of TOTAL_SECONDS instead, so a part
# run alone has the whole budget. Compilation (two Mosaic GPU kernels per config and shape) is
# expected to dominate, not the timed calls.
declare -A limit=([tests]=100 [kernels]=100 [sweep]=240 [sampling]=240)
last=${parts[${#parts[@]}-1]}

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' \
  | sed 's/^-*//; s/-*$//')
results=${OUT:+$OUT/results}
results=${results:-benchmarks/results}/$slug

command_of() {
  case "$1" in
    tests) echo "$PYTHON -m pytest -q -p no:xdist tests/pallas_kernels" ;;
    kernels) echo "$PYTHON benchmarks/kernels.py --iters 10 --calls 10 --warmup 2" ;;
    sweep) echo "$PYTHON benchmarks/kernels.py --sweep --iters 5 --calls 10 --warmup 2" ;;
    sampling) echo "$PYTHON benchmarks/sampling.py --shapes flux-dev --steps 4 --repeats 2" ;;
  esac
}

echo "# gpu_session: ${gpu_name:-no GPU found by nvidia-smi}; results in $results"
[ $dry_run -eq 0 ] && mkdir -p "$results"
if [ $dry_run -eq 0 ]; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    timeout 60 $PYTHON -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
  } | tee "$results/device.txt"
fi

declare -A outcome
planned=0  # the seconds the parts before this one may take at most
for part in "${parts[@]}"; do
  command=$(command_of "$part")
  file="$results/$part.txt"
  if [ "$part" != "$last" ]; then
    seconds=${limit[$part]}
    echo "## $part (limit ${seconds} s): $command > $file"
  else
    seconds=$((TOTAL_SECONDS - (SECONDS - START)))
    echo "## $part (limit: the rest of ${TOTAL_SECONDS} s, at least $((TOTAL_SECONDS - planned))" \
      "s): $command > $file"
  fi
  planned=$((planned + seconds))
  if [ $dry_run -eq 1 ]; then
    outcome[$part]="not run (dry run)"
    continue
  fi
  if [ "$seconds" -le 0 ]; then
    outcome[$part]="FAILED: no time left of ${TOTAL_SECONDS} s"
    continue
  fi
  # $command is split into words on purpose: PYTHON may carry its own arguments.
  timeout --kill-after=10 "$seconds" $command 2>&1 | tee "$file"
  status=${PIPESTATUS[0]}
  case $status in
    0) outcome[$part]="ok" ;;
    124 | 137) outcome[$part]="FAILED: timed out after ${seconds} s (partial output kept)" ;;
    *) outcome[$part]="FAILED: exit status $status" ;;
  esac
done

failed=0
summary="# summary after $((SECONDS - START)) s"
for part in "${parts[@]}"; do
  summary+=$'\n'"$part: ${outcome[$part]}"
  case "${outcome[$part]}" in FAILED*) failed=1 ;; esac
done
echo "$summary"
[ $dry_run -eq 0 ] && echo "$summary" > "$results/summary.txt"
exit $failed

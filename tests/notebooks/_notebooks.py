"""What the notebook tests share: the notebooks, the checks on each one's printed outputs, and a
runner that executes one top to bottom (a failing cell fails)."""

import re
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def _check_quickstart(outputs: str) -> None:
  found = re.search(r"relative error of the quantized model: ([0-9.e-]+)", outputs)
  assert found, outputs[-2000:]
  # A 4-bit model is not the float model, and not far from it either.
  assert 1e-4 < float(found.group(1)) < 0.05


def _check_lora(outputs: str) -> None:
  found = re.search(r"LoRA loss ratio: ([0-9.]+)", outputs)
  assert found, outputs[-2000:]
  assert float(found.group(1)) < 0.9  # the LoRA learned the data
  assert "without the LoRA again == base: True" in outputs
  assert "to_q branch rank with the LoRA: 12" in outputs  # rank 8 + the LoRA's 4
  assert "compiled forwards: 2" in outputs  # the base's shapes and the LoRA's, any strength
  zero = re.search(r"strength 0, largest change: ([0-9.e-]+)", outputs)
  assert zero and float(zero.group(1)) < 1e-5, outputs[-2000:]
  half = re.search(r"change at 0.5 / change at 1.0: ([0-9.]+)", outputs)
  assert half and 0.2 < float(half.group(1)) < 0.9, outputs[-2000:]


def _numbers(pattern: str, outputs: str) -> list[tuple[str, ...]]:
  found = re.findall(pattern, outputs)
  assert found, f"{pattern!r} not in the outputs:\n{outputs[-3000:]}"
  return found


def _check_inside_svdquant(outputs: str) -> None:
  ratios = _numbers(r"activation max/median channel ratio ([0-9.]+) -> ([0-9.]+)", outputs)
  assert len(ratios) == 2, ratios
  for before, after in ratios:  # smoothing flattens the activations' channel spans
    assert float(after) < float(before), ratios
  svd = _numbers(r"residual's largest singular value / smoothed weight's 33rd: ([0-9.]+)", outputs)
  for ratio in svd:  # >= 1 by Eckart-Young; near 1 when the branch holds the top directions
    assert float(ratio) < 1.1, svd
  energy = _numbers(r"top 32 singular values: W ([0-9.]+), smoothed ([0-9.]+)", outputs)
  for before, after in energy:  # smoothing concentrates the weight in its top singular values
    assert float(after) > float(before), energy
  ranks = _numbers(r"error by rank: 0: ([0-9.]+), 4: ([0-9.]+), 8: ([0-9.]+), 16: ([0-9.]+), "
                   r"32: ([0-9.]+)", outputs)
  assert len(ranks) == 2, ranks
  for row in ranks:
    errors = [float(e) for e in row]
    for lower, higher in zip(errors[1:], errors[:-1], strict=True):  # error falls with the rank
      assert lower <= higher * 1.02, errors
    assert errors[-1] < 0.8 * errors[0], errors
  alphas = _numbers(r"error at alpha 0 \(no smoothing\) ([0-9.]+), best span_x\^alpha at alpha "
                    r"[0-9.]+ ([0-9.]+), searched smoothing ([0-9.]+)", outputs)
  assert len(alphas) == 2, alphas
  for unsmoothed, _, searched in alphas:  # the searched smoothing beats no smoothing
    assert float(searched) <= float(unsmoothed), alphas


def _check_end_to_end(outputs: str) -> None:
  psnrs = _numbers(r"PSNR int4 vs float ([0-9.]+) dB  \(float, other seed: ([0-9.]+) dB\)",
                   outputs)
  assert len(psnrs) == 4, psnrs
  int4, other_seed = (np.array([float(row[i]) for row in psnrs]) for i in (0, 1))
  assert np.all(int4 > 20.0), psnrs  # close to the float model's image
  # Closer to the float image than the float model's own image for another seed, by far on average.
  assert np.all(int4 > other_seed + 3.0) and int4.mean() > other_seed.mean() + 8.0, psnrs
  (ratio,) = _numbers(r"size ratio bf16 / int4: ([0-9.]+)", outputs)
  # Below 4x at width 128: the bf16 rank-32 branch is half a kernel there (see the notebook).
  assert 1.5 < float(ratio) < 4.0, ratio


CHECKS = {"quickstart.ipynb": _check_quickstart, "lora.ipynb": _check_lora,
          "inside_svdquant.ipynb": _check_inside_svdquant, "end_to_end.ipynb": _check_end_to_end}


def run_notebook(name: str) -> None:
  """Executes notebooks/`name` in a fresh kernel from the repository root and checks its printed
  outputs with CHECKS[name]."""
  path = NOTEBOOKS_DIR / name
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parents[1])}})
  client.execute()
  outputs = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
  CHECKS[name](outputs)

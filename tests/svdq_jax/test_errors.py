"""`svdq_jax.errors.InputError`: one error type for the user's input across the package.

CheckpointError is one (so the CLI catches InputError alone), it stays a ValueError for callers
that catch that, and the user-named lookups outside the converters (a preset, a device count)
raise it with a message naming what was asked and what exists.
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from convert.safetensors_io import CheckpointError
from models import sharding
from svdq_jax import PRESETS, QuantConfig
from svdq_jax.errors import InputError


def test_checkpoint_error_is_an_input_error_and_a_value_error():
  error = CheckpointError("w.safetensors: truncated")
  assert isinstance(error, InputError) and isinstance(error, ValueError)
  with pytest.raises(ValueError, match="truncated"):  # existing `except ValueError` sites
    raise error


def test_unknown_preset_is_an_input_error_listing_the_known_ones():
  with pytest.raises(InputError, match=re.escape("unknown preset 'int3'; known presets: ")) as info:
    QuantConfig.preset("int3")
  for name in ("svdquant-int4", "svdquant-nvfp4", "w4a4", "smoothquant-w4a4", "nf4-w4a16",
               "w8a8", "bf16"):
    assert repr(name) in str(info.value)
  assert QuantConfig.preset("w8a8") == PRESETS["w8a8"]


@pytest.mark.parametrize("count", [0, -1, jax.device_count() + 1])
def test_device_count_out_of_range_is_an_input_error(count):
  available = jax.device_count()
  match = re.escape(f"asked for {count} devices, but there are {available} "
                    f"{jax.default_backend()} device(s): ask for 1 to {available}")
  with pytest.raises(InputError, match=match):
    sharding.check_device_count(count)
  with pytest.raises(InputError, match=match):
    sharding.data_mesh(count)


def test_every_device_count_that_exists_is_accepted():
  for count in range(1, jax.device_count() + 1):
    sharding.check_device_count(count)
    assert sharding.data_mesh(count).devices.size == count


def test_light_modules_do_not_import_jax():
  """svdq_jax's public names load on first use, so the checkpoint reader and the error class
  (what `svdq-jax --help` and convert.CheckpointReader need) come without jax and flax."""
  code = ("import sys, convert.safetensors_io, svdq_jax.errors, svdq_jax; "
          "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
  assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_public_name_of_svdq_jax_resolves():
  import svdq_jax

  for name in svdq_jax.__all__:
    assert getattr(svdq_jax, name) is getattr(sys.modules[svdq_jax._EXPORTS[name]], name)
  with pytest.raises(AttributeError, match="no attribute 'quantise_linear'"):
    svdq_jax.quantise_linear  # noqa: B018


def test_a_bad_tokenizer_folder_is_an_input_error():
  from models.tokenizers import TokenizerError

  assert issubclass(TokenizerError, InputError)

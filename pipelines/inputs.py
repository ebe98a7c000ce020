"""Checks of a pipeline call's inputs, shared by every pipeline and by the command line (which
calls them before loading a model)."""

from __future__ import annotations

from collections.abc import Sequence

from svdq_jax.errors import InputError


def prompt_list(prompt: str | Sequence[str]) -> list[str]:
  """The batch of prompts: one string, or a non-empty sequence of strings; InputError else."""
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
  return prompts


def check_outputs(what: str, num_images_per_prompt: int, output_type: str) -> None:
  """Raises InputError naming `what` unless num_images_per_prompt >= 1 and output_type is one
  the pipelines produce ("np" images or "latent")."""
  if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or (
      num_images_per_prompt < 1):
    raise InputError(f"{what}: num_images_per_prompt must be an integer >= 1, got "
                     f"{num_images_per_prompt!r}")
  if output_type not in ("np", "latent"):
    raise InputError(f"{what}: output_type must be 'np' or 'latent', got {output_type!r}")


def check_image_size(what: str, height: int, width: int, multiple: int) -> None:
  """Raises InputError naming `what` unless height and width are positive multiples of `multiple`
  (a pipeline's `size_multiple`, or `PipelineFolder.size_multiple`)."""
  if height <= 0 or width <= 0 or height % multiple or width % multiple:
    raise InputError(f"{what}: height and width must be positive multiples of {multiple}, got "
                     f"{height}x{width}")


def check_call(what: str, prompt: str | Sequence[str], *, height: int, width: int,
               size_multiple: int, num_images_per_prompt: int = 1, output_type: str = "np"
               ) -> list[str]:
  """The checks every pipeline call makes (prompts, image count, output type, size); returns the
  prompts as a list."""
  prompts = prompt_list(prompt)
  check_outputs(what, num_images_per_prompt, output_type)
  check_image_size(what, height, width, size_multiple)
  return prompts

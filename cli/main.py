"""The `svdq-jax` command line: demo, convert, import-nunchaku, export-nunchaku, quantize, sample,
train-lora, bench.

Every subcommand hands its input to the library, which checks it before doing any work; bad input
(a missing folder, a wrong model type, a bad prompt file, more devices than exist, an unknown
preset, an image size the model cannot make) prints one line `svdq-jax <command>: error: <what>`
on stderr and exits with status 2. Bad input is an `InputError` (`convert.CheckpointError`
included: a missing, corrupt or mismatched checkpoint file) or an OS error about a path the user
named; any other exception is a bug and keeps its traceback (exit status 1). A sampling run whose
latents or pixels turn NaN or inf (`pipelines.NonFiniteError`) prints one line naming the step
and component, writes no image and exits with status 3.

The parser (`cli.parser`) loads no jax: `--help` and bad flags answer at once; the commands
(`cli.commands`, with jax and the models) load after the arguments parsed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cli
from cli.parser import COMMANDS, DEFAULT_CALIB, build_parser
from svdq_jax.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
# OS errors about a path the user named; other OS errors (a full disk, an I/O error) are not input.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
__all__ = ["COMMANDS", "DEFAULT_CALIB", "EXIT_BAD_INPUT", "EXIT_NON_FINITE", "main",
           "read_prompt_file"]


def read_prompt_file(path: str | os.PathLike) -> list[str]:
  """Non-empty, stripped lines of a UTF-8 text file; lines starting with '#' are comments.

  Raises:
    InputError when the file is missing, not a file, not UTF-8 text, or holds no prompt.
  """
  file = Path(path)
  if not file.exists():
    raise InputError(f"prompt file {str(file)!r} does not exist")
  if not file.is_file():
    raise InputError(f"prompt file {str(file)!r} is not a file")
  try:
    text = file.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"prompt file {str(file)!r} is not UTF-8 text ({e.reason} at byte "
                     f"{e.start})") from e
  if "\x00" in text:
    raise InputError(f"prompt file {str(file)!r} is not a text file (it contains NUL bytes)")
  prompts = [line.strip() for line in text.splitlines()]
  prompts = [p for p in prompts if p and not p.startswith("#")]
  if not prompts:
    raise InputError(f"prompt file {str(file)!r} holds no prompt (one prompt per line expected)")
  return prompts


def _is_input_error(error: Exception) -> bool:
  """Whether `error` is about the user's input (see the module docstring), not a bug."""
  return isinstance(error, (InputError, *PATH_ERRORS))


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `svdq-jax` with `argv` (default: sys.argv[1:]); returns the exit status.

  Bad input returns EXIT_BAD_INPUT after one line on stderr; any other exception propagates with
  its traceback (the console script then exits with status 1).
  """
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = f"svdq-jax {argv[0]}" if argv and argv[0] in COMMANDS else "svdq-jax"
  try:
    args = parser.parse_args(argv)
    return cli.commands.COMMAND_RUNS[args.command](args)
  except Exception as e:
    if _is_input_error(e):
      status = EXIT_BAD_INPUT
    elif isinstance(e, cli.commands.NonFiniteError):
      status = EXIT_NON_FINITE
    else:
      raise
    print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return status

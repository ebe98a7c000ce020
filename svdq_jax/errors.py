"""The error that says the user's input is wrong, as opposed to a bug of ours.

`svdq-jax` prints an `InputError` as one line `svdq-jax <command>: error: <message>` with exit
status 2; any other exception keeps its traceback (exit status 1), so our own bugs stay visible.
Raise it where a flag, a path or a file's content given by the user is checked at a public entry
point; the message names what was given and what is needed. `convert.CheckpointError` (a missing,
corrupt or mismatched checkpoint file) is an `InputError` too. Checks of our own invariants stay
plain `ValueError`s.
"""

from __future__ import annotations


class InputError(ValueError):
  """The user's input is wrong: a flag, a path, or a file's content.

  A ValueError, so callers that catch ValueError around input checks still catch it.
  """

"""The error types for problems a user caused and can fix."""


class UserError(Exception):
  """A mistake in the user's input (flags, data, directories).

  Scripts catch it and print its message as one line, without a traceback, and
  exit with ``exit_status``. The message says what was wrong and how to fix it.
  """

  exit_status = 2


class NonFiniteLossError(UserError):
  """Training met a non-finite loss or gradient under ``nan_policy=stop``."""

  exit_status = 3

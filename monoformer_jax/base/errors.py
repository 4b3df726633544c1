"""The one exception type for bad user input.

The CLI turns it into a single sentence on stderr and a non-zero exit, so
every message must name the offending thing and say what was expected.
"""


class UserError(Exception):
  """Bad input from the user: a config, a flag, a file or a prompt."""

"""The one exception type the trainer raises for bad input.

The CLI catches :class:`UserError`, prints its message and exits with status 2, so that a wrong
path, an unknown name or a checkpoint that does not fit never ends in a traceback.
"""


class UserError(Exception):
    """Bad input from the user (paths, names, checkpoints, options)."""

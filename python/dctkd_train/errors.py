"""The exceptions that end a run without a traceback.

The CLI catches :class:`UserError`, prints its message and exits with status 2, so that a wrong
path, an unknown name or a checkpoint that does not fit never ends in a traceback. It catches
:class:`TrainingStopped` (a SIGTERM/SIGINT that the run answered by saving ``last.pt``) and exits
with :data:`EXIT_STOPPED`.
"""

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): the run stopped on a
# signal after writing last.pt, and `--resume` continues it.
EXIT_STOPPED = 75

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback"


def _one_line(message: str) -> str:
    """A DataLoader worker's error comes back to the main process re-raised with the worker's traceback
    as its message; keep the error's own line (the last line, after ``module.ClassName: ``)."""
    if message.startswith(_WORKER_PREFIX) and _WORKER_MARK in message:
        last = message.rstrip().splitlines()[-1]
        head, sep, tail = last.partition(": ")
        if sep and " " not in head:
            return tail
    return message


class UserError(Exception):
    """Bad input from the user (paths, names, checkpoints, options, data files)."""

    def __init__(self, message: str = ""):
        super().__init__(_one_line(str(message)))


class TrainingStopped(Exception):
    """The run stopped on SIGTERM/SIGINT after saving ``last.pt``; ``--resume`` continues it."""

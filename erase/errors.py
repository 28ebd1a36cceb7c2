"""The one error type users see: a single line that names the problem and the fix."""


class EraseError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


class TrainingStopped(EraseError):
    """A training run stopped at stop_after, as asked: its checkpoint holds everything needed to resume it."""

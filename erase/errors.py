"""The one error type users see: a single line that names the problem and the fix."""


class EraseError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""

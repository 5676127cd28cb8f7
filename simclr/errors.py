"""The one exception type for mistakes a user can make (bad data, options, files)."""


class SimCLRError(Exception):
    """A user-facing error: the message names the problem and, where possible, the fix."""

"""The one exception type for mistakes a user can make (bad data, options, files)."""

from common.errors import UserError


class SimCLRError(UserError):
    """A user-facing error: the message names the problem and, where possible, the fix."""

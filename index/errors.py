"""The one exception type of the index package."""

from common.errors import UserError


class IndexStoreError(UserError):
    """A missing, corrupt or mismatched index, or an impossible request; the message says which."""

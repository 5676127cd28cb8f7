"""The one exception type of the index package."""


class IndexStoreError(Exception):
    """A missing, corrupt or mismatched index, or an impossible request; the message says which."""

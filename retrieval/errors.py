"""The application's exception type for user mistakes."""

from common.errors import UserError


class RetrievalError(UserError):
    """A bad request (a file, an option, a mismatched model and index); the message says which."""
